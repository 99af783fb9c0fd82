"""Oracle of TTA's reference mode (docs/METHOD.md §5): the authors' loop, one image after another.

The authors' TextAdapter on one category's sentence embeddings, AdamW (lr 1e-3, weight decay 0.01), 5 steps
per image on [x, x + N(0, 0.055²)], the all-normal loss; the adapter's parameters are re-initialised before
every image but one optimiser serves the whole category, so its state carries over and results depend on
the order. Checked against ``TestTimeAdaptation(TTAConfig(mode="reference"))`` in tests/test_tta.py.
It imports torch only: keep it independent of anovl.models.anovl.tta and .adapters.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NOISE_STD = 0.055
LABEL_WEIGHT = 0.5


class AuthorsTextAdapter(nn.Module):
    """x̃ = 0.5·x + 0.5·tanh(W·normalize(x) + b)·T, T the (frozen) per-sentence text embeddings."""

    def __init__(self, text: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(text.shape[1], text.shape[0])
        self.text = text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + 0.5 * torch.tanh(self.fc(F.normalize(x, dim=-1))) @ self.text


def authors_tta(
    tokens: torch.Tensor, states: torch.Tensor, sentences: torch.Tensor, order: Sequence[int], seed: int, steps: int = 5
) -> dict[int, torch.Tensor]:
    """Adapted tokens of the images ``tokens[i]`` (N, D) with ``states[i]`` (2, D), of one category whose
    sentence embeddings are ``sentences`` (M, D), run in ``order``: {image index: adapted tokens}.

    ``torch.manual_seed(seed)`` is set first: the adapter's initialisations and the noise follow from it.
    """
    torch.manual_seed(seed)
    adapter = AuthorsTextAdapter(sentences)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3, weight_decay=0.01)
    adapted = {}
    for position, index in enumerate(order):
        if position:
            adapter.fc.reset_parameters()
        x, t = tokens[index], states[index]
        for _ in range(steps):
            both = adapter(torch.cat([x, x + NOISE_STD * torch.randn_like(x)]))
            log_probs = (F.normalize(both, dim=-1) @ t.T).log_softmax(-1)
            clean, noisy = log_probs[: len(x)], log_probs[len(x) :]
            entropy = -(clean.exp() * clean).sum(-1).mean()
            loss = entropy + LABEL_WEIGHT * (-clean[:, 0] - noisy[:, 1]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        adapted[index] = adapter(x).detach()
    return adapted
