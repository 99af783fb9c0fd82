"""WinCLIP's multi-scale windows over the patch grid and the harmonic aggregation of their scores."""

from __future__ import annotations

from typing import Sequence

import torch

from anovl.errors import AnovlError


def check_scales(scales: Sequence[int], grid_size: int) -> tuple[int, ...]:
    """The window sizes (in patches) as a tuple; each must fit the ``grid_size``×``grid_size`` patch grid."""
    if isinstance(scales, (str, int)) or not all(
        isinstance(scale, int) and not isinstance(scale, bool) for scale in scales
    ):
        raise AnovlError(f"scales must be a list of window sizes in patches, e.g. [2, 3], got {scales!r}")
    scales = tuple(scales)
    if len(set(scales)) != len(scales):
        raise AnovlError(f"scales must not repeat a window size, got {list(scales)}")
    for scale in scales:
        if not 1 <= scale <= grid_size:
            raise AnovlError(
                f"window scale {scale} does not fit the {grid_size}×{grid_size} patch grid; "
                f"use sizes from 1 to {grid_size} (WinCLIP's reference: [2, 3])"
            )
    return scales


def window_masks(grid_size: int, scale: int) -> torch.Tensor:
    """Patch indices of every ``scale``×``scale`` window (stride 1) of a square grid: (num_windows, scale²).

    Windows and the patches inside each run row by row (anomalib's ``make_masks``, transposed).
    """
    check_scales((scale,), grid_size)
    grid = torch.arange(grid_size * grid_size).view(grid_size, grid_size)
    windows = grid.unfold(0, scale, 1).unfold(1, scale, 1)  # (rows, cols, scale, scale)
    return windows.reshape(-1, scale * scale)


def harmonic_aggregation(window_scores: torch.Tensor, masks: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows covering it: (B, W) → (B, grid, grid).

    A patch no window covers gets 0; a zero window score makes its patches 0 (1/0 = inf).
    """
    batch, num_windows = window_scores.shape
    patches = masks.to(window_scores.device).reshape(-1)
    inverse = (1 / window_scores).repeat_interleave(masks.shape[1], dim=1)  # one entry per (window, patch)
    inverse_sums = window_scores.new_zeros(batch, grid_size * grid_size).index_add_(1, patches, inverse)
    coverage = torch.bincount(patches, minlength=grid_size * grid_size).to(window_scores.dtype)
    return (coverage / inverse_sums).nan_to_num(posinf=0.0).view(batch, grid_size, grid_size)


def harmonic_mean(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise harmonic mean of equally shaped score maps (WinCLIP's cross-scale aggregation)."""
    return len(maps) / (1 / torch.stack(list(maps))).sum(dim=0)
