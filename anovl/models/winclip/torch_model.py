"""WinCLIP (Jeong et al., CVPR 2023), zero-shot, as anomalib 2.7.0's ``WinClipModel`` computes it.

Every image is scored at three kinds of scale: the whole image (CLIP's image embedding) and every
``s``×``s`` window of patches (stride 1) for each ``s`` in ``scales``. A window's embedding is CLIP's forward
of the class token and the window's patch tokens alone (with their positions), so a window sees nothing
outside it. Each embedding gets the abnormal probability ``softmax(cos(x, [t_normal, t_anomalous]) / T)[1]``
with anomalib's fixed temperature ``T = 0.07`` (not the model's ``logit_scale``). A patch's score at one
scale is the harmonic mean of the windows covering it; the map is the harmonic mean over the scales and the
whole-image score, resized bilinearly to the input. The image score is the whole-image score.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from anovl.errors import AnovlError
from anovl.models.base import ModelOutput
from anovl.models.clip_model import CLIPAnomalyModel
from anovl.models.registry import register_method
from anovl.models.winclip.prompts import WinCLIPPrompts
from anovl.models.winclip.windows import check_scales, harmonic_aggregation, harmonic_mean, window_masks

# anomalib 2.7.0's WinClipModel: BACKBONE, PRETRAINED, the backbone's native size, scales and TEMPERATURE.
REFERENCE_SETTINGS = {
    "backbone": "ViT-B-16-plus-240",
    "pretrained": "laion400m_e31",
    "image_size": 240,
    "init_seed": None,
    "scales": [2, 3],
    "temperature": 0.07,
    "prompts": WinCLIPPrompts().to_dict(),
}


@dataclass
class WinCLIPOutput(ModelOutput):
    """``anomaly_map`` (B, S, S) and ``pred_score`` (B,) as anomalib returns them, plus the parts."""

    image_embeddings: torch.Tensor  # (B, D) CLIP image embeddings (unnormalised)
    window_embeddings: list[torch.Tensor]  # per scale, (B, num_windows, D) (unnormalised)
    scale_maps: list[torch.Tensor]  # per scale, (B, grid, grid) harmonic aggregation of the window scores
    text_states: torch.Tensor  # (B, 2, D) normalised [normal, anomalous] text embeddings


@register_method("winclip")
class WinCLIP(CLIPAnomalyModel):
    """Zero-shot WinCLIP on a frozen CLIP (see the module docstring).

    Args:
        backbone, pretrained, image_size, init_seed, tokenizer, cache_dir, use_text_cache: the frozen CLIP
            (see :class:`~anovl.models.clip_model.CLIPAnomalyModel`); the default weights are anomalib's tag.
        scales: window sizes in patches (anomalib: 2 and 3); each must fit the patch grid.
        temperature: softmax temperature of the image–text cosine similarities (anomalib: 0.07).
        prompts: the prompt ensemble (default: anomalib's).
    """

    method = "WinCLIP"

    def __init__(
        self,
        backbone: str = "ViT-B-16-plus-240",
        pretrained: str | None = "laion400m_e31",
        image_size: int | None = None,
        scales: Sequence[int] = (2, 3),
        temperature: float = 0.07,
        prompts: WinCLIPPrompts | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_text_cache: bool = True,
        init_seed: int = 0,
        tokenizer: str | os.PathLike | None = None,
    ):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise AnovlError(f"temperature must be a positive number (anomalib: 0.07), got {temperature!r}")
        super().__init__(backbone, pretrained, image_size, init_seed, tokenizer, cache_dir, use_text_cache)
        self.grid_size = self.encoder.grid_size(self.image_size)
        self.scales = check_scales(scales, self.grid_size)
        self.temperature = float(temperature)
        self.prompts = prompts or WinCLIPPrompts()
        self.masks = [window_masks(self.grid_size, scale) for scale in self.scales]

    def settings(self) -> dict[str, Any]:
        return {
            **self.backbone_settings(),
            "scales": list(self.scales),
            "temperature": self.temperature,
            "prompts": self.prompts.to_dict(),
        }

    def reference_settings(self) -> dict[str, Any]:
        return REFERENCE_SETTINGS

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CLIP image embeddings (B, D) and, per scale, window embeddings (B, num_windows, D).

        A window's embedding is the encoder's forward of the prefix (class) token and that window's patch
        tokens only, taken from one shared embedding of the whole image.
        """
        tokens = self.encoder.embed(images)
        batch, _, width = tokens.shape
        prefix = self.encoder.num_prefix_tokens
        window_embeddings = []
        for masks in self.masks:
            num_windows = masks.shape[0]
            index = torch.cat([torch.arange(prefix).expand(num_windows, prefix), masks + prefix], dim=1)
            windows = tokens[:, index.to(tokens.device)]  # (B, num_windows, prefix + scale², width)
            # Where positions are applied inside the blocks, each window runs with its own patches' positions.
            positions = masks.repeat(batch, 1) if self.encoder.positions_in_blocks else None
            encoded = self.encoder.encode_tokens(windows.reshape(batch * num_windows, -1, width), positions)
            window_embeddings.append(encoded.view(batch, num_windows, -1))
        return self.encoder.encode_tokens(tokens), window_embeddings

    def anomalous_probability(self, embeddings: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """softmax(cos(x, states) / T)[..., 1] for embeddings (B, ..., D) and per-image states (B, 2, D)."""
        similarity = torch.einsum("b...d,bkd->b...k", F.normalize(embeddings, dim=-1), states)
        return (similarity / self.temperature).softmax(dim=-1)[..., 1]

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, categories: Sequence[str], prompt_names: Sequence[str] | None = None
    ) -> WinCLIPOutput:
        """Anomaly maps (B, S, S) and image scores (B,) of CLIP-normalised ``images`` (B, 3, S, S).

        ``prompt_names`` (default: :mod:`anovl.categories`' names for the categories) go into the prompts.
        """
        images, prompt_names = self.check_inputs(images, categories, prompt_names)
        image_embeddings, window_embeddings = self.encode(images)
        # anomalib's states: the normalised means of the unnormalised sentence embeddings, as text_states gives.
        states = torch.stack(
            [self.text_states(category, name, images.device).states for category, name in zip(categories, prompt_names)]
        )
        states = states.to(image_embeddings.dtype)
        image_scores = self.anomalous_probability(image_embeddings, states)
        scale_maps = [
            harmonic_aggregation(self.anomalous_probability(windows, states), masks, self.grid_size)
            for windows, masks in zip(window_embeddings, self.masks)
        ]
        whole_image = image_scores.view(-1, 1, 1).expand(-1, self.grid_size, self.grid_size)
        grid_map = harmonic_mean([whole_image, *scale_maps])
        anomaly_map = F.interpolate(grid_map.unsqueeze(1), size=images.shape[-2:], mode="bilinear").squeeze(1)
        return WinCLIPOutput(
            anomaly_map=anomaly_map,
            pred_score=image_scores,
            image_embeddings=image_embeddings,
            window_embeddings=window_embeddings,
            scale_maps=scale_maps,
            text_states=states,
        )
