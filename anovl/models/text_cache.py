"""Text embeddings of the state prompts, cached on disk in safetensors (never pickle).

The cache key covers the backbone, a fingerprint of its weights, the sentences and the tokenizer (the
model's own, a local directory's by its files, or any other callable by the token ids it gives), so a
change in any of them re-encodes instead of reusing stale embeddings; an entry whose recorded key, shape or dtype does not
match (another entry's file copied over it, say) is re-encoded too. The cache is an optimisation: any error
writing it (a full disk, a read-only folder) is a warning and the run goes on; a write goes through a
temporary file that is removed whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import safe_open
from safetensors.torch import save_file

from anovl.backbones import Backbone
from anovl.backbones.tokenizers import KnownTokenizer
from anovl.cache import cache_root
from anovl.io import make_folder, write_file
from anovl.io.safe_names import safe_component

log = logging.getLogger(__name__)
CACHE_FORMAT = 3


def default_cache_dir() -> Path:
    return cache_root() / "text_embeddings"


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


PROGRESS_AFTER_S = 2.0  # an encoding that is still running after this long shows a progress bar


class DelayedProgress:
    """A progress bar (rich, on stderr) that appears only once the work has taken ``delay`` seconds, so quick
    work prints nothing; only on the first process of a distributed run (``RANK`` / ``LOCAL_RANK`` 0)."""

    def __init__(self, description: str, total: int, delay: float | None = None):
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self.task = self.progress.add_task(description, total=total)
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(PROGRESS_AFTER_S if delay is None else delay, self._show)
        self._timer.daemon = True

    def _show(self) -> None:
        with self._lock:
            if not self._done:
                self.progress.start()

    def advance(self, amount: int) -> None:
        self.progress.advance(self.task, amount)

    def __enter__(self) -> "DelayedProgress":
        if all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK")):
            self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._done = True
            if self.progress.live.is_started:
                self.progress.stop()


@torch.no_grad()
def encode_sentences(backbone: Backbone, sentences: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unnormalised CLIP text embeddings, (len(sentences), D) in float32 on the CPU; a progress bar appears
    when this takes more than a few seconds (a large text tower on a CPU)."""
    device = next(backbone.clip.parameters()).device
    chunks = []
    description = f"Encoding {len(sentences)} prompt sentences ({backbone.name}; cached afterwards)"
    with DelayedProgress(description, len(sentences)) as progress:
        for start in range(0, len(sentences), batch_size):
            tokens = backbone.tokenizer(sentences[start : start + batch_size]).to(device)
            chunks.append(backbone.clip.encode_text(tokens).float().cpu())
            progress.advance(len(tokens))
    return torch.cat(chunks)


class TextEmbeddingCache:
    """Encodes prompt sentences once and keeps the result in memory and on disk.

    Entries are keyed by the backbone, its weights and the sentences themselves, so any method's prompts
    share it. The disk holds the unnormalised sentence embeddings; :meth:`get` turns a normal and an
    abnormal list into :class:`TextEmbeddings` the AnoVL way (docs/METHOD.md §3).
    """

    def __init__(self, backbone: Backbone, cache_dir: str | os.PathLike | None = None, use_disk: bool = True):
        self.backbone = backbone
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.use_disk = use_disk
        self._memory: dict[tuple[tuple[str, ...], tuple[str, ...]], TextEmbeddings] = {}
        self._on_device: dict[tuple, TextEmbeddings] = {}  # copies moved once per device, not per batch
        self._token_digests: dict[tuple[str, ...], str] = {}  # of callables that are not KnownTokenizers
        self._hit_logged = False  # the first read from disk is logged, the others would only repeat it
        self._text_width: int | None = None

    def key(self, sentences: Sequence[str]) -> dict[str, str]:
        return {
            "format": str(CACHE_FORMAT),
            "backbone": self.backbone.name,
            "weights": self.backbone.weights_fingerprint,
            "sentences": hashlib.sha256(json.dumps(list(sentences)).encode()).hexdigest(),
            "tokenizer": self._tokenizer_key(sentences),
            "count": str(len(sentences)),
        }

    def _tokenizer_key(self, sentences: Sequence[str]) -> str:
        """The tokenizer's fingerprint, or a hash of the token ids it gives (tokenizing is cheap next to encoding)."""
        tokenizer = self.backbone.tokenizer
        if isinstance(tokenizer, KnownTokenizer):
            return tokenizer.fingerprint
        sentences = tuple(sentences)
        if sentences not in self._token_digests:
            ids = torch.as_tensor(tokenizer(list(sentences))).cpu()
            self._token_digests[sentences] = (
                "ids:" + hashlib.sha256(f"{tuple(ids.shape)}{ids.dtype}".encode() + ids.numpy().tobytes()).hexdigest()
            )
        return self._token_digests[sentences]

    def path(self, sentences: Sequence[str]) -> Path:
        digest = hashlib.sha256(json.dumps(self.key(sentences), sort_keys=True).encode()).hexdigest()[:24]
        return self.cache_dir / f"{safe_component(self.backbone.name)[:64]}-{digest}.safetensors"

    def weights_changed(self) -> None:
        """Key the cache to the backbone's current weights and forget what the old ones gave.

        Files of the old weights stay on disk: their names carry that weights' fingerprint.
        """
        self.backbone.refresh_fingerprint()
        self._memory.clear()
        self._on_device.clear()

    def sentence_embeddings(self, sentences: Sequence[str]) -> torch.Tensor:
        """Unnormalised text embeddings (len(sentences), D), float32 on the CPU: from disk, or encoded and saved."""
        sentences = list(sentences)
        embeddings = self._load(sentences)
        if embeddings is not None and not self._hit_logged:
            self._hit_logged = True
            log.info(
                "text embeddings read from the cache in %s (not encoded again; later reads are not logged)",
                self.cache_dir,
            )
        if embeddings is None:
            embeddings = encode_sentences(self.backbone, sentences)
            if self.use_disk:
                self._save(sentences, embeddings)
        return embeddings

    def get(self, normal: Sequence[str], abnormal: Sequence[str], device: torch.device | str = "cpu") -> TextEmbeddings:
        """State and per-sentence embeddings of the normal and abnormal sentences on ``device`` (encoded once)."""
        memory_key = (tuple(normal), tuple(abnormal))
        if memory_key not in self._memory:
            encoded = self.sentence_embeddings([*normal, *abnormal])
            self._memory[memory_key] = TextEmbeddings.from_sentence_embeddings(
                encoded[: len(normal)], encoded[len(normal) :]
            )
        if torch.device(device).type == "cpu":
            return self._memory[memory_key]
        key = (memory_key, str(device))
        if key not in self._on_device:
            embeddings = self._memory[memory_key]
            self._on_device[key] = TextEmbeddings(embeddings.states.to(device), embeddings.sentences.to(device))
        return self._on_device[key]

    def _load(self, sentences: list[str]) -> torch.Tensor | None:
        path = self.path(sentences)
        if not self.use_disk or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                embeddings = handle.get_tensor("embeddings")
        except Exception as error:  # noqa: BLE001 - any unreadable entry (hostile or damaged) is just re-encoded
            log.warning("ignoring unreadable text-embedding cache %s (%s); re-encoding", path, error)
            return None
        if (
            metadata != self.key(sentences)
            or embeddings.ndim != 2
            or embeddings.shape[0] != len(sentences)
            or embeddings.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or embeddings.shape[1] != self._width()
        ):
            log.warning(
                "ignoring text-embedding cache %s: it holds other sentences, shapes or dtypes; re-encoding", path
            )
            return None
        if not torch.isfinite(embeddings).all():
            log.warning("ignoring text-embedding cache %s: it holds NaN or infinite values; re-encoding", path)
            return None
        return embeddings.float()

    def _width(self) -> int:
        """The width of this backbone's text embeddings, which an entry read from disk must have: the joint
        space's (the visual tower's output), else one short sentence encoded, once."""
        if self._text_width is None:
            width = getattr(getattr(self.backbone.clip, "visual", None), "output_dim", None)
            self._text_width = (
                int(width) if isinstance(width, int) else int(encode_sentences(self.backbone, ["a photo"]).shape[1])
            )
        return self._text_width

    def _save(self, sentences: list[str], embeddings: torch.Tensor) -> None:
        path = self.path(sentences)
        try:
            # Atomic and never through a link (anovl.io), so a crash or a parallel process never leaves a
            # half-written file.
            make_folder(path.parent)
            write_file(
                path,
                lambda target: save_file(
                    {"embeddings": embeddings.contiguous()}, str(target), metadata=self.key(sentences)
                ),
                self.cache_dir,
            )
        except Exception as error:  # noqa: BLE001 - the cache is optional: no write error may stop a run
            log.warning(
                "could not write text-embedding cache %s (%s: %s); continuing without it",
                path,
                type(error).__name__,
                error,
            )
