"""Preprocessing of docs/METHOD.md §1, and the tiling used by the VisA reference run.

The reference resizes PIL images with torchvision's ``Resize`` (which calls Pillow's bilinear resize, itself
antialiased when shrinking), then ``ToTensor`` and ``Normalize`` with CLIP's statistics. The functions here
use Pillow and the same tensor arithmetic, so their output equals torchvision's bit for bit.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (height, width) when the shorter side becomes ``size``; torchvision's ``Resize(size)`` rule
    (the longer side is truncated, not rounded)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_image(rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear (Pillow) resize of a ``uint8 H×W×3`` image to ``size_hw`` = (height, width)."""
    height, width = size_hw
    return np.array(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a ``bool H×W`` mask as the reference does: bilinear on a 0/255 image, then > 0.5 of the range."""
    return resize_mask_image(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"), size_hw)


def resize_mask_image(mask: Image.Image, size_hw: tuple[int, int]) -> np.ndarray:
    """:func:`resize_mask` of an ``L`` image of 0 and 255 (:func:`~anovl.data.image_io.load_mask_image`).

    Pillow resizes rows first, each on its own, then columns. Rows without an anomalous pixel give zero rows, so
    only the rows between the first and the last anomalous one go through the row pass (a defect covers a small
    band of a 1024 px mask); the column pass then runs on the whole height as in one ``resize`` call: the same
    pixels, bit for bit.
    """
    height, width = size_hw
    rows = np.flatnonzero(np.asarray(mask).any(axis=1))
    if rows.size == 0:
        return np.zeros(size_hw, dtype=bool)
    first, last = int(rows[0]), int(rows[-1]) + 1
    band = mask.crop((0, first, mask.width, last)).resize((width, last - first), Image.Resampling.BILINEAR)
    rows_resized = Image.new("L", (width, mask.height))
    rows_resized.paste(band, (0, first))
    # ToTensor divides by 255, so "> 0.5" is "> 127.5", i.e. >= 128 on the 8-bit values.
    return np.asarray(rows_resized.resize((width, height), Image.Resampling.BILINEAR)) > 127


def normalize(rgb: np.ndarray) -> torch.Tensor:
    """``uint8 H×W×3`` -> CLIP-normalised ``float 3×H×W`` (ToTensor then Normalize)."""
    return normalize_images(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1))


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """``uint8 …×3×H×W`` -> CLIP-normalised float32, on the images' device (ToTensor then Normalize).

    The same float32 operations in the same order as torchvision, so the CPU result is bit for bit theirs.
    """
    mean, std = _clip_statistics(images.device)
    return images.to(torch.float32).div_(255).sub_(mean).div_(std)


@functools.cache
def _clip_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std as 3×1×1 tensors on ``device``, made once per device (no copy per batch)."""
    mean, std = (
        torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).to(device) for values in (CLIP_MEAN, CLIP_STD)
    )
    return mean, std


def prepare_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The model-side half of the data path: a batch as the loader gives it (uint8 images, bool masks: a
    quarter of the bytes to move) -> the batch of docs/ARCHITECTURE.md (normalised float images, float masks).

    Run it where the batch already is (the engine calls it after the transfer to the model's device); entries
    already in float are left as they are, so it may run twice.
    """
    prepared = dict(batch)
    for key in ("image", "corrupted_image"):
        value = prepared.get(key)
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
            prepared[key] = normalize_images(value)
    mask = prepared.get("mask")
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        prepared["mask"] = mask.to(torch.float32)
    return prepared


def tile_offsets(length: int, size: int) -> list[int]:
    """Start positions of square tiles of side ``size`` covering ``length`` pixels.

    The fewest tiles that cover the length, spread evenly with the first at 0 and the last flush with the
    end; for ``size < length <= 2·size`` these are the reference's left tile [0, size) and right tile
    [length - size, length).
    """
    if length < size:
        raise ValueError(f"cannot tile a length of {length} with tiles of {size}")
    count = math.ceil(length / size)
    if count == 1:
        return [0]
    return [round(index * (length - size) / (count - 1)) for index in range(count)]


def split_tiles(images: torch.Tensor) -> torch.Tensor:
    """Cut ``B×C×H×W`` images along their longer side into square tiles of side ``min(H, W)``.

    Returns ``(B·n)×C×S×S``, the n tiles of each image consecutive, in reading order.
    """
    height, width = images.shape[-2:]
    portrait = height > width
    along_width = images.transpose(-1, -2) if portrait else images
    size, length = along_width.shape[-2:]
    tiles = torch.stack([along_width[..., offset : offset + size] for offset in tile_offsets(length, size)], dim=1)
    if portrait:
        tiles = tiles.transpose(-1, -2)
    return tiles.flatten(0, 1)


def stitch_tiles(tile_maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`split_tiles` for maps: ``(B·n)×S×S`` -> ``B×height×width``, overlaps averaged."""
    portrait = height > width
    size = tile_maps.shape[-1]
    length = max(height, width)
    offsets = tile_offsets(length, size)
    tiles = tile_maps.reshape(-1, len(offsets), size, size)
    if portrait:
        tiles = tiles.transpose(-1, -2)
    total = tiles.new_zeros(tiles.shape[0], size, length)
    coverage = tiles.new_zeros(length)
    for index, offset in enumerate(offsets):
        total[..., offset : offset + size] += tiles[:, index]
        coverage[offset : offset + size] += 1
    stitched = total / coverage
    return stitched.transpose(-1, -2) if portrait else stitched
