"""Running a method on wide images (VisA's tile mode, S×W with W > S): cut each image into square tiles, run the
tiles as images of their own, stitch the maps back (overlaps averaged) and average the tiles' scores.

The generic module does this for every method without :attr:`~anovl.models.base.AnomalyModel.handles_wide_images`;
a method that does handle them (AnoVL's ``separate-tiles`` mode) uses the same two steps. The cut and the stitch
themselves are :func:`~anovl.data.transforms.split_tiles` and :func:`~anovl.data.transforms.stitch_tiles`.
"""

from __future__ import annotations

from typing import Any

import torch

from anovl.data.transforms import split_tiles, stitch_tiles


def tile_batch(images: torch.Tensor, **per_image: Any) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """``(tiles (B·n)×3×S×S, n, per_tile)``: the images cut into their n tiles each (an image's tiles one after
    another), and every per-image argument given per tile: tensors (``corrupted_image``) cut alike, sequences
    (categories, prompt names, seeds) repeated n times per item, None kept."""
    tiles = split_tiles(images)
    count = tiles.shape[0] // images.shape[0]

    def per_tile(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            return split_tiles(value)
        return [item for item in value for _ in range(count)]

    return tiles, count, {key: per_tile(value) for key, value in per_image.items()}


def untile(maps: torch.Tensor, scores: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiles' maps ((B·n)×S×S) stitched to B×height×width, and their scores ((B·n)) averaged per image (B)."""
    stitched = stitch_tiles(maps, height, width)
    return stitched, scores.view(stitched.shape[0], -1).mean(1)
