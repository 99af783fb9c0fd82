"""Oracles of the TFA map pipeline and of the 22 image-score views (docs/METHOD.md §4).

:func:`numpy_map` writes the map's smoothing and upsampling out with loops in numpy (the oracle of
anovl.models.components.scoring.anomaly_map); :func:`reference_views` builds each view straight from its
definition with torch's ``affine_grid``/``grid_sample`` (the oracle of anovl.models.anovl.views.make_views).
They import numpy and torch only: keep them independent of anovl's maps and views.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

ROTATION_ANGLES = (
    -math.pi / 4,
    -3 * math.pi / 16,
    -math.pi / 8,
    -math.pi / 16,
    math.pi / 16,
    math.pi / 8,
    3 * math.pi / 16,
    math.pi / 4,
)
TRANSLATION_STEPS = (0.2, 0.1)


def numpy_map(probabilities: np.ndarray, size: int) -> np.ndarray:
    """Replicate pad + 3×3 mean + bilinear (align_corners=True), written out with loops."""
    grid = probabilities.shape[0]
    padded = np.pad(probabilities, 1, mode="edge")
    smooth = np.array([[padded[i : i + 3, j : j + 3].mean() for j in range(grid)] for i in range(grid)])
    out = np.zeros((size, size))
    for y in range(size):
        for x in range(size):
            sy, sx = y * (grid - 1) / (size - 1), x * (grid - 1) / (size - 1)
            y0, x0 = min(int(sy), grid - 2), min(int(sx), grid - 2)
            fy, fx = sy - y0, sx - x0
            out[y, x] = (
                (1 - fy) * (1 - fx) * smooth[y0, x0]
                + (1 - fy) * fx * smooth[y0, x0 + 1]
                + fy * (1 - fx) * smooth[y0 + 1, x0]
                + fy * fx * smooth[y0 + 1, x0 + 1]
            )
    return out


class ReferenceViews(NamedTuple):
    identity: torch.Tensor
    rotations: list[torch.Tensor]  # in the order of ROTATION_ANGLES
    translations: list[torch.Tensor]  # (±a, ±b) for a = b in TRANSLATION_STEPS; their order is not the method's
    flip: torch.Tensor
    grayscale: torch.Tensor
    quarter_turns: list[torch.Tensor]  # rot90 by k = 1, 2, 3


def reflect_warp(images: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    """``affine_grid`` + ``grid_sample`` with align_corners=True and reflection padding."""
    grid = F.affine_grid(
        torch.tensor([theta], dtype=torch.float32).repeat(len(images), 1, 1), list(images.shape), align_corners=True
    )
    return F.grid_sample(images, grid, padding_mode="reflection", align_corners=True)


def reference_views(images: torch.Tensor) -> ReferenceViews:
    """Every view of ``images`` (B, 3, H, W) as docs/METHOD.md §4 defines it."""
    rotations = [
        reflect_warp(images, [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]]) for a in ROTATION_ANGLES
    ]
    translations = [
        reflect_warp(images, [[1, 0, sa * step], [0, 1, sb * step]])
        for step in TRANSLATION_STEPS
        for sa in (1, -1)
        for sb in (1, -1)
    ]
    gray = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    return ReferenceViews(
        images,
        rotations,
        translations,
        images.flip(-1),
        gray[:, None].repeat(1, 3, 1, 1),
        [torch.rot90(images, k, (2, 3)) for k in (1, 2, 3)],
    )
