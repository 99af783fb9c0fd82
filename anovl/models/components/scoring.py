"""Token-to-map scoring shared by the methods: the abnormal probability of tokens against [normal, abnormal] text
states, patch maps at the input's resolution, image scores over views (docs/METHOD.md §4), and the stitched
per-pixel logits that a joint adaptation of a wide image's tiles takes its loss on (METHOD §8)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from anovl.data.transforms import stitch_tiles, tile_offsets


def block_sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(terms)`` of per-block maps or losses, typed as the tensor it is: a method has at least one block, so
    it is never ``sum``'s 0 of nothing."""
    total = sum(terms)
    assert isinstance(total, torch.Tensor), "at least one block"
    return total


def abnormal_probability(tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """softmax([f·t_n, f·t_a])[abnormal] with f = normalize(token); no temperature.

    tokens: (B, ..., D); states: (B, 2, D) normalised. Returns (B, ...).
    """
    features = F.normalize(tokens, dim=-1)
    flat = features.reshape(features.shape[0], -1, features.shape[-1])
    logits = torch.einsum("bnd,bkd->bnk", flat, states.to(flat.dtype))
    return logits.softmax(-1)[..., 1].reshape(features.shape[:-1])


def token_grid(values: torch.Tensor) -> torch.Tensor:
    """(B, N) per-token values → (B, 1, g, g) on the square patch grid (N = g²)."""
    batch, count = values.shape
    grid = math.isqrt(count)
    if grid * grid != count:
        raise ValueError(f"{count} patch tokens do not form a square grid")
    return values.reshape(batch, 1, grid, grid)


def patch_map(probabilities: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, N) patch probabilities → (B, S, S): replicate-pad, 3×3 mean, bilinear (align_corners)."""
    maps = token_grid(probabilities)
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


def layer_mean_map(patch_tokens: Sequence[torch.Tensor], states: torch.Tensor, image_size: int) -> torch.Tensor:
    """The map of each requested layer's patch tokens (B, N, D), averaged over the layers: (B, S, S)."""
    return torch.stack([anomaly_map(tokens, states, image_size) for tokens in patch_tokens]).mean(0)


def maps_and_scores(
    patch_tokens: Sequence[torch.Tensor], global_tokens: torch.Tensor, states: torch.Tensor, image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """AnoVL's training-free map-and-score step (METHOD §4-5), shared by its forward and its export:
    the layer-mean map (B, S, S) and the score over views (B,)."""
    return layer_mean_map(patch_tokens, states, image_size), image_score(global_tokens, states)


def stitched_pixel_logits(logits: torch.Tensor, image_size: int, height: int, width: int) -> torch.Tensor:
    """Per-pixel logits (B, H·W, K) of height×width images from the per-token logits (B, n·N, K) of their n
    tiles (in :func:`~anovl.data.transforms.split_tiles` order): each tile's logit grid upsampled bilinearly
    (align_corners) to S×S, then stitched with the overlaps averaged; no softmax (METHOD §8)."""
    batch, _, classes = logits.shape
    tiles = batch * len(tile_offsets(max(height, width), image_size))
    per_tile = logits.reshape(tiles, -1, classes).transpose(1, 2).reshape(tiles * classes, -1)
    upsampled = F.interpolate(token_grid(per_tile), size=(image_size, image_size), mode="bilinear", align_corners=True)
    # Class-major, so that each class's n tiles of an image stay consecutive for stitch_tiles.
    class_major = upsampled.reshape(tiles, classes, image_size, image_size).transpose(0, 1)
    stitched = stitch_tiles(class_major.reshape(classes * tiles, image_size, image_size), height, width)
    return stitched.reshape(classes, batch, height * width).permute(1, 2, 0)
