"""AnomalyCLIP (Zhou et al., ICLR 2024) as a plain PyTorch module: learned object-agnostic prompts with deep
text tokens, and DPAM (the V-V path from a later block) on a frozen CLIP. docs/METHOD.md, AnomalyCLIP."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from anovl.backbones.factory import resolve_model_name
from anovl.backbones.text_tower import PromptTextTower, check_prompt_text_tower
from anovl.errors import AnovlError
from anovl.models.base import ModelOutput, json_data
from anovl.models.clip_model import CLIPAnomalyModel
from anovl.models.components.losses import binary_dice_loss, focal_loss
from anovl.models.components.scoring import block_sum
from anovl.models.components.smoothing import gaussian_blur
from anovl.models.registry import register_method
from anovl.models.text_cache import TextEmbeddings

# The authors' published run: ViT-L/14@336px (OpenAI weights) at 518 px, maps of blocks 6/12/18/24.
REFERENCE_BACKBONE = ("ViT-L-14-336", "openai", 518)
REFERENCE_LAYERS = (6, 12, 18, 24)  # block numbers counted from 1, as the authors (and APRIL-GAN's) do
PLACEHOLDER = "X"  # the word the learned context vectors stand in for while tokenizing
MAP_LOSS_WEIGHT = 4.0  # the authors' weight of the map losses against the image loss (train.py's lam)


@dataclass
class AnomalyCLIPOutput(ModelOutput):
    """``anomaly_map`` (B, H, W): the sum over layers of the abnormal probability, smoothed; ``pred_score``
    (B,): the abnormal probability of the image embedding; and the per-layer probabilities."""

    layer_probabilities: list[torch.Tensor]  # per layer, (B, 2, H, W): [normal, abnormal] per pixel
    text_states: torch.Tensor  # (2, D) normalised [normal, abnormal] text embeddings of the learned prompts
    image_logits: torch.Tensor  # (B, 2) cosine / temperature of the image embedding with the text states


def layer_probabilities(
    tokens: torch.Tensor, states: torch.Tensor, image_size: int, temperature: float
) -> torch.Tensor:
    """(B, N, D) patch tokens of a square grid → (B, 2, S, S) [normal, abnormal] probabilities: softmax of the
    cosines / temperature per token, bilinearly upsampled (align_corners=False) as the authors' maps."""
    probabilities = (F.normalize(tokens, dim=-1) @ states.t() / temperature).softmax(-1)
    batch, count, _ = probabilities.shape
    side = int(round(count**0.5))
    grid = probabilities.transpose(1, 2).reshape(batch, 2, side, side)
    return F.interpolate(grid, (image_size, image_size), mode="bilinear")


class LearnedPrompts(nn.Module):
    """What AnomalyCLIP trains: the [normal, abnormal] context vectors and the deep tokens of text blocks
    1 .. depth-1, initialised normal with std 0.02 from ``seed``."""

    def __init__(self, n_ctx: int, depth: int, t_n_ctx: int, width: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.context = nn.Parameter(torch.randn(2, n_ctx, width, generator=generator).mul_(0.02))
        # depth 1 has no deep tokens, whatever t_n_ctx (the authors' release then holds none to size them by)
        deep_shape = (depth - 1, t_n_ctx if depth > 1 else 0, width)
        self.deep_tokens = nn.Parameter(torch.randn(deep_shape, generator=generator).mul_(0.02))


@register_method("anomalyclip")
class AnomalyCLIP(CLIPAnomalyModel):
    """Learned object-agnostic text prompts and DPAM on a frozen CLIP (docs/METHOD.md, AnomalyCLIP).

    Args:
        backbone, pretrained, image_size, init_seed, tokenizer, cache_dir, use_text_cache: the frozen CLIP
            (see :class:`~anovl.models.clip_model.CLIPAnomalyModel`); its text tower must be open_clip's own.
        layers: blocks, numbered from 1 as the authors count them, whose DPAM patch tokens make the maps (summed).
        dpam_blocks: the last blocks whose local stream takes the V-V attention (the authors'
            ``DPAM_layer=20`` replaces the attention of the last 19 blocks, 6 to 24 of ViT-L).
        n_ctx: learned context vectors of each prompt ("X X ... X object." / "X ... X damaged object.").
        depth: text blocks that see learned tokens; blocks 1 .. depth-1 get ``t_n_ctx`` deep tokens each,
            replacing the first ``t_n_ctx`` context positions.
        t_n_ctx: deep tokens per block.
        sigma: Gaussian smoothing of the summed map (0: none).
        temperature: of every softmax over [normal, abnormal] cosines.
        object_name: the one class name of the object-agnostic prompts.
        deep_tokens_float16: round the deep tokens to float16 before use, as the authors' code does.
        image_norm: apply the tower's final norm to the image embedding (the authors' image embedding leaves
            ``ln_post`` out).
        prompt_seed: seed of the initial learned vectors (normal, std 0.02).
        checkpoint: learned prompts to load: an ``anovl fit`` checkpoint (``.ckpt``) or the authors' release
            (``{"prompt_learner": state_dict}``, :func:`convert_authors_state_dict`).
        learning_rate, betas: Adam's, for training.
        position_interpolation: how loaded weights' positional embedding is resized to ``image_size``:
            ``bilinear`` as the authors' code (open_clip ViTs with a class token), or open_clip's ``bicubic``.
    """

    method = "AnomalyCLIP"
    token_ids: torch.Tensor  # a buffer, declared so that its type is known

    def __init__(
        self,
        backbone: str = REFERENCE_BACKBONE[0],
        pretrained: str | None = REFERENCE_BACKBONE[1],
        image_size: int | None = REFERENCE_BACKBONE[2],
        layers: Sequence[int] = REFERENCE_LAYERS,
        dpam_blocks: int = 19,
        n_ctx: int = 12,
        depth: int = 9,
        t_n_ctx: int = 4,
        sigma: float = 4.0,
        temperature: float = 0.07,
        object_name: str = "object",
        deep_tokens_float16: bool = True,
        image_norm: bool = False,
        prompt_seed: int = 0,
        checkpoint: str | os.PathLike | None = None,
        learning_rate: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        init_seed: int = 0,
        tokenizer: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_text_cache: bool = True,
        position_interpolation: str = "bilinear",
    ):
        name = resolve_model_name(backbone)
        check_prompt_text_tower(name, open_clip.get_model_config(name), "AnomalyCLIP's deep text prompts")
        for what, value, low in (
            ("n_ctx", n_ctx, 1),
            ("depth", depth, 1),
            ("t_n_ctx", t_n_ctx, 0),
            ("dpam_blocks", dpam_blocks, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise AnovlError(f"{what} must be an integer of at least {low}, got {value!r}")
        if t_n_ctx > n_ctx:
            raise AnovlError(
                f"t_n_ctx ({t_n_ctx}) cannot exceed n_ctx ({n_ctx}): the deep tokens replace context positions"
            )
        if temperature <= 0 or sigma < 0:
            raise AnovlError(f"temperature must be positive and sigma not negative, got {temperature} and {sigma}")
        if learning_rate <= 0 or len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
            raise AnovlError(
                f"learning_rate must be positive and betas two numbers in [0, 1), got {learning_rate!r} and {betas!r}"
            )
        super().__init__(
            backbone, pretrained, image_size, init_seed, tokenizer, cache_dir, use_text_cache, position_interpolation
        )
        self.position_interpolation = position_interpolation
        blocks = self.encoder.num_layers
        if dpam_blocks > blocks:
            raise AnovlError(f"dpam_blocks {dpam_blocks} exceeds the {blocks} blocks of {self.backbone_name}")
        layers = tuple(layers)
        if (
            not layers
            or len(set(layers)) != len(layers)
            or not all(isinstance(layer, int) and 1 <= layer <= blocks for layer in layers)
        ):
            raise AnovlError(
                f"layers must be distinct block numbers from 1 to {blocks} (the depth of "
                f"{self.backbone_name}), counted from 1 as the authors do (6, 12, 18, 24 for ViT-L), "
                f"got {list(layers)}"
            )
        self.text_tower = PromptTextTower(self.clip)
        if depth > self.text_tower.num_layers:
            raise AnovlError(
                f"depth {depth} exceeds the {self.text_tower.num_layers} text blocks of {self.backbone_name}"
            )
        self.layers = layers
        self.dpam_blocks, self.n_ctx, self.depth, self.t_n_ctx = dpam_blocks, n_ctx, depth, t_n_ctx
        self.sigma, self.temperature, self.object_name = float(sigma), float(temperature), object_name
        self.deep_tokens_float16, self.image_norm, self.prompt_seed = deep_tokens_float16, image_norm, prompt_seed
        self.learning_rate, self.betas = float(learning_rate), (float(betas[0]), float(betas[1]))
        self.prompts = LearnedPrompts(n_ctx, depth, t_n_ctx, self.text_tower.width, prompt_seed)
        token_ids, self.context_start = self._prompt_tokens()
        self.register_buffer("token_ids", token_ids, persistent=False)
        self._initial_prompts = self.prompt_fingerprint()
        if checkpoint is not None:
            from anovl.models.checkpoints import load_trained_weights  # noqa: PLC0415 - the checkpoints import models

            load_trained_weights(self, checkpoint)

    # --- prompts -------------------------------------------------------------------------------------------

    def prompt_sentences(self) -> tuple[str, str]:
        """The normal and abnormal prompt, the placeholder words standing for the learned context."""
        context = " ".join([PLACEHOLDER] * self.n_ctx)
        return f"{context} {self.object_name}.", f"{context} damaged {self.object_name}."

    def _prompt_tokens(self) -> tuple[torch.Tensor, int]:
        """Token ids (2, L) of the two prompts and the position of their first context token."""
        tokenizer = self.text_cache.backbone.tokenizer
        ids = torch.as_tensor(tokenizer(list(self.prompt_sentences()))).long()
        empty, word = (torch.as_tensor(tokenizer([text])).long()[0] for text in ("", PLACEHOLDER))
        placeholder = word[(word != empty).nonzero()[0, 0]]
        starts = []
        for row in ids:
            runs = [i for i in range(len(row) - self.n_ctx + 1) if bool((row[i : i + self.n_ctx] == placeholder).all())]
            if not runs:
                raise AnovlError(
                    f"the tokenizer of {self.backbone_name} does not keep the {self.n_ctx} context "
                    f"placeholders of {self.prompt_sentences()[0]!r} as one token each"
                )
            starts.append(runs[0])
        if starts[0] != starts[1]:
            raise AnovlError(f"the tokenizer of {self.backbone_name} puts the prompts' contexts at different positions")
        return ids, starts[0]

    def learned_states(self) -> torch.Tensor:
        """(2, D) normalised [normal, abnormal] embeddings of the learned prompts (differentiable)."""
        tower = self.text_tower
        embeddings = tower.token_embedding(self.token_ids)
        start = self.context_start
        embeddings = torch.cat(
            [embeddings[:, :start], self.prompts.context.to(embeddings.dtype), embeddings[:, start + self.n_ctx :]], 1
        )
        states = tower.encode(
            embeddings,
            self.token_ids,
            list(self.prompts.deep_tokens),
            deep_start=start,
            deep_dtype=torch.float16 if self.deep_tokens_float16 else None,
        )
        return F.normalize(states.float(), dim=-1)

    def text_states(
        self, category: str, prompt_name: str | None = None, device: torch.device | str = "cpu"
    ) -> TextEmbeddings:
        """The shared text API (:meth:`CLIPAnomalyModel.text_states`) on the learned prompts: object-agnostic, so
        the same for every category; the two prompts are the only sentences. Not differentiable: training uses
        :meth:`learned_states`."""
        with torch.no_grad():
            states = self.learned_states().to(device)
        return TextEmbeddings(states=states, sentences=states)

    # --- forward --------------------------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor):
        """The frozen visual side: DPAM patch tokens of ``layers`` and the image embedding (no gradients)."""
        with torch.no_grad():
            return self.encoder(
                images,
                layers=[layer - 1 for layer in self.layers],
                local_start=self.encoder.num_layers - self.dpam_blocks,
                final_norm=self.image_norm,
            )

    def forward(
        self, images: torch.Tensor, categories: Sequence[str], prompt_names: Sequence[str] | None = None
    ) -> AnomalyCLIPOutput:
        """Maps and scores of CLIP-normalised ``images`` (B, 3, S, S). The prompts are object-agnostic: the
        categories are checked but do not change them."""
        images, _ = self.check_inputs(images, categories, prompt_names)
        with torch.no_grad():
            states = self.learned_states()
            probabilities, image_logits = self._probabilities(images, states)
            # The authors' map is (p_abnormal + 1 - p_normal) / 2 per layer, summed over layers.
            summed = torch.stack([(p[:, 1] + 1 - p[:, 0]) / 2 for p in probabilities]).sum(0)
            return AnomalyCLIPOutput(
                anomaly_map=gaussian_blur(summed, self.sigma),
                pred_score=image_logits.softmax(-1)[:, 1],
                layer_probabilities=probabilities,
                text_states=states,
                image_logits=image_logits,
            )

    def _probabilities(self, images: torch.Tensor, states: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per layer the (B, 2, S, S) [normal, abnormal] probabilities, and the (B, 2) image logits."""
        encoded = self.encode_images(images)
        probabilities = [
            layer_probabilities(tokens.float(), states, self.image_size, self.temperature)
            for tokens in encoded.patch_tokens
        ]
        image_logits = F.normalize(encoded.global_tokens.float(), dim=-1) @ states.t() / self.temperature
        return probabilities, image_logits

    # --- training (anovl fit) ---------------------------------------------------------------------------

    def trained_module(self) -> nn.Module:
        return self.prompts

    def training_settings(self) -> dict[str, Any]:
        return {"optimizer": "Adam", "lr": self.learning_rate, "betas": list(self.betas)}

    def configure_optimizer(self, parameters) -> torch.optim.Optimizer:
        return torch.optim.Adam(parameters, lr=self.learning_rate, betas=self.betas)

    def foreign_trained_state(self, data: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The authors' release (``{"prompt_learner": state_dict}``) as :attr:`prompts`' state dict."""
        if not isinstance(data.get("prompt_learner"), dict):
            return None
        return convert_authors_state_dict(data)

    def training_losses(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        categories: Sequence[str],
        prompt_names: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The authors' objective on labelled images (masks B×S×S): per layer the focal loss of the
        [normal, abnormal] maps and the Dice losses of the abnormal map against the mask and of the normal
        map against its complement, summed over layers and weighted 4; plus the cross entropy of the image
        logits (cosine / temperature) against the label, which is "anomalous" where the mask is not empty."""
        images, _ = self.check_inputs(images, categories, prompt_names)
        if masks.shape != (images.shape[0], *images.shape[-2:]):
            raise AnovlError(
                f"masks must be B×S×S like the images, got {tuple(masks.shape)} for {tuple(images.shape)} images"
            )
        probabilities, image_logits = self._probabilities(images, self.learned_states())
        target = (masks > 0.5).to(images.dtype)
        labels = target.flatten(1).amax(1).long()
        return {
            "focal": MAP_LOSS_WEIGHT * block_sum(focal_loss(p, target) for p in probabilities),
            "dice": MAP_LOSS_WEIGHT
            * block_sum(
                binary_dice_loss(p[:, 1], target) + binary_dice_loss(p[:, 0], 1 - target) for p in probabilities
            ),
            "image": F.cross_entropy(image_logits, labels),
        }

    # --- settings -------------------------------------------------------------------------------------------

    def prompt_fingerprint(self) -> str:
        """A hash of the learned vectors (what a trained or loaded model's numbers depend on)."""
        digest = hashlib.sha256()
        for tensor in (self.prompts.context, self.prompts.deep_tokens):
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def _method_settings(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "dpam_blocks": self.dpam_blocks,
            "n_ctx": self.n_ctx,
            "depth": self.depth,
            "t_n_ctx": self.t_n_ctx,
            "sigma": self.sigma,
            "temperature": self.temperature,
            "object_name": self.object_name,
            "deep_tokens_float16": self.deep_tokens_float16,
            "image_norm": self.image_norm,
            "prompt_seed": self.prompt_seed,
            "position_interpolation": self.position_interpolation,
        }

    @property
    def map_range(self) -> float:
        return float(len(self.layers))  # a probability per block, summed (the smoothing keeps the bound)

    def settings(self) -> dict[str, Any]:
        return json_data(
            {**self.backbone_settings(), **self._method_settings(), "prompt_weights": self.prompt_fingerprint()}
        )

    def reference_settings(self) -> dict[str, Any]:
        backbone, pretrained, image_size = REFERENCE_BACKBONE
        return json_data(
            {
                "backbone": backbone,
                "pretrained": pretrained,
                "image_size": image_size,
                "init_seed": None,
                "layers": list(REFERENCE_LAYERS),
                "dpam_blocks": 19,
                "n_ctx": 12,
                "depth": 9,
                "t_n_ctx": 4,
                "sigma": 4.0,
                "temperature": 0.07,
                "object_name": "object",
                "deep_tokens_float16": True,
                "image_norm": False,
                "prompt_seed": self.prompt_seed,
                "position_interpolation": "bilinear",
                # trained or loaded prompts differ from the seeded initial ones: the label names their fingerprint
                "prompt_weights": self._initial_prompts,
            }
        )


def convert_authors_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The authors' prompt-learner state dict (or the checkpoint holding it under ``prompt_learner``) as
    the state dict of :class:`LearnedPrompts`.

    ``ctx_pos`` / ``ctx_neg`` (1, 1, n_ctx, W) become ``context`` [normal, abnormal]; ``compound_prompts_text.i``
    (t_n_ctx, W) become ``deep_tokens[i]``. Their ``compound_prompt_projections`` are never used by their forward
    and the token buffers are the tokenized prompts, which this model builds itself.
    """
    state = checkpoint.get("prompt_learner", checkpoint)
    if not isinstance(state, dict) or "ctx_pos" not in state or "ctx_neg" not in state:
        raise AnovlError(
            "not an AnomalyCLIP prompt learner: no ctx_pos / ctx_neg "
            f"(keys: {', '.join(sorted(map(str, state))[:8]) if isinstance(state, dict) else '-'})"
        )
    contexts = []
    for key in ("ctx_pos", "ctx_neg"):
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[:2] != (1, 1):
            raise AnovlError(
                f"{key} must be a 1×1×n_ctx×width tensor (one class, one state), got "
                f"{tuple(getattr(value, 'shape', ()))}"
            )
        contexts.append(value[0, 0].float())
    deep: list[torch.Tensor] = []
    while f"compound_prompts_text.{len(deep)}" in state:
        deep.append(state[f"compound_prompts_text.{len(deep)}"].float())
    width = contexts[0].shape[-1]
    return {"context": torch.stack(contexts), "deep_tokens": torch.stack(deep) if deep else torch.zeros(0, 0, width)}
