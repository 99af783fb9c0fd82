"""AnoVL's export graph (its hook for ``anovl export``, :meth:`AnoVL.export_module`): the training-free
forward for a fixed set of classes, with their text states as a constant, through the same map-and-score step
as :class:`~anovl.models.anovl.torch_model.AnoVL`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from anovl.backbones.value_wise import ValueWiseViT
from anovl.errors import AnovlError
from anovl.models.anovl.views import NUM_REFERENCE_VIEWS, make_views
from anovl.models.components.scoring import maps_and_scores


class ExportableAnoVL(nn.Module):
    """Training-free AnoVL for a fixed set of classes: ``(images, class_index) -> (anomaly_map, pred_score)``.

    ``states`` (C, 2, D) are the classes' normalised [normal, abnormal] text embeddings, a constant buffer.
    """

    states: torch.Tensor  # the buffer, declared so that its type is known

    def __init__(
        self, encoder: ValueWiseViT, states: torch.Tensor, image_size: int, num_views: int, layers: Sequence[int]
    ):
        super().__init__()
        if not 1 <= num_views <= NUM_REFERENCE_VIEWS:
            raise AnovlError(f"num_views must be between 1 and {NUM_REFERENCE_VIEWS}, got {num_views}")
        self.encoder = encoder
        self.register_buffer("states", states.detach().float().clone())
        self.image_size = image_size
        self.num_views = num_views
        self.layers = tuple(layers)

    def forward(self, images: torch.Tensor, class_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.encoder(make_views(images, self.num_views), num_local=images.shape[0], layers=self.layers)
        return maps_and_scores(encoded.patch_tokens, encoded.global_tokens, self.states[class_index], self.image_size)
