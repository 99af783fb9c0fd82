"""AnoVL as a plain PyTorch module: frozen CLIP + V-V path + state prompts (+ optional TTA)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from anovl.data.transforms import split_tiles, stitch_tiles
from anovl.errors import AnovlError
from anovl.models.anovl.export import ExportableAnoVL
from anovl.models.anovl.prompts import PromptSet
from anovl.models.anovl.tta import TestTimeAdaptation, TTAConfig, recorded_settings
from anovl.models.anovl.views import NUM_REFERENCE_VIEWS, make_views
from anovl.models.base import ModelOutput, json_data
from anovl.models.clip_model import CLIPAnomalyModel
from anovl.models.components.scoring import layer_mean_map, maps_and_scores, stitched_pixel_logits
from anovl.models.components.tiling import tile_batch, untile
from anovl.models.registry import register_method

CPU_ENCODER_CHUNK = 32  # on CPU, passes of 32 beat one pass of 16×22 views by ~1.4× (docs/benchmarks.md)


REFERENCE_BACKBONE = ("ViT-B-16-plus-240", "laion400m_e32", 240)  # docs/METHOD.md §1: the authors' default
WIDE_IMAGE_MODES = ("visa-reference", "separate-tiles")
WideImages = Literal["visa-reference", "separate-tiles"]


@dataclass
class AnoVLOutput(ModelOutput):
    """``anomaly_map`` (B, H, W): abnormal probability per pixel (after TTA when enabled); ``pred_score`` (B,):
    mean abnormal probability of the global token over views (over tiles for wide images); and AnoVL's
    intermediate results. For S×W images cut into n tiles the tokens are per tile, in tile order."""

    patch_tokens: list[torch.Tensor]  # per requested layer, (B, N, D) V-V patch tokens (before TTA); (B, n·N, D)
    global_tokens: torch.Tensor  # (B, D) CLIP image embedding of the identity view; (B, n, D) of the tiles
    text_states: torch.Tensor  # (B, 2, D) normalised [normal, abnormal] text embeddings
    tfa_map: torch.Tensor | None = None  # (B, H, W) training-free map, kept when TTA changed the map


def image_seeds(images: torch.Tensor, base_seed: int) -> list[int]:
    """A seed per image from its content, so TTA randomness follows the image, not its batch slot."""
    seeds = []
    for image in images.detach().float().cpu():
        digest = hashlib.blake2b(image.numpy().tobytes(), digest_size=8, key=str(base_seed).encode())
        seeds.append(int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1))
    return seeds


@register_method("anovl")
class AnoVL(CLIPAnomalyModel):
    """Zero-shot anomaly localisation with a frozen CLIP (docs/METHOD.md §2–5).

    Args:
        backbone, pretrained, image_size, init_seed, tokenizer, cache_dir, use_text_cache: the frozen CLIP
            (see :class:`~anovl.models.clip_model.CLIPAnomalyModel`).
        num_views: views averaged into the image score (22 = reference, 1 = identity only); of square images,
            and of each tile of wide images in ``wide_images='separate-tiles'``.
        layers: blocks whose V-V patch tokens make the map (averaged); the reference uses the last.
        prompts: prompt set (default: the reference one).
        tta: test-time adaptation settings, or None for training-free AnoVL.
        encoder_chunk_size: most images (views) per encoder pass; None picks by device: all views of the
            batch in one pass on GPUs, chunks of 32 on CPUs (where large passes lose cache locality).
        wide_images: how S×W images (VisA's tile mode, W > S) are run. ``visa-reference`` (the
            authors' VisA run, METHOD §8): cut into square tiles (left [0, S), right [W−S, W)); image score =
            the tiles' mean global-token probability, without views; maps stitched, overlap averaged; TTA
            adapts one adapter per image, shared by its tiles, with the loss on the stitched per-pixel
            logits. ``separate-tiles``: each tile runs as a square image of its own (``num_views`` views,
            its own adapter and loss, seeded from the tile), maps stitched and scores averaged.
    """

    method = "AnoVL"
    batch_extras = ("corrupted_image",)
    handles_wide_images = True  # METHOD §8 adapts an image's tiles together, which separate tiles cannot

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
        wide_images: WideImages = "visa-reference",
    ):
        if wide_images not in WIDE_IMAGE_MODES:
            raise AnovlError(f"wide_images must be one of {WIDE_IMAGE_MODES}, got {wide_images!r}")
        if not 1 <= num_views <= NUM_REFERENCE_VIEWS:
            raise AnovlError(f"num_views must be between 1 and {NUM_REFERENCE_VIEWS}, got {num_views}")
        if not layers:
            raise AnovlError("layers must name at least one block, e.g. [-1] (the reference: the last block)")
        super().__init__(backbone, pretrained, image_size, init_seed, tokenizer, cache_dir, use_text_cache)
        self.num_views = num_views
        self.wide_images = wide_images
        self.layers = tuple(layers)
        for layer in self.layers:
            if not -self.encoder.num_layers <= layer < self.encoder.num_layers:
                raise AnovlError(
                    f"layer {layer} out of range for {self.backbone_name} with {self.encoder.num_layers} blocks"
                )
        self.prompts = prompts or PromptSet()
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
        return json_data(
            {
                **self.backbone_settings(),
                "num_views": self.num_views,
                "layers": list(self.layers),
                "prompts": self.prompts.to_dict(),
                "tta": recorded_settings(self.tta_config),
                "wide_images": self.wide_images,
            }
        )

    def reference_settings(self) -> dict[str, Any]:
        backbone, pretrained, image_size = REFERENCE_BACKBONE
        # A TTA run is compared with the reference TTA of its own adapter, which the variant already names.
        tta = TTAConfig(adapter=self.tta_config.adapter) if self.tta_config is not None else None
        return json_data(
            {
                "backbone": backbone,
                "pretrained": pretrained,
                "image_size": image_size,
                "init_seed": None,
                "num_views": NUM_REFERENCE_VIEWS,
                "layers": [-1],
                "prompts": PromptSet().to_dict(),
                "tta": recorded_settings(tta),
                "wide_images": "visa-reference",
            }
        )

    def _stage(self, name: str) -> contextlib.AbstractContextManager:
        """Context around one stage of ``forward``; ``stage_timer`` (name → context manager) times them."""
        return self.stage_timer(name) if self.stage_timer is not None else contextlib.nullcontext()

    def export_module(self, classes: Sequence[tuple[str, str | None]], num_views: int | None = None) -> ExportableAnoVL:
        """The export hook of ``anovl export``: the training-free forward for ``classes`` ((category, prompt name),
        in class-index order) with their state embeddings baked in; ``num_views`` defaults to the model's."""
        if self.tta is not None:
            raise AnovlError(
                "test-time adaptation trains an adapter on every image and cannot be exported; export the "
                "training-free model (remove model.init_args.tta from the config)"
            )
        states = torch.stack(
            [self.text_states(category, prompt_name).states.float().cpu() for category, prompt_name in classes]
        )
        return ExportableAnoVL(
            self.encoder, states, self.image_size, self.num_views if num_views is None else num_views, self.layers
        ).eval()

    def forward(
        self,
        images: torch.Tensor,
        categories: Sequence[str],
        prompt_names: Sequence[str] | None = None,
        corrupted_image: torch.Tensor | None = None,
        seeds: Sequence[int] | None = None,
    ) -> AnoVLOutput:
        """Anomaly maps and scores for CLIP-normalised ``images`` (B, 3, S, S) of the given categories, or
        (B, 3, S, W) images (W > S) cut into tiles as ``wide_images`` says.

        ``prompt_names`` (default: from :mod:`anovl.categories`) are the object names the prompts use;
        the domain phrases follow the category. ``corrupted_image`` feeds TTA's corrupted branch when
        ``tta.corruption == 'image'``; ``seeds`` (one per image) fix TTA's randomness, by default derived
        from the image content (in ``separate-tiles`` mode: from each tile's, or the image's given seed).
        """
        images, prompt_names = self.check_inputs(images, categories, prompt_names)
        if images.shape[-2] != images.shape[-1] and self.wide_images == "separate-tiles":
            return self._separate_tiles(images, list(categories), prompt_names, corrupted_image, seeds)
        return self._run(images, list(categories), prompt_names, corrupted_image, seeds)

    def _separate_tiles(self, images, categories, prompt_names, corrupted_image, seeds) -> AnoVLOutput:
        """Every tile as a square image of its own; maps stitched, scores averaged over the tiles."""
        batch, (height, width) = images.shape[0], images.shape[-2:]
        tiles, count, per_tile = tile_batch(
            images, categories=categories, prompt_names=prompt_names, corrupted_image=corrupted_image, seeds=seeds
        )
        output = self._run(tiles, **per_tile)
        anomaly_map, pred_score = untile(output.anomaly_map, output.pred_score, height, width)
        return AnoVLOutput(
            anomaly_map=anomaly_map,
            pred_score=pred_score,
            patch_tokens=[tokens.reshape(batch, -1, tokens.shape[-1]) for tokens in output.patch_tokens],
            global_tokens=output.global_tokens.reshape(batch, count, -1),
            text_states=output.text_states[::count],
            tfa_map=None if output.tfa_map is None else stitch_tiles(output.tfa_map, height, width),
        )

    def _run(self, images, categories, prompt_names, corrupted_image, seeds) -> AnoVLOutput:
        """Square images (METHOD §4–5), or wide images as the VisA reference run (METHOD §8): the n tiles of an
        image share its text states, its score (their mean, no views) and, under TTA, one adapter."""
        batch, (height, width) = images.shape[0], images.shape[-2:]
        wide = height != width
        tiles = split_tiles(images) if wide else images
        count = tiles.shape[0] // batch
        size = self.image_size
        with self._stage("text"):
            embeddings = [
                self.text_states(category, name, images.device) for category, name in zip(categories, prompt_names)
            ]
            states = torch.stack([e.states for e in embeddings])
        chunk_size = self.encoder_chunk_size or (None if images.is_cuda else CPU_ENCODER_CHUNK)

        def stitched(maps: torch.Tensor) -> torch.Tensor:
            """Each tile's map (B·n, S, S), stitched: (B, H, W)."""
            return stitch_tiles(maps, height, width) if wide else maps

        with torch.no_grad():
            with self._stage("views"):
                views = make_views(tiles, 1 if wide else self.num_views)  # the VisA run has no views (METHOD §8)
            with self._stage("encoder"):
                encoded = self.encoder(views, num_local=batch * count, layers=self.layers, chunk_size=chunk_size)
            with self._stage("maps"):
                states = states.to(encoded.global_tokens.dtype)
                tile_states = states.repeat_interleave(count, dim=0)
                maps, tile_scores = maps_and_scores(encoded.patch_tokens, encoded.global_tokens, tile_states, size)
                maps, scores = stitched(maps), tile_scores.view(batch, count).mean(1)
        # An image's tiles one after another: what one adapter per image adapts.
        patch_tokens = [tokens.reshape(batch, -1, tokens.shape[-1]) for tokens in encoded.patch_tokens]
        tfa_map = None
        if self.tta is not None:
            with self._stage("tta"):
                corrupted = None
                if self.tta.config.corruption == "image" and corrupted_image is not None:
                    corrupted_tiles = split_tiles(corrupted_image) if wide else corrupted_image
                    with torch.no_grad():
                        corrupted = [
                            tokens.reshape(batch, -1, tokens.shape[-1])
                            for tokens in self.encoder(
                                corrupted_tiles, layers=self.layers, chunk_size=chunk_size
                            ).patch_tokens
                        ]
                tfa_map = maps
                sentences = (
                    embeddings[0].sentences.expand(batch, -1, -1)
                    if all(e is embeddings[0] for e in embeddings)
                    else torch.stack([e.sentences for e in embeddings])
                )  # (B, M, D), a view if it can
                seeds = list(seeds) if seeds is not None else image_seeds(images, self.tta.config.seed)
                pixel_logits = (
                    functools.partial(stitched_pixel_logits, image_size=size, height=height, width=width)
                    if wide
                    else None
                )
                adapted = [
                    self.tta(
                        tokens,
                        states,
                        sentences,
                        seeds,
                        categories,
                        None if corrupted is None else corrupted[index],
                        pixel_logits,
                    )
                    for index, tokens in enumerate(patch_tokens)
                ]
                maps = stitched(
                    layer_mean_map(
                        [t.reshape(batch * count, -1, t.shape[-1]) for t in adapted], tile_states.float(), size
                    )
                )
        global_tokens = encoded.global_tokens[: batch * count]  # of the identity views
        return AnoVLOutput(
            anomaly_map=maps,
            pred_score=scores,
            patch_tokens=patch_tokens,
            global_tokens=global_tokens.reshape(batch, count, -1) if wide else global_tokens,
            text_states=states,
            tfa_map=tfa_map,
        )
