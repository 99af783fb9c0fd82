"""Oracles of WinCLIP's pieces (anovl.models.winclip.windows and the window encoding), written from their
definitions: the windows listed one by one, each patch's harmonic mean over the windows covering it in a
loop, and a window's embedding from open_clip's own full-sequence transformer with the attention masked to
the class token and the window's patches (independent of anovl's token-subset forward).

They import torch only: keep them independent of anovl.models.winclip. Equality with anomalib's
WinClipModel as a whole is tests/test_winclip_parity.py's (anomalib_winclip.py).
"""

from __future__ import annotations

import itertools

import torch


def naive_window_masks(grid: int, scale: int) -> list[list[int]]:
    """The patch indices of every scale×scale window of a grid×grid patch grid, row by row."""
    return [
        [(top + row) * grid + left + col for row in range(scale) for col in range(scale)]
        for top in range(grid - scale + 1)
        for left in range(grid - scale + 1)
    ]


def naive_harmonic_aggregation(scores: torch.Tensor, masks: list[list[int]], grid: int) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores (B, W) of the windows covering it: (B, grid, grid)."""
    out = torch.zeros(scores.shape[0], grid * grid, dtype=torch.float64)
    for image, patch in itertools.product(range(scores.shape[0]), range(grid * grid)):
        covering = [scores[image, window].item() for window, mask in enumerate(masks) if patch in mask]
        out[image, patch] = len(covering) / sum(1 / score for score in covering) if covering else 0.0
    return out.view(-1, grid, grid)


def masked_window_embedding(model, images: torch.Tensor, window: list[int]) -> torch.Tensor:
    """A window's embedding from open_clip's own full-sequence transformer (``model.clip.visual``), with
    attention masked to the class token and the window's patches (independent of the token-subset forward)."""
    visual = model.clip.visual
    tokens = visual._embeds(images)
    keep = torch.tensor([0, *[patch + 1 for patch in window]])
    mask = torch.full((tokens.shape[1], tokens.shape[1]), float("-inf"))
    mask[:, keep] = 0
    with torch.no_grad():
        out = visual.transformer(tokens, attn_mask=mask)
    return visual.ln_post(out[:, 0]) @ visual.proj
