"""The test-time views averaged into the image score (docs/METHOD.md §4), applied to normalised images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ROTATIONS = (
    -math.pi / 4,
    -3 * math.pi / 16,
    -math.pi / 8,
    -math.pi / 16,
    math.pi / 16,
    math.pi / 8,
    3 * math.pi / 16,
    math.pi / 4,
)
TRANSLATIONS = tuple((sign_a * step, sign_b * step) for step in (0.2, 0.1) for sign_a in (1, -1) for sign_b in (1, -1))
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
NUM_REFERENCE_VIEWS = 22


def _affine_thetas() -> torch.Tensor:
    rotations = [[[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]] for a in ROTATIONS]
    translations = [[[1.0, 0.0, a], [0.0, 1.0, b]] for a, b in TRANSLATIONS]
    return torch.tensor(rotations + translations, dtype=torch.float64)


def make_views(images: torch.Tensor, num_views: int = NUM_REFERENCE_VIEWS) -> torch.Tensor:
    """Stack the first ``num_views`` views of every image, view-major: (num_views·B, C, H, W).

    Order: identity; 8 rotations; 8 translations; horizontal flip; grayscale; rot90 by 1, 2, 3.
    """
    if not 1 <= num_views <= NUM_REFERENCE_VIEWS:
        raise ValueError(f"num_views must be between 1 and {NUM_REFERENCE_VIEWS}, got {num_views}")
    batch = images.shape[0]
    views = [images]
    thetas = _affine_thetas()[: num_views - 1].to(images)
    if len(thetas):
        # One grid per view, the batch folded into channels: every image of the batch shares the view's grid.
        channels = batch * images.shape[1]
        grid = F.affine_grid(thetas, [len(thetas), channels, *images.shape[2:]], align_corners=True)
        folded = images.reshape(1, channels, *images.shape[2:]).expand(len(thetas), -1, -1, -1)
        warped = F.grid_sample(folded, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
        views.append(warped.reshape(len(thetas) * batch, *images.shape[1:]))
    extra = [
        lambda x: x.flip(-1),
        lambda x: torch.einsum("bchw,c->bhw", x, x.new_tensor(GRAY_WEIGHTS)).unsqueeze(1).expand_as(x),
        lambda x: torch.rot90(x, 1, (-2, -1)),
        lambda x: torch.rot90(x, 2, (-2, -1)),
        lambda x: torch.rot90(x, 3, (-2, -1)),
    ]
    views.extend(view(images) for view in extra[: max(0, num_views - 1 - len(_affine_thetas()))])
    return torch.cat(views)
