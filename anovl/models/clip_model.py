"""What every method on a frozen CLIP shares: the backbone, its text-embedding cache and the settings naming it."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anovl.backbones import create_backbone
from anovl.models.base import AnomalyModel
from anovl.models.components.prompts import Prompts
from anovl.models.components.text import TextStates
from anovl.models.text_cache import TextEmbeddingCache, TextEmbeddings


def _weights_loaded(model: "CLIPAnomalyModel", module: nn.Module, incompatible_keys: object) -> None:
    model.weights_loaded()


class CLIPAnomalyModel(AnomalyModel):
    """Base of methods on a frozen CLIP (AnoVL, WinCLIP, a user's own).

    Args:
        backbone: open_clip model name, a registered config name, or a path to a model-config JSON
            (docs/backbones.md lists the towers that work).
        pretrained: open_clip tag, local weights file, or None for random weights (tests and demos only).
        image_size: input side S (default: the model's native size); positional embeddings are interpolated.
        init_seed: seed of the weights when ``pretrained`` is None, so every process and run builds the same model.
        tokenizer: a local tokenizer (directory or tokenizer.json) for towers whose tokenizer is on the
            Hugging Face hub (SigLIP, SigLIP2, CLIPA), which cannot be downloaded offline.
        cache_dir: where text embeddings are cached (default ``$ANOVL_CACHE_DIR`` or ``~/.cache/anovl``).
        use_text_cache: read and write the on-disk text-embedding cache.
        position_interpolation: how loaded weights' positional embedding is resized to ``image_size``
            (``bicubic``: open_clip's; ``bilinear``: see :func:`~anovl.backbones.create_backbone`).
    """

    def __init__(
        self,
        backbone: str,
        pretrained: str | None,
        image_size: int | None = None,
        init_seed: int = 0,
        tokenizer: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_text_cache: bool = True,
        position_interpolation: str = "bicubic",
    ):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            built = create_backbone(
                backbone, pretrained, image_size, tokenizer=tokenizer, position_interpolation=position_interpolation
            )
        self.pretrained = pretrained
        self.init_seed = init_seed
        self.clip = built.clip
        self.encoder = built.visual
        self.backbone_name = built.name
        self.backbone_config = built.config_fingerprint
        self.image_size = built.image_size
        self.text_cache = TextEmbeddingCache(built, cache_dir, use_disk=use_text_cache)
        self._prompt_states = TextStates(self.text_cache)
        # Text embeddings of other weights no longer fit, whether the model or its CLIP loads them.
        self.clip.register_load_state_dict_post_hook(functools.partial(_weights_loaded, self))
        self.eval()

    def train(self, mode: bool = True) -> "CLIPAnomalyModel":
        # CLIP stays frozen in eval mode whatever a wrapping trainer asks for.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    prompts: Prompts  # set by methods with text prompts

    def text_states(
        self, category: str, prompt_name: str | None = None, device: torch.device | str = "cpu"
    ) -> TextEmbeddings:
        """State embeddings (``.states``: normalised [normal, abnormal], (2, D)) and per-sentence embeddings
        (``.sentences``) of :attr:`prompts` for a category, encoded once and kept per device. The sentences name
        ``prompt_name`` (default: :mod:`anovl.categories`' name for the category) in the category's domain."""
        return self._prompt_states(self.prompts, category, prompt_name, device)

    def weights_loaded(self) -> None:
        """Forget what was computed from the old weights (subclasses add their own caches)."""
        self.text_cache.weights_changed()

    def backbone_settings(self) -> dict[str, Any]:
        """The backbone part of :meth:`settings`: name (and a user's config by its hash), weights (a local file by
        its resolved path), size, seed."""
        pretrained = self.pretrained
        if pretrained is not None and Path(pretrained).expanduser().is_file():
            pretrained = str(Path(pretrained).expanduser().resolve())  # the same file, however it is named
        # A user's model config is recorded by a hash of its content too: the name alone may be reused.
        config = {"backbone_config": self.backbone_config} if self.backbone_config is not None else {}
        return {
            "backbone": self.backbone_name,
            **config,
            "pretrained": pretrained,
            "image_size": self.image_size,
            "init_seed": self.init_seed if pretrained is None else None,
        }
