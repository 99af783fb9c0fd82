"""A toy third method for anovl, as a plugin outside the package: a patch is as anomalous as its patch token
is long (no text at all). It shows the whole recipe for a method: take a frozen CLIP, implement ``forward``, say
what the numbers depend on, register it by a short name. Run it with

    anovl test --config examples/plugins/patch_norm.yaml
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from anovl.models.base import ModelOutput
from anovl.models.clip_model import CLIPAnomalyModel
from anovl.models.components.scoring import patch_map
from anovl.models.registry import register_method


@register_method("patchnorm")  # `--model patchnorm`, `class_path: patchnorm`; results.json names it so
class PatchNorm(CLIPAnomalyModel):
    """Anomaly map: the sigmoid of each patch token's norm, standardised over the image; score: its maximum."""

    method = "PatchNorm"

    def __init__(self, backbone: str = "ViT-B-16-plus-240", pretrained: str | None = "laion400m_e32",
                 image_size: int | None = None, init_seed: int = 0):
        super().__init__(backbone, pretrained, image_size, init_seed)  # frozen CLIP, seeded random weights

    def settings(self) -> dict[str, Any]:
        return self.backbone_settings()

    def reference_settings(self) -> dict[str, Any]:
        return {"backbone": "ViT-B-16-plus-240", "pretrained": "laion400m_e32", "image_size": 240, "init_seed": None}

    @torch.no_grad()
    def forward(self, images: torch.Tensor, categories: Sequence[str],
                prompt_names: Sequence[str] | None = None) -> ModelOutput:
        images, _ = self.check_inputs(images, categories, prompt_names)
        norms = self.encoder(images).patch_tokens[0].norm(dim=-1)  # (B, N)
        standardised = (norms - norms.mean(1, keepdim=True)) / norms.std(1, keepdim=True).clamp_min(1e-6)
        probabilities = standardised.sigmoid()
        return ModelOutput(patch_map(probabilities, self.image_size), probabilities.amax(1))
