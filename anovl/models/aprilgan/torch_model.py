"""APRIL-GAN (Chen, Han, Zhang: "APRIL-GAN: A Zero-/Few-Shot Anomaly Classification and Segmentation Method",
VAND challenge at CVPR 2023), as the authors' code computes it (docs/METHOD.md, APRIL-GAN).

The frozen CLIP's residual stream after selected blocks (1-based, e.g. 6/12/18/24 of ViT-L) goes through one
trained linear projection per block into the text space. Per block, each patch token's cosine similarities
to the normalised [normal, abnormal] text states, times 100, are resized bilinearly (corners aligned) to the
input and turned into probabilities by a softmax over the two states; the anomaly map is the sum over the
blocks of the abnormal probability. The image score is ``softmax(100 · cos(image embedding, states))[1]``.
Training (``anovl fit``) minimises, per block, the focal loss of the two-state probabilities plus the Dice loss
of the abnormal one against the ground-truth mask.

Few-shot: the raw tokens of k normal images per category, after the few-shot blocks, form a memory bank; a
patch's distance is ``min over the bank of (1 - cos)``, resized like the zero-shot maps and summed over the
blocks, and added to the zero-shot map.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anovl.data.image_io import is_image_file, load_rgb
from anovl.data.transforms import normalize, resize_image
from anovl.errors import AnovlError
from anovl.models.aprilgan.prompts import AprilGANPrompts
from anovl.models.base import ModelOutput
from anovl.models.clip_model import CLIPAnomalyModel
from anovl.models.components.losses import softmax_focal_dice
from anovl.models.components.scoring import block_sum
from anovl.models.registry import register_method

LOGIT_SCALE = 100.0  # the authors' fixed scale of cosine similarities (not the CLIP's logit_scale)
# The authors' published zero-shot setting (train.sh / test_zero_shot.sh).
REFERENCE_SETTINGS = {
    "backbone": "ViT-L-14-336",
    "pretrained": "openai",
    "image_size": 518,
    "init_seed": None,
    "layers": [6, 12, 18, 24],
    "few_shot": None,
    "prompts": AprilGANPrompts().to_dict(),
}


@dataclass
class AprilGANOutput(ModelOutput):
    """``anomaly_map`` (B, S, S) and ``pred_score`` (B,), plus the parts."""

    layer_probabilities: list[torch.Tensor]  # per block, (B, 2, S, S) [normal, abnormal] probabilities
    few_shot_map: torch.Tensor | None  # (B, S, S) memory-bank distance summed over the few-shot blocks
    text_states: torch.Tensor  # (B, 2, D) normalised [normal, abnormal] text embeddings


def _check_layers(layers: Sequence[int], num_layers: int, what: str) -> tuple[int, ...]:
    layers = tuple(layers)
    if (
        not layers
        or any(not isinstance(layer, int) or not 1 <= layer <= num_layers for layer in layers)
        or len(set(layers)) != len(layers)
    ):
        raise AnovlError(
            f"{what} must be distinct block numbers from 1 to {num_layers} (the tower's depth), "
            f"counted from 1 as the authors do (e.g. 6, 12, 18, 24 for ViT-L), got {list(layers)}"
        )
    return layers


@register_method("aprilgan")
class AprilGAN(CLIPAnomalyModel):
    """APRIL-GAN on a frozen CLIP, zero-shot with trained heads, optionally few-shot (see the module docstring).

    Args:
        backbone, pretrained, image_size, init_seed, tokenizer, cache_dir, use_text_cache: the frozen CLIP
            (:class:`~anovl.models.clip_model.CLIPAnomalyModel`); defaults are the authors' ViT-L-14-336
            (OpenAI weights) at 518 px. ``init_seed`` also seeds the heads' initial weights.
        layers: blocks (1-based) whose tokens the heads project (authors: 6, 12, 18, 24).
        checkpoint: trained heads to load: an ``anovl fit`` checkpoint (``.ckpt``) or the authors' release
            (a ``.pth`` holding ``trainable_linearlayer``, their ``LinearLayer`` state dict).
        few_shot_layers: blocks whose raw tokens form the few-shot memory bank (authors: the same as
            ``layers``); used once :meth:`remember` has given a category normal images.
        few_shot_images: few-shot from a run (``anovl test``): a folder of each category's normal images, with
            ``{category}`` in its path (e.g. ``data/mvtec/{category}/train/good``); ``k_shot`` of them, drawn
            with ``few_shot_seed``, become the category's memory bank when its first images come.
        lr, betas: Adam's settings for ``anovl fit`` (authors: 1e-3, (0.5, 0.999)).
        prompts: the prompt ensemble (default: the authors').
    """

    method = "APRIL-GAN"

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        image_size: int | None = 518,
        layers: Sequence[int] = (6, 12, 18, 24),
        checkpoint: str | os.PathLike | None = None,
        few_shot_layers: Sequence[int] | None = None,
        few_shot_images: str | None = None,
        k_shot: int = 4,
        few_shot_seed: int = 0,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        prompts: AprilGANPrompts | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_text_cache: bool = True,
        init_seed: int = 0,
        tokenizer: str | os.PathLike | None = None,
    ):
        super().__init__(backbone, pretrained, image_size, init_seed, tokenizer, cache_dir, use_text_cache)
        depth = self.encoder.num_layers
        self.layers = _check_layers(layers, depth, "layers")
        self.few_shot_layers = _check_layers(
            few_shot_layers if few_shot_layers is not None else self.layers, depth, "few_shot_layers"
        )
        if (
            not (isinstance(lr, (int, float)) and lr > 0)
            or len(tuple(betas)) != 2
            or not all(0 <= beta < 1 for beta in betas)
        ):
            raise AnovlError(f"lr must be positive and betas two numbers in [0, 1), got lr={lr!r}, betas={betas!r}")
        self.lr, self.betas = float(lr), (float(betas[0]), float(betas[1]))
        if few_shot_images is not None and "{category}" not in str(few_shot_images):
            raise AnovlError(
                f"few_shot_images must contain '{{category}}' (e.g. data/mvtec/{{category}}/train/good), "
                f"got {few_shot_images!r}"
            )
        if not (isinstance(k_shot, int) and k_shot >= 1):
            raise AnovlError(f"k_shot must be a positive number of normal images, got {k_shot!r}")
        self.few_shot_images, self.k_shot, self.few_shot_seed = few_shot_images, k_shot, few_shot_seed
        self.prompts = prompts or AprilGANPrompts()
        self.grid_size = self.encoder.grid_size(self.image_size)
        with torch.no_grad():
            probe = self.encoder.embed(torch.zeros(1, 3, self.image_size, self.image_size, device=self.device))
            width = probe.shape[-1]
            embed_dim = self.encoder.project_local(probe[:, :1]).shape[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.heads = nn.ModuleList(nn.Linear(width, embed_dim) for _ in self.layers).to(self.device)
        self._memory: dict[str, list[torch.Tensor]] = {}  # category → per few-shot block, (M, width) normalised
        self._initial_heads = self.heads_fingerprint()
        self.checkpoint = None
        if checkpoint is not None:
            from anovl.models.checkpoints import load_trained_weights

            load_trained_weights(self, checkpoint)
            self.checkpoint = str(checkpoint)

    # ----------------------------------------------------------------- settings

    def weights_loaded(self) -> None:
        super().weights_loaded()
        self._memory.clear()

    def settings(self) -> dict[str, Any]:
        few_shot: dict[str, Any] | None = None
        if self.few_shot_images is not None:
            # Known before any category's bank is drawn (a run records its settings when it starts).
            few_shot = {"layers": list(self.few_shot_layers), "shots": self.k_shot, "seed": self.few_shot_seed}
        elif self._memory:
            shots = sorted({len(bank[0]) // self.grid_size**2 for bank in self._memory.values()})
            few_shot = {"layers": list(self.few_shot_layers), "shots": shots[0] if len(shots) == 1 else shots}
        return {
            **self.backbone_settings(),
            "layers": list(self.layers),
            "few_shot": few_shot,
            "prompts": self.prompts.to_dict(),
            "heads": self.heads_fingerprint(),
        }

    def reference_settings(self) -> dict[str, Any]:
        # Trained or loaded heads differ from the seeded initial ones: their fingerprint goes into the label, so
        # that runs of two trainings get two labels (compare, grid, W&B).
        return {**REFERENCE_SETTINGS, "heads": self._initial_heads}

    @property
    def variant(self) -> str:
        return "few-shot" if self.scores_need_category else ""

    @property
    def map_range(self) -> float:
        # A probability per block, plus a distance 1 - cos in [0, 2] per few-shot block.
        return float(len(self.layers) + (2 * len(self.few_shot_layers) if self.scores_need_category else 0))

    def heads_fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.heads.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ----------------------------------------------------------------- training interface

    def trained_module(self) -> nn.Module:
        return self.heads

    def training_settings(self) -> dict[str, Any]:
        return {"optimizer": "Adam", "lr": self.lr, "betas": list(self.betas)}

    def foreign_trained_state(self, data: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The authors' release: ``{"trainable_linearlayer": LinearLayer state dict}``, keys ``fc.<i>.weight``."""
        state = data.get("trainable_linearlayer")
        if not isinstance(state, dict):
            return None
        return {key.removeprefix("fc."): value for key, value in state.items()}

    def configure_optimizer(self, parameters) -> torch.optim.Optimizer:
        return torch.optim.Adam(parameters, lr=self.lr, betas=self.betas)

    def training_losses(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        categories: Sequence[str],
        prompt_names: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Focal and Dice loss, each summed over the blocks, of one batch of labelled images."""
        images, prompt_names = self.check_inputs(images, categories, prompt_names)
        if masks.shape != (images.shape[0], *images.shape[-2:]):
            raise AnovlError(
                f"masks must be B×S×S like the images, got {tuple(masks.shape)} for {tuple(images.shape)} images"
            )
        with torch.no_grad():
            _, tokens = self.encode(images, self.layers)
        states = self.states(categories, prompt_names, images.device)
        target = (masks > 0.5).to(images.dtype)
        terms = [softmax_focal_dice(self._upsample(logits), target) for logits in self.layer_logits(tokens, states)]
        return {"focal": block_sum(focal for focal, _ in terms), "dice": block_sum(dice for _, dice in terms)}

    # ----------------------------------------------------------------- few-shot

    @torch.no_grad()
    def remember(self, category: str, images: torch.Tensor) -> None:
        """Few-shot: make ``images`` (k normal images of ``category``, CLIP-normalised) its memory bank."""
        images, _ = self.check_inputs(images, [category] * len(images), None)
        _, tokens = self.encode(images, self.few_shot_layers)
        self._memory[category] = [F.normalize(layer.reshape(-1, layer.shape[-1]), dim=-1) for layer in tokens]

    def start_category(self, category: str) -> None:
        if self.few_shot_images is None or category in self._memory:
            return
        folder = Path(str(self.few_shot_images).replace("{category}", category)).expanduser()
        files = sorted(path for path in folder.glob("*") if is_image_file(path)) if folder.is_dir() else []
        if not files:
            raise AnovlError(f"few-shot APRIL-GAN found no normal images of {category!r} in {folder} (few_shot_images)")
        # k draws among the files (with replacement, as the authors draw), from the seed and the category alone.
        generator = torch.Generator().manual_seed(self.few_shot_seed * 1_000_003 + sum(map(ord, category)))
        chosen = [files[int(index)] for index in torch.randint(len(files), (self.k_shot,), generator=generator)]
        size = (self.image_size, self.image_size)
        self.remember(
            category, torch.stack([normalize(resize_image(load_rgb(path), size)) for path in chosen]).to(self.device)
        )

    @property
    def scores_need_category(self) -> bool:
        # Few-shot image scores normalise the map maxima over the whole category (few_shot_image_scores).
        return bool(self._memory) or self.few_shot_images is not None

    def category_scores(self, scores: torch.Tensor, map_maxima: torch.Tensor) -> torch.Tensor:
        return few_shot_image_scores(scores, map_maxima)

    def forget(self) -> None:
        """Back to zero-shot: drop every category's memory bank."""
        self._memory.clear()

    # ----------------------------------------------------------------- inference

    def states(self, categories: Sequence[str], prompt_names: Sequence[str], device: torch.device) -> torch.Tensor:
        """(B, 2, D) normalised [normal, abnormal] embeddings per image: per state, the mean of the normalised
        sentence embeddings, normalised (the authors' ``encode_text_with_prompt_ensemble``; WinCLIP averages the
        unnormalised ones)."""
        rows = []
        for category, name in zip(categories, prompt_names):
            sentences = self.text_states(category, name, device).sentences  # normalised, normal sentences first
            normal = len(self.prompts.normal_sentences(name))
            rows.append(torch.stack([sentences[:normal].mean(0), sentences[normal:].mean(0)]))
        return F.normalize(torch.stack(rows), dim=-1)

    def encode(self, images: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The image embeddings (B, D) and the patch tokens (B, N, width) after each of ``layers`` (1-based, in
        their order): the tower's plain forward, its residual stream unnormalised, as the authors take it."""
        indices = [number - 1 for number in layers]
        embeddings, tokens = self.encoder.forward_intermediates(images, indices, project=False)
        in_block_order = sorted(indices)  # the encoder's order; layers are distinct (_check_layers)
        return embeddings, [tokens[in_block_order.index(index)] for index in indices]

    def _upsample(self, grid_values: torch.Tensor) -> torch.Tensor:
        """(B, N, C) patch values → (B, C, S, S), bilinear with aligned corners as the authors resize."""
        batch, _, channels = grid_values.shape
        grid = grid_values.transpose(1, 2).reshape(batch, channels, self.grid_size, self.grid_size)
        return F.interpolate(grid, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)

    def layer_logits(self, tokens: list[torch.Tensor], states: torch.Tensor) -> list[torch.Tensor]:
        """Per block, [normal, abnormal] logits per patch (B, N, 2) from its patch tokens and the states (B, 2, D)."""
        logits = []
        for head, layer_tokens in zip(self.heads, tokens):
            projected = F.normalize(head(layer_tokens), dim=-1)
            logits.append(LOGIT_SCALE * torch.einsum("bnd,bkd->bnk", projected, states.to(projected.dtype)))
        return logits

    def layer_probabilities(self, tokens: list[torch.Tensor], states: torch.Tensor) -> list[torch.Tensor]:
        """Per block, [normal, abnormal] probabilities (B, 2, S, S): the logits resized, then a softmax."""
        return [self._upsample(logits).softmax(dim=1) for logits in self.layer_logits(tokens, states)]

    def few_shot_map(self, tokens: list[torch.Tensor], categories: Sequence[str]) -> torch.Tensor:
        """(B, S, S): per few-shot block, ``min over the category's bank of (1 - cos)``, resized and summed."""
        maps = []
        for index, category in enumerate(categories):
            bank = self._memory[category]
            distances = [
                1 - (F.normalize(layer[index], dim=-1) @ memory.T).amax(dim=1) for layer, memory in zip(tokens, bank)
            ]
            maps.append(block_sum(self._upsample(distance.view(1, -1, 1))[0, 0] for distance in distances))
        return torch.stack(maps)

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, categories: Sequence[str], prompt_names: Sequence[str] | None = None
    ) -> AprilGANOutput:
        """Anomaly maps (B, S, S) and image scores (B,) of CLIP-normalised ``images`` (B, 3, S, S)."""
        images, prompt_names = self.check_inputs(images, categories, prompt_names)
        few_shot = bool(self._memory)
        if few_shot:
            missing = sorted(set(categories) - set(self._memory))
            if missing:
                raise AnovlError(
                    f"few-shot APRIL-GAN has no normal images of {', '.join(missing)}; give each "
                    "category's with remember(category, images), or forget() all for zero-shot"
                )
        wanted = list(dict.fromkeys([*self.layers, *(self.few_shot_layers if few_shot else ())]))
        image_embeddings, tokens = self.encode(images, wanted)
        by_layer = dict(zip(wanted, tokens))
        states = self.states(categories, prompt_names, images.device)
        probabilities = self.layer_probabilities([by_layer[layer] for layer in self.layers], states)
        anomaly_map = block_sum(p[:, 1] for p in probabilities)
        similarity = torch.einsum("bd,bkd->bk", F.normalize(image_embeddings, dim=-1), states)
        pred_score = (LOGIT_SCALE * similarity).softmax(dim=-1)[:, 1]
        few_shot_map = (
            self.few_shot_map([by_layer[layer] for layer in self.few_shot_layers], categories) if few_shot else None
        )
        if few_shot_map is not None:
            anomaly_map = anomaly_map + few_shot_map
        return AprilGANOutput(
            anomaly_map=anomaly_map,
            pred_score=pred_score,
            layer_probabilities=probabilities,
            few_shot_map=few_shot_map,
            text_states=states,
        )


def few_shot_image_scores(zero_shot_scores: torch.Tensor, map_maxima: torch.Tensor) -> torch.Tensor:
    """The authors' few-shot image score of one category's test images: ``0.5 · (zero-shot score +
    min-max normalised maximum of the anomaly map)``, the normalisation over the category's images.

    Where every image's maximum is the same (a category of one image, as in a small predict run), each image is
    the category's minimum, so its normalised maximum is 0 here (the authors divide 0 by 0: NaN scores), with a
    warning: those scores are half the zero-shot ones.
    """
    lowest = map_maxima.min()
    span = map_maxima.max() - lowest
    if span == 0:
        warnings.warn(
            f"few-shot image scores: all {len(map_maxima)} image(s) of a category have the same anomaly-map maximum "
            "(a category of one image?), so the maximum cannot be min-max normalised over the category; their "
            "scores are half the zero-shot scores",
            stacklevel=2,
        )
        return 0.5 * zero_shot_scores
    return 0.5 * (zero_shot_scores + (map_maxima - lowest) / span)
