"""The sample record and the dataset that turns samples into batch items (decoding, resizing, corruptions).

Bad data policy (``on_bad_image``):

* ``"error"`` (default): problems found while listing files (an anomalous image without a mask) raise
  :class:`~anovl.errors.AnovlError` at once; files are only decoded when a batch needs them, so an unreadable
  image or a mask of the wrong size raises :class:`~anovl.data.image_io.BadImageError` at that point.
* ``"skip"``: every image and mask is decoded once when the dataset is built (in threads; a plain header
  check would miss truncated JPEGs). An unusable image is left out; an unusable or missing mask (unreadable,
  wrong size) only removes the pixel ground truth: the image stays, with ``has_mask`` False, for the image
  metrics. Each case gives one :class:`SkippedFileWarning` naming the file, and the datamodule's
  :attr:`~anovl.data.datamodule.AnomalyDataModule.skipped_files` keeps the messages (results.json lists them).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.data import Dataset

from anovl.data.corruptions import Corruptor
from anovl.data.decoded_cache import DecodedCache
from anovl.data.image_io import (
    BadImageError,
    check_mask_size,
    check_pixel_budget,
    load_mask_image,
    load_rgb,
    load_rgb_resized,
)
from anovl.data.transforms import resize_mask_image, shorter_side_size
from anovl.metrics.functional import region_size_map

OnBadImage = Literal["error", "skip"]
ResizeMode = Literal["resize", "tile"]

IMAGE_FALLBACK = "leave unreadable images out"
MASK_FALLBACK = "use such images without pixel ground truth"

# Tile mode keeps the aspect ratio, so the input grows with it (a 20000×1 image would be 4.8 M pixels wide at
# S = 240); beyond this ratio an image is refused. VisA's are below 2:1.
MAX_TILE_ASPECT = 8

# Part of every decoded-cache key: raise it when the loader's output for the same file and settings changes.
CACHE_FORMAT = 1


class SkippedFileWarning(UserWarning):
    """A file left out (or used without its mask) because ``on_bad_image='skip'``."""


@dataclass(frozen=True)
class Sample:
    """One test image and what is known about it."""

    image_path: Path
    key: str  # path relative to the dataset root: sort key and corruption seed, independent of where the root lives
    category: str
    prompt_name: str
    label: int  # 0 normal, 1 anomalous, -1 unknown
    has_mask: bool  # pixel ground truth exists (all normal when mask_path is None)
    mask_path: Path | None = None


class AnomalyDataset(Dataset):
    """Turns samples into batch items with the keys of docs/ARCHITECTURE.md, as the loader carries them.

    The work that needs the host is done here, in the loader's workers: decoding, the Pillow resize (bit for bit
    the reference's), corruptions, and the masks' connected components (``region_sizes``, for the AUPRO). Images
    stay ``uint8 3×H×W`` and masks ``bool``; :func:`~anovl.data.transforms.prepare_batch` normalises them where
    the model runs.

    ``mode="resize"`` gives S×S images; ``"tile"`` resizes the shorter side to S and keeps the aspect ratio
    (to be cut with :func:`~anovl.data.transforms.split_tiles`), up to :data:`MAX_TILE_ASPECT`. VisA-style masks
    storing class indices use ``nonzero_masks=True`` (see :func:`~anovl.data.image_io.load_mask`). With a
    :class:`~anovl.data.decoded_cache.DecodedCache`, resized images and masks are read from it when their files
    and settings are unchanged.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        mode: ResizeMode = "resize",
        nonzero_masks: bool = False,
        on_bad_image: OnBadImage = "error",
        corruptor: Corruptor | None = None,
        cache: DecodedCache | None = None,
    ) -> None:
        self.image_size = image_size
        self.mode = mode
        self.nonzero_masks = nonzero_masks
        self.corruptor = corruptor
        self.cache = cache
        self.samples, self.skipped = self._usable_samples(samples) if on_bad_image == "skip" else (list(samples), [])
        for problem in self.skipped:
            warnings.warn(problem, SkippedFileWarning, stacklevel=2)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            resized, image_hw = self._resized_image(sample)
        except BadImageError as error:
            raise BadImageError(f"{error}, or set on_bad_image='skip' to {IMAGE_FALLBACK}") from error
        mask = np.zeros(resized.shape[:2], dtype=bool)
        if sample.mask_path is not None:
            try:
                mask = self._resized_mask(sample, image_hw, resized.shape[:2])
            except BadImageError as error:
                raise BadImageError(f"{error}, or set on_bad_image='skip' to {MASK_FALLBACK}") from error
        item = {
            "image": _channels_first(resized),
            "mask": torch.from_numpy(mask),
            "region_sizes": torch.from_numpy(region_size_map(mask)),
            "has_mask": torch.tensor(sample.has_mask),
            "label": torch.tensor(sample.label, dtype=torch.long),
            "category": sample.category,
            "prompt_name": sample.prompt_name,
            "image_path": str(sample.image_path),
        }
        if self.corruptor is not None:
            item["corrupted_image"] = _channels_first(self.corruptor(resized, sample.key))
        return item

    def _resized_image(self, sample: Sample) -> tuple[np.ndarray, tuple[int, int]]:
        """The model-sized ``uint8 H×W×3`` image and the size of the file's image."""

        def decode() -> tuple[np.ndarray, tuple[int, int]]:
            return load_rgb_resized(sample.image_path, lambda height, width: self.output_size(sample, height, width))

        return self._cached(sample.image_path, ("image", self.mode, self.image_size, Image.MAX_IMAGE_PIXELS), decode)

    def _resized_mask(self, sample: Sample, image_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
        """The model-sized ``bool H×W`` mask."""
        assert sample.mask_path is not None, "called for samples with a mask"
        mask, _ = self._cached(
            sample.mask_path,
            ("mask", self.nonzero_masks, sample.label, image_hw, out_hw),
            lambda: (resize_mask_image(self.read_mask(sample, image_hw), out_hw), image_hw),
        )
        return mask > 0

    def _cached(
        self, path: Path, settings: tuple, compute: Callable[[], tuple[np.ndarray, tuple[int, int]]]
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """``compute()`` (an array and its source size), or the decoded cache's entry for the file and settings."""
        if self.cache is None:
            return compute()
        key = self.cache.key(path, CACHE_FORMAT, PIL.__version__, *settings)
        cached = self.cache.get(key) if key is not None else None
        if cached is not None:
            return cached
        array, source_hw = compute()
        if key is not None:
            self.cache.put(key, array, source_hw)
        return array, source_hw

    def output_size(self, sample: Sample, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the model input made from a ``height×width`` image; BadImageError if too large."""
        size = self.image_size
        if self.mode == "resize":
            out_hw = (size, size)
        else:
            aspect = max(height, width) / min(height, width)
            if aspect > MAX_TILE_ASPECT:
                raise BadImageError(
                    f"Image {sample.image_path} is {width}×{height}, an aspect ratio of {aspect:.3g}:1; tile mode keeps "
                    f"the aspect ratio and accepts at most {MAX_TILE_ASPECT}:1; crop the image or use mode='resize'"
                )
            out_hw = shorter_side_size(height, width, size)
        check_pixel_budget(sample.image_path, "image", *out_hw, "resized")
        return out_hw

    def read_mask(self, sample: Sample, image_hw: tuple[int, int]) -> Image.Image:
        """The mask of a sample at its image's size (an ``L`` image of 0 and 255); BadImageError if unusable or,
        for an anomalous image, empty."""
        assert sample.mask_path is not None, "called for samples with a mask"
        mask = load_mask_image(sample.mask_path, self.nonzero_masks)
        check_mask_size(sample.image_path, image_hw, sample.mask_path, (mask.height, mask.width))
        if sample.label == 1 and not np.asarray(mask).any():
            raise BadImageError(
                f"Mask {sample.mask_path} of anomalous image {sample.image_path} marks no pixel as "
                "anomalous (see the mask rule in anovl.data.image_io); fix the mask"
            )
        return mask

    def _usable_samples(self, samples: Sequence[Sample]) -> tuple[list[Sample], list[str]]:
        """Decode every file once; drop unusable images, strip unusable masks; one problem message per file."""

        def check(sample: Sample) -> tuple[Sample | None, str | None]:
            try:
                image_hw = load_rgb(sample.image_path).shape[:2]
                self.output_size(sample, *image_hw)
            except BadImageError as error:
                return None, f"{error} (on_bad_image='skip': image left out)"
            if sample.mask_path is None:
                return sample, None
            try:
                self.read_mask(sample, image_hw)
            except BadImageError as error:
                return (
                    replace(sample, mask_path=None, has_mask=False),
                    f"{error} (on_bad_image='skip': image used without its mask)",
                )
            return sample, None

        # Pillow releases the GIL while decoding, so threads give a real speed-up on large test sets.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(check, samples))
        usable = [sample for sample, _ in results if sample is not None]
        return usable, [problem for _, problem in results if problem is not None]


def _channels_first(rgb: np.ndarray) -> torch.Tensor:
    """``uint8 H×W×3`` -> ``uint8 3×H×W`` (a view; collation makes the batch contiguous)."""
    return torch.from_numpy(rgb).permute(2, 0, 1)
