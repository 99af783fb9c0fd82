"""Oracle of the VisA reference run (docs/METHOD.md §8), restated naively from its text: one image at a time,
two tiles cut and stitched by hand, the tiles' logits upsampled and stitched before the softmax, one linear
adapter per image shared by its tiles, trained with the authors' loop (reference mode) or from the image's
own seed (independent mode). Checked against :class:`anovl.AnoVL` in tests/test_visa_reference.py.

Only the encoder, the text embeddings and the per-image seed (``image_seeds``, the default TTA seed) come from
anovl: keep it independent of anovl.models.components (scoring, tiling), anovl.models.anovl.tta, .adapters
and the tiling in anovl.data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from anovl.models.anovl.torch_model import image_seeds
from anovl.models.anovl.tta import TTAConfig


def cut_tiles(image: torch.Tensor) -> torch.Tensor:
    """(3, S, W) → (2, 3, S, S): left = columns [0, S), right = [W − S, W)."""
    size = image.shape[-2]
    diff = image.shape[-1] - size
    return torch.stack([image[..., :size], image[..., diff:]])


def stitch(left: torch.Tensor, right: torch.Tensor, width: int) -> torch.Tensor:
    """(..., S, S) twice → (..., S, W): [0, diff) from the left, [S, W) from the right, the overlap averaged."""
    size = left.shape[-1]
    diff = width - size
    out = left.new_zeros(*left.shape[:-1], width)
    out[..., :diff] = left[..., :diff]
    out[..., size:] = right[..., size - diff :]
    out[..., diff:size] = (left[..., diff:] + right[..., : size - diff]) / 2
    return out


def cosines(tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """[f·t_n, f·t_a] of normalised tokens (..., D) → (..., 2)."""
    return F.normalize(tokens, dim=-1) @ states.T


def on_grid(per_token: torch.Tensor) -> torch.Tensor:
    """(N, K) per token → (K, g, g), tokens in row-major order."""
    grid = math.isqrt(per_token.shape[0])
    return per_token.T.reshape(-1, grid, grid)


def tile_map(tokens: torch.Tensor, states: torch.Tensor, size: int) -> torch.Tensor:
    """docs/METHOD.md §4 for one tile: softmax, replicate pad, 3×3 mean, bilinear (align_corners) to S×S."""
    probabilities = on_grid(cosines(tokens, states).softmax(-1))[1]
    grid = probabilities.shape[-1]
    padded = F.pad(probabilities[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    smoothed = sum(padded[i : i + grid, j : j + grid] for i in range(3) for j in range(3)) / 9
    return F.interpolate(smoothed[None, None], size=(size, size), mode="bilinear", align_corners=True)[0, 0]


def naive_tfa(model, image: torch.Tensor, category: str):
    """Map (S, W), score, the two tiles' tokens (2, N, D) and the states (2, D) of one image of an
    :class:`anovl.AnoVL` ``model``."""
    size = image.shape[-2]
    states = model.text_states(category).states
    with torch.no_grad():
        encoded = model.encoder(cut_tiles(image), num_local=2)
    tokens, global_tokens = encoded.patch_tokens[-1], encoded.global_tokens
    score = cosines(global_tokens, states).softmax(-1)[:, 1].mean()  # no views
    anomaly_map = stitch(tile_map(tokens[0], states, size), tile_map(tokens[1], states, size), image.shape[-1])
    return anomaly_map, score, tokens, states


class LinearAdapter(nn.Module):
    """docs/METHOD.md §5: x̃ = ½x + ½(W·normalize(x) + b)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return 0.5 * x + 0.5 * self.fc(F.normalize(x, dim=-1))


def stitched_log_probs(
    logits: torch.Tensor, size: int, width: int, softmax_before_stitching: bool = False
) -> torch.Tensor:
    """Per-token logits of the two tiles (2, N, 2) → per-pixel log-probabilities (2, S·W): each tile's logits
    upsampled, stitched, then the softmax per pixel. ``softmax_before_stitching``: a wrong variant (the
    tokens' probabilities upsampled and stitched), to show that the comparison can tell."""
    per_token = logits.softmax(-1) if softmax_before_stitching else logits
    left, right = (
        F.interpolate(on_grid(tile)[None], size=(size, size), mode="bilinear", align_corners=True)[0]
        for tile in per_token
    )
    stitched = stitch(left, right, width).reshape(2, -1)
    return stitched.log() if softmax_before_stitching else stitched.log_softmax(0)


def adapt(
    adapter: LinearAdapter,
    optimizer,
    tokens: torch.Tensor,
    states: torch.Tensor,
    size: int,
    width: int,
    noise,
    softmax_before_stitching: bool = False,
) -> torch.Tensor:
    """Five steps of the §8 loss on one image's tiles (2, N, D); its adapted map (S, W)."""
    for _ in range(5):
        noisy = tokens + 0.055 * noise()
        logits = cosines(adapter(torch.cat([tokens, noisy])), states)  # (4, N, 2): clean tiles, noisy tiles
        clean, corrupted = (
            stitched_log_probs(logits[:2], size, width, softmax_before_stitching),
            stitched_log_probs(logits[2:], size, width, softmax_before_stitching),
        )
        entropy = -(clean.exp() * clean).sum(0).mean()
        loss = entropy + 0.5 * (-clean[0] - corrupted[1]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        adapted = adapter(tokens)
    return stitch(tile_map(adapted[0], states, size), tile_map(adapted[1], states, size), width)


def naive_reference_tta(model, images: list[torch.Tensor], category: str, seed: int) -> list[torch.Tensor]:
    """The authors' loop over the images of one category: global RNG, the adapter reset per image, AdamW kept."""
    torch.manual_seed(seed)
    adapter = optimizer = None
    maps = []
    for image in images:
        _, _, tokens, states = naive_tfa(model, image, category)
        if adapter is None:
            adapter = LinearAdapter(tokens.shape[-1])
            optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3, weight_decay=0.01)
        else:
            adapter.fc.reset_parameters()
        maps.append(
            adapt(
                adapter, optimizer, tokens, states, image.shape[-2], image.shape[-1], lambda: torch.randn_like(tokens)
            )
        )
    return maps


def naive_independent_tta(
    model, image: torch.Tensor, category: str, lr: float = 1e-3, softmax_before_stitching: bool = False
) -> torch.Tensor:
    """One image alone: the adapter's initial weights and the noise from the image's own seed, fresh AdamW."""
    _, _, tokens, states = naive_tfa(model, image, category)
    (seed,) = image_seeds(image[None], TTAConfig().seed)
    generator = torch.Generator().manual_seed(seed)
    adapter = LinearAdapter(tokens.shape[-1])
    with torch.no_grad():  # nn.Linear's default initialisation, drawn from the image's generator
        nn.init.kaiming_uniform_(adapter.fc.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(tokens.shape[-1])
        nn.init.uniform_(adapter.fc.bias, -bound, bound, generator=generator)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.01)
    return adapt(
        adapter,
        optimizer,
        tokens,
        states,
        image.shape[-2],
        image.shape[-1],
        lambda: torch.randn(tokens.shape, generator=generator),
        softmax_before_stitching,
    )
