"""Text embeddings of the state prompts, cached on disk in safetensors (never pickle).

The cache key covers the backbone, a fingerprint of its weights, the prompt sentences and the
category, so a change in any of them re-encodes instead of reusing stale embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from anovl.backbones import Backbone
from anovl.models.anovl.prompts import PromptSet

log = logging.getLogger(__name__)
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    root = os.environ.get("ANOVL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "anovl"
    )
    return Path(root) / "text_embeddings"


@dataclass
class TextEmbeddings:
    """State embeddings of one category.

    ``states``: (2, D) normalised [normal, abnormal] = normalize(mean of unnormalised sentence embeddings).
    ``sentences``: (2·n, D) per-sentence normalised embeddings, normal sentences first.
    """

    states: torch.Tensor
    sentences: torch.Tensor

    @classmethod
    def from_sentence_embeddings(cls, normal: torch.Tensor, abnormal: torch.Tensor) -> "TextEmbeddings":
        states = torch.stack([normal.mean(0), abnormal.mean(0)])
        return cls(F.normalize(states, dim=-1), F.normalize(torch.cat([normal, abnormal]), dim=-1))


@torch.no_grad()
def encode_sentences(backbone: Backbone, sentences: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unnormalised CLIP text embeddings, (len(sentences), D) in float32 on the CPU."""
    device = next(backbone.clip.parameters()).device
    chunks = []
    for start in range(0, len(sentences), batch_size):
        tokens = backbone.tokenizer(sentences[start:start + batch_size]).to(device)
        chunks.append(backbone.clip.encode_text(tokens).float().cpu())
    return torch.cat(chunks)


class TextEmbeddingCache:
    """Encodes a category's prompts once and keeps the result in memory and on disk."""

    def __init__(self, backbone: Backbone, prompts: PromptSet, cache_dir: str | os.PathLike | None = None,
                 use_disk: bool = True):
        self.backbone = backbone
        self.prompts = prompts
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.use_disk = use_disk
        self._memory: dict[str, TextEmbeddings] = {}
        self._on_device: dict[tuple[str, str], TextEmbeddings] = {}  # copies moved once per device, not per batch

    def key(self, category: str) -> dict[str, str]:
        return {
            "format": str(CACHE_FORMAT),
            "backbone": self.backbone.name,
            "weights": self.backbone.weights_fingerprint,
            "prompts": self.prompts.fingerprint(category),
            "category": category,
        }

    def path(self, category: str) -> Path:
        digest = hashlib.sha256(json.dumps(self.key(category), sort_keys=True).encode()).hexdigest()[:24]
        return self.cache_dir / f"{self.backbone.name}-{digest}.safetensors"

    def weights_changed(self) -> None:
        """Key the cache to the backbone's current weights and forget what the old ones gave.

        Files of the old weights stay on disk: their names carry that weights' fingerprint.
        """
        self.backbone.refresh_fingerprint()
        self._memory.clear()
        self._on_device.clear()

    def get(self, category: str, device: torch.device | str = "cpu") -> TextEmbeddings:
        """The category's embeddings on ``device`` (encoded, or read from disk, once)."""
        if category not in self._memory:
            self._memory[category] = self._load(category) or self._encode(category)
        if torch.device(device).type == "cpu":
            return self._memory[category]
        key = (category, str(device))
        if key not in self._on_device:
            embeddings = self._memory[category]
            self._on_device[key] = TextEmbeddings(embeddings.states.to(device), embeddings.sentences.to(device))
        return self._on_device[key]

    def _load(self, category: str) -> TextEmbeddings | None:
        path = self.path(category)
        if not self.use_disk or not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            embeddings = TextEmbeddings(tensors["states"], tensors["sentences"])
        except (SafetensorError, KeyError, OSError) as error:
            log.warning("ignoring unreadable text-embedding cache %s (%s); re-encoding", path, error)
            return None
        return embeddings

    def _encode(self, category: str) -> TextEmbeddings:
        normal = self.prompts.normal_sentences(category)
        abnormal = self.prompts.abnormal_sentences(category)
        encoded = encode_sentences(self.backbone, normal + abnormal)
        embeddings = TextEmbeddings.from_sentence_embeddings(encoded[: len(normal)], encoded[len(normal):])
        if self.use_disk:
            self._save(category, embeddings)
        return embeddings

    def _save(self, category: str, embeddings: TextEmbeddings) -> None:
        path = self.path(category)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename so a crash or a parallel process never leaves a half-written file.
            handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(handle)
            save_file({"states": embeddings.states.contiguous(), "sentences": embeddings.sentences.contiguous()},
                      tmp, metadata=self.key(category))
            os.replace(tmp, path)
        except OSError as error:
            log.warning("could not write text-embedding cache %s (%s); continuing without it", path, error)
