"""Gaussian smoothing of anomaly maps on the maps' own device, equal to ``scipy.ndimage.gaussian_filter``.

AnomalyCLIP's test script (and APRIL-GAN's) smooth the summed layer maps with
``gaussian_filter(map, sigma=4)`` on the CPU: a separable kernel of radius ``int(truncate·σ + 0.5)`` with
``truncate = 4``, boundaries by half-sample symmetric reflection (scipy's ``mode='reflect'``: ``d c b a | a b
c d | d c b a``), which torch's ``reflect`` padding (that leaves the edge sample out) is not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy's normalised 1-D Gaussian weights (float64), of length ``2·int(truncate·σ + 0.5) + 1``."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 / float(sigma) ** 2 * x * x)
    return weights / weights.sum()


def _symmetric_index(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source index of every position of ``[-radius, size + radius)`` under half-sample symmetric reflection
    (any radius, also one larger than ``size``)."""
    index = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(index < size, index, 2 * size - 1 - index)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """``maps`` (B, H, W) smoothed per map as ``scipy.ndimage.gaussian_filter(map, sigma)`` does."""
    if sigma <= 0:
        return maps
    weights = gaussian_kernel1d(sigma, truncate).to(maps.device, maps.dtype)
    radius = (len(weights) - 1) // 2
    out = maps
    for dim in (-2, -1):  # rows then columns, as scipy's separable passes
        size = out.shape[dim]
        padded = out.index_select(dim, _symmetric_index(size, radius, out.device))
        lines = padded.movedim(dim, -1)
        shape = lines.shape
        smoothed = F.conv1d(lines.reshape(-1, 1, shape[-1]), weights.view(1, 1, -1)).reshape(*shape[:-1], size)
        out = smoothed.movedim(-1, dim)
    return out
