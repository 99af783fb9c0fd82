"""Anomaly maps and image scores from tokens and state text embeddings (METHOD §4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def abnormal_probability(tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """softmax([f·t_n, f·t_a])[abnormal] with f = normalize(token); no temperature.

    tokens: (B, ..., D); states: (B, 2, D) normalised. Returns (B, ...).
    """
    features = F.normalize(tokens, dim=-1)
    flat = features.reshape(features.shape[0], -1, features.shape[-1])
    logits = torch.einsum("bnd,bkd->bnk", flat, states.to(flat.dtype))
    return logits.softmax(-1)[..., 1].reshape(features.shape[:-1])


def patch_map(probabilities: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, N) patch probabilities → (B, S, S): replicate-pad, 3×3 mean, bilinear (align_corners)."""
    batch, count = probabilities.shape
    grid = math.isqrt(count)
    if grid * grid != count:
        raise ValueError(f"{count} patch tokens do not form a square grid")
    maps = probabilities.reshape(batch, 1, grid, grid)
    maps = F.avg_pool2d(F.pad(maps, (1, 1, 1, 1), mode="replicate"), kernel_size=3, stride=1)
    return F.interpolate(maps, size=(image_size, image_size), mode="bilinear", align_corners=True)[:, 0]


def anomaly_map(patch_tokens: torch.Tensor, states: torch.Tensor, image_size: int) -> torch.Tensor:
    """Pixel map (B, S, S) from local patch tokens (B, N, D) and state embeddings (B, 2, D)."""
    return patch_map(abnormal_probability(patch_tokens, states), image_size)


def image_score(global_tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Mean over views of the abnormal probability; global_tokens (V·B, D) view-major → (B,)."""
    batch = states.shape[0]
    views = global_tokens.reshape(-1, batch, global_tokens.shape[-1]).transpose(0, 1)
    return abnormal_probability(views, states).mean(-1)
