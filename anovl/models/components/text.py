"""Text states: a method's prompts for a category, encoded once and kept per device.

:class:`TextStates` builds a prompt set's sentences once per (prompt name, domain) and takes their embeddings from
the model's :class:`~anovl.models.text_cache.TextEmbeddingCache` (on disk, in memory, and one copy per device),
so a method asks ``self.text_states(category, prompt_name, device)`` per image at no cost after the first.
"""

from __future__ import annotations

import torch

from anovl import categories
from anovl.models.components.prompts import Prompts
from anovl.models.text_cache import TextEmbeddingCache, TextEmbeddings


class TextStates:
    """State and per-sentence text embeddings of categories under a prompt set (see the module docstring)."""

    def __init__(self, cache: TextEmbeddingCache):
        self.cache = cache
        self._prompts: Prompts | None = None
        self._sentences: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def __call__(
        self, prompts: Prompts, category: str, prompt_name: str | None = None, device: torch.device | str = "cpu"
    ) -> TextEmbeddings:
        """The embeddings of ``prompts``' sentences naming ``prompt_name`` (default: :mod:`anovl.categories`' name
        for the category) in the category's domain, on ``device``."""
        if prompts is not self._prompts:  # another prompt set (a method's prompts replaced): other sentences
            self._prompts, self._sentences = prompts, {}
        name = prompt_name if prompt_name is not None else categories.prompt_name(category)
        key = (name, categories.domain(category))
        if key not in self._sentences:
            self._sentences[key] = prompts.sentences(*key)
        return self.cache.get(*self._sentences[key], device=device)
