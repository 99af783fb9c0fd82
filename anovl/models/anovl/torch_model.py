"""AnoVL as a plain PyTorch module: frozen CLIP + V-V path + state prompts (+ optional TTA)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from anovl import categories as category_registry
from anovl.errors import AnovlError
from anovl.models.anovl.maps import anomaly_map, image_score
from anovl.models.anovl.prompts import PromptSet
from anovl.models.anovl.tta import TestTimeAdaptation, TTAConfig
from anovl.models.anovl.views import NUM_REFERENCE_VIEWS, make_views
from anovl.models.base import ModelOutput
from anovl.models.clip_model import CLIPAnomalyModel
from anovl.models.text_cache import TextEmbeddings

CPU_ENCODER_CHUNK = 32  # on CPU, passes of 32 beat one pass of 16×22 views by ~1.4× (docs/benchmarks.md)


REFERENCE_BACKBONE = ("ViT-B-16-plus-240", "laion400m_e32", 240)  # METHOD §1: the authors' default


@dataclass
class AnoVLOutput(ModelOutput):
    """``anomaly_map`` (B, S, S): abnormal probability per pixel (after TTA when enabled); ``pred_score`` (B,):
    mean abnormal probability of the global token over views; and AnoVL's intermediate results."""

    patch_tokens: list[torch.Tensor]  # per requested layer, (B, N, D) V-V patch tokens (before TTA)
    global_tokens: torch.Tensor  # (B, D) CLIP image embedding of the identity view
    text_states: torch.Tensor  # (B, 2, D) normalised [normal, abnormal] text embeddings
    tfa_map: torch.Tensor | None = None  # (B, S, S) training-free map, kept when TTA changed the map


def image_seeds(images: torch.Tensor, base_seed: int) -> list[int]:
    """A seed per image from its content, so TTA randomness follows the image, not its batch slot."""
    seeds = []
    for image in images.detach().float().cpu():
        digest = hashlib.blake2b(image.numpy().tobytes(), digest_size=8, key=str(base_seed).encode())
        seeds.append(int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1))
    return seeds


def _plain(value: Any) -> Any:
    """Tuples as lists, so that settings compare equal to their JSON round trip (results.json)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class AnoVL(CLIPAnomalyModel):
    """Zero-shot anomaly localisation with a frozen CLIP (METHOD §2–5).

    Args:
        backbone, pretrained, image_size, init_seed, tokenizer, cache_dir, use_text_cache: the frozen CLIP
            (see :class:`~anovl.models.clip_model.CLIPAnomalyModel`).
        num_views: views averaged into the image score (22 = reference, 1 = identity only).
        layers: blocks whose V-V patch tokens make the map (averaged); the reference uses the last.
        prompts: prompt set (default: the reference one).
        tta: test-time adaptation settings, or None for training-free AnoVL.
        encoder_chunk_size: most images (views) per encoder pass; None picks by device: all views of the
            batch in one pass on GPUs, chunks of 32 on CPUs (where large passes lose cache locality).
    """

    method = "AnoVL"
    batch_extras = ("corrupted_image",)

    def __init__(
        self,
        backbone: str = "ViT-B-16-plus-240",
        pretrained: str | None = "laion400m_e32",
        image_size: int | None = None,
        num_views: int = NUM_REFERENCE_VIEWS,
        layers: Sequence[int] = (-1,),
        prompts: PromptSet | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_text_cache: bool = True,
        tta: TTAConfig | None = None,
        encoder_chunk_size: int | None = None,
        init_seed: int = 0,
        tokenizer: str | os.PathLike | None = None,
    ):
        if not 1 <= num_views <= NUM_REFERENCE_VIEWS:
            raise AnovlError(f"num_views must be between 1 and {NUM_REFERENCE_VIEWS}, got {num_views}")
        if not layers:
            raise AnovlError("layers must name at least one block, e.g. [-1] (the reference: the last block)")
        super().__init__(backbone, pretrained, image_size, init_seed, tokenizer, cache_dir, use_text_cache)
        self.num_views = num_views
        self.layers = tuple(layers)
        for layer in self.layers:
            if not -self.encoder.num_layers <= layer < self.encoder.num_layers:
                raise AnovlError(f"layer {layer} out of range for {self.backbone_name} with "
                                 f"{self.encoder.num_layers} blocks")
        self.prompts = prompts or PromptSet()
        self._sentences: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
        self.tta_config = tta
        self.tta = TestTimeAdaptation(tta) if tta is not None else None
        if encoder_chunk_size is not None and encoder_chunk_size < 1:
            raise AnovlError(f"encoder_chunk_size must be at least 1 (or None for automatic), got {encoder_chunk_size}")
        self.encoder_chunk_size = encoder_chunk_size
        self.stage_timer: Callable[[str], contextlib.AbstractContextManager] | None = None  # for benchmarks

    @property
    def variant(self) -> str:
        """``tfa`` (training-free) or ``tta-<adapter>``; the label adds the TTA settings that differ."""
        return "tfa" if self.tta_config is None else f"tta-{self.tta_config.adapter}"

    @property
    def order_dependent(self) -> bool:
        return self.tta_config is not None and self.tta_config.mode == "reference"

    def start_category(self, category: str) -> None:
        # Reference-mode TTA carries its optimiser over within a category only.
        if self.tta is not None:
            self.tta.reset()

    def settings(self) -> dict[str, Any]:
        return _plain({
            **self.backbone_settings(), "num_views": self.num_views,
            "layers": list(self.layers), "prompts": self.prompts.to_dict(),
            "tta": asdict(self.tta_config) if self.tta_config is not None else None,
        })

    def reference_settings(self) -> dict[str, Any]:
        backbone, pretrained, image_size = REFERENCE_BACKBONE
        # A TTA run is compared with the reference TTA of its own adapter, which the variant already names.
        tta = TTAConfig(adapter=self.tta_config.adapter) if self.tta_config is not None else None
        return _plain({
            "backbone": backbone, "pretrained": pretrained, "image_size": image_size, "init_seed": None,
            "num_views": NUM_REFERENCE_VIEWS, "layers": [-1], "prompts": PromptSet().to_dict(),
            "tta": asdict(tta) if tta is not None else None,
        })

    def _stage(self, name: str) -> contextlib.AbstractContextManager:
        """Context around one stage of ``forward``; ``stage_timer`` (name → context manager) times them."""
        return self.stage_timer(name) if self.stage_timer is not None else contextlib.nullcontext()

    def text_embeddings(self, category: str, prompt_name: str | None = None,
                        device: torch.device | str = "cpu") -> TextEmbeddings:
        """State and per-sentence text embeddings of a category (cached). The sentences name ``prompt_name``
        (default: :mod:`anovl.categories`' name for the category) in the category's domain phrases."""
        name = prompt_name if prompt_name is not None else category_registry.prompt_name(category)
        key = (name, category_registry.domain(category))
        if key not in self._sentences:
            self._sentences[key] = (self.prompts.normal_sentences(*key), self.prompts.abnormal_sentences(*key))
        return self.text_cache.get(*self._sentences[key], device=device)

    def forward(self, images: torch.Tensor, categories: Sequence[str], prompt_names: Sequence[str] | None = None,
                corrupted_image: torch.Tensor | None = None, seeds: Sequence[int] | None = None) -> AnoVLOutput:
        """Anomaly maps and scores for CLIP-normalised ``images`` (B, 3, S, S) of the given categories.

        ``prompt_names`` (default: from :mod:`anovl.categories`) are the object names the prompts use;
        the domain phrases follow the category. ``corrupted_image`` feeds TTA's corrupted branch when
        ``tta.corruption == 'image'``; ``seeds`` (one per image) fix TTA's randomness, by default derived
        from the image content.
        """
        images, prompt_names = self.check_inputs(images, categories, prompt_names)
        batch = images.shape[0]
        with self._stage("text"):
            embeddings = [self.text_embeddings(category, name, images.device)
                          for category, name in zip(categories, prompt_names)]
            states = torch.stack([e.states for e in embeddings])
        chunk_size = self.encoder_chunk_size or (None if images.is_cuda else CPU_ENCODER_CHUNK)
        with torch.no_grad():
            with self._stage("views"):
                views = make_views(images, self.num_views)
            with self._stage("encoder"):
                encoded = self.encoder(views, num_local=batch, layers=self.layers, chunk_size=chunk_size)
            with self._stage("maps"):
                states = states.to(encoded.global_tokens.dtype)
                maps = torch.stack([anomaly_map(t, states, self.image_size) for t in encoded.patch_tokens]).mean(0)
                scores = image_score(encoded.global_tokens, states)
        tfa_map = None
        if self.tta is not None:
            with self._stage("tta"):
                corrupted = None
                if self.tta.config.corruption == "image" and corrupted_image is not None:
                    with torch.no_grad():
                        corrupted = self.encoder(corrupted_image, layers=self.layers,
                                                 chunk_size=chunk_size).patch_tokens
                tfa_map = maps
                sentences = (embeddings[0].sentences.expand(batch, -1, -1)
                             if all(e is embeddings[0] for e in embeddings)
                             else torch.stack([e.sentences for e in embeddings]))  # (B, M, D), a view if it can
                seeds = list(seeds) if seeds is not None else image_seeds(images, self.tta.config.seed)
                adapted = [
                    self.tta(tokens, states, sentences, seeds, list(categories),
                             None if corrupted is None else corrupted[index])
                    for index, tokens in enumerate(encoded.patch_tokens)
                ]
                maps = torch.stack([anomaly_map(t, states.float(), self.image_size) for t in adapted]).mean(0)
        return AnoVLOutput(
            anomaly_map=maps,
            pred_score=scores,
            patch_tokens=encoded.patch_tokens,
            global_tokens=encoded.global_tokens[:batch],
            text_states=states,
            tfa_map=tfa_map,
        )
