"""Oracle of AnoVL's batched forward (docs/METHOD.md §3-§5): the authors' one-image-at-a-time pipeline.

One image at a time, each of its views through a separate dual-path encoder call, TTA (when the model has it)
on that image alone, as the authors' code runs it. It shares only the encoder, the text embeddings, the views
and the TTA module with :class:`anovl.AnoVL`; maps and image scores are recomputed here with plain torch, so
comparing the two checks the batching, the view handling and the map pipeline (tests/test_bench.py). Keep it
independent of anovl.models.components.scoring and of AnoVL.forward.

benchmarks/sections/reference.py times it against AnoVL (the benchmark's ``reference`` section).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F

from anovl.models.anovl.torch_model import image_seeds
from anovl.models.anovl.views import make_views


def patch_probability_map(tokens: torch.Tensor, states: torch.Tensor, image_size: int) -> torch.Tensor:
    """The authors' map of one image: tokens (N, D), states (2, D) → (S, S)."""
    probabilities = (F.normalize(tokens, dim=-1) @ states.T.to(tokens.dtype)).softmax(-1)[:, 1]
    grid = math.isqrt(tokens.shape[0])
    patch = F.pad(probabilities.reshape(1, 1, grid, grid), (1, 1, 1, 1), mode="replicate")
    patch = F.avg_pool2d(patch, 3, stride=1)
    return F.interpolate(patch, size=(image_size, image_size), mode="bilinear", align_corners=True)[0, 0]


def _untimed(stage: str) -> ContextManager:
    return contextlib.nullcontext()


def reference_pipeline(
    model, images: torch.Tensor, class_names: Sequence[str], stage: Callable[[str], ContextManager] = _untimed
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (B, S, S) and image scores (B,) of an :class:`anovl.AnoVL` ``model``, one image at a time.

    ``stage(name)`` is entered around each stage (text, views, encoder, maps, tta): the benchmark passes its
    timer's.
    """
    maps, scores = [], []
    for image, name in zip(images, class_names):
        with stage("text"):
            embeddings = model.text_states(name)
            states = embeddings.states.to(images.device)
        with torch.no_grad():
            with stage("views"):
                views = make_views(image[None], model.num_views)
            with stage("encoder"):
                encoded = [model.encoder(view[None], num_local=1, layers=model.layers) for view in views]
            with stage("maps"):
                local = [tokens[0] for tokens in encoded[0].patch_tokens]
                image_map = torch.stack([patch_probability_map(t, states, model.image_size) for t in local]).mean(0)
                view_scores = [
                    (F.normalize(out.global_tokens[0], dim=-1) @ states.T.to(out.global_tokens.dtype)).softmax(-1)[1]
                    for out in encoded
                ]
                score = torch.stack(view_scores).mean()
        if model.tta is not None:
            with stage("tta"):
                seeds = image_seeds(image[None], model.tta.config.seed)
                sentences = embeddings.sentences[None].to(images.device)
                adapted = [model.tta(tokens[None], states[None], sentences, seeds, [name])[0] for tokens in local]
                image_map = torch.stack(
                    [patch_probability_map(t, states.float(), model.image_size) for t in adapted]
                ).mean(0)
        maps.append(image_map)
        scores.append(score)
    return torch.stack(maps), torch.stack(scores)
