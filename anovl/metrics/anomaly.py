"""All image- and pixel-level anomaly metrics of one evaluation (docs/METHOD.md §6) in one DDP-syncing Metric.

``update`` only stores (maps, per-pixel region sizes, scores, labels, on the metric's device): it has no
data-dependent shape and no value test, so on CUDA it never waits for the device. ``compute`` does the
splitting and checking on the host, once per category.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from anovl.metrics import functional
from anovl.metrics._state import add_cat_states, state_to_numpy
from anovl.metrics.functional import RankedScores


class AnomalyMetrics(Metric):
    """Pixel AUROC / AP / F1-max / AUPRO and image AUROC / AP / F1-max, optionally the cflow-style PRO.

    ``compute()`` returns python floats in [0, 1] under the keys pixel_auroc, pixel_ap, pixel_f1max,
    pixel_aupro, image_auroc, image_ap, image_f1max (and pixel_aupro_cflow with ``cflow_pro=True``);
    an undefined metric is NaN with a warning. It also returns the thresholds of the two F1-max values,
    ``image_f1max_threshold`` and ``pixel_f1max_threshold``: score values, not fractions (anomalous where
    ``score >= threshold``; see :func:`~anovl.metrics.functional.f1_max_and_threshold`).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    pixel_scores: list[Tensor]
    pixel_regions: list[Tensor]
    image_scores: list[Tensor]
    image_labels: list[Tensor]

    def __init__(
        self,
        aupro_fpr_limit: float = 0.3,
        cflow_pro: bool = False,
        cflow_pro_thresholds: int = 200,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        functional.check_pro_arguments(aupro_fpr_limit, cflow_pro_thresholds)
        self.aupro_fpr_limit = aupro_fpr_limit
        self.cflow_pro = cflow_pro
        self.cflow_pro_thresholds = cflow_pro_thresholds
        add_cat_states(self, "pixel_scores", "pixel_regions", "image_scores", "image_labels")

    def update(
        self,
        anomaly_maps: Tensor,
        masks: Tensor,
        pred_scores: Tensor,
        labels: Tensor,
        has_mask: Tensor,
        region_sizes: Tensor | None = None,
    ) -> None:
        """Add a batch: B×H×W maps and {0, 1} masks (H×W may change between updates), B scores, labels and flags.

        Labels are 0 normal, 1 anomalous, -1 unknown (skipped by image metrics; other values raise in
        ``compute``); images whose ``has_mask`` is False are skipped by pixel metrics. ``region_sizes`` (B×H×W,
        per pixel the size of its 8-connected ground-truth region, 0 outside: what the loader gives) makes
        the update free of host round trips: it only stores, on the device, what ``compute`` splits. Without
        it the regions of ``masks`` are labelled here, on the host.
        """
        batch_size = anomaly_maps.shape[0]
        for name, values in (("pred_scores", pred_scores), ("labels", labels), ("has_mask", has_mask)):
            if values.shape != (batch_size,):
                raise ValueError(f"{name} must have shape ({batch_size},), got {tuple(values.shape)}")
        if anomaly_maps.ndim != 3 or masks.shape != anomaly_maps.shape:
            raise ValueError(
                f"anomaly_maps and masks must both be B×H×W, got {tuple(anomaly_maps.shape)} and {tuple(masks.shape)}"
            )
        if region_sizes is None:
            region_sizes = torch.from_numpy(functional.region_size_map((masks > 0.5).cpu().numpy()))
        elif region_sizes.shape != anomaly_maps.shape:
            raise ValueError(f"region_sizes must be B×H×W like the maps, got {tuple(region_sizes.shape)}")
        # -1 marks the pixels of images without ground truth; compute() leaves them out.
        regions = torch.where(has_mask.to(region_sizes.device, torch.bool).view(-1, 1, 1), region_sizes, -1)
        self.pixel_scores.append(anomaly_maps.detach().flatten().to(self.dtype))
        self.pixel_regions.append(regions.flatten().to(device=anomaly_maps.device, dtype=self.dtype))
        self.image_scores.append(pred_scores.detach().flatten().to(self.dtype))
        self.image_labels.append(labels.flatten().to(self.dtype))

    def compute(self) -> dict[str, float]:
        image_scores, labels = state_to_numpy(self.image_scores), state_to_numpy(self.image_labels)
        if not np.isin(labels, (-1, 0, 1)).all():
            raise ValueError(f"labels must be 0, 1 or -1 (unknown), got {np.unique(labels).astype(int).tolist()}")
        image = RankedScores.from_targets(image_scores, labels)
        pixel_scores, regions = state_to_numpy(self.pixel_scores), state_to_numpy(self.pixel_regions)
        anomalous = regions > 0
        pixel = RankedScores.from_unsorted(pixel_scores[anomalous], pixel_scores[regions == 0], regions[anomalous])
        thresholds: dict[str, float] = {}
        results = {
            "pixel_auroc": functional.auroc(pixel, name="pixel_auroc"),
            "pixel_ap": functional.average_precision(pixel, name="pixel_ap"),
            "pixel_f1max": _f1_max(pixel, "pixel", thresholds),
            "pixel_aupro": functional.aupro(pixel, self.aupro_fpr_limit, name="pixel_aupro"),
            "image_auroc": functional.auroc(image, name="image_auroc"),
            "image_ap": functional.average_precision(image, name="image_ap"),
            "image_f1max": _f1_max(image, "image", thresholds),
        }
        if self.cflow_pro:
            results["pixel_aupro_cflow"] = functional.cflow_pro(
                pixel, self.cflow_pro_thresholds, self.aupro_fpr_limit, name="pixel_aupro_cflow"
            )
        return {**results, **thresholds}


def _f1_max(scores: functional.RankedScores, level: str, thresholds: dict[str, float]) -> float:
    """F1-max of one level (image or pixel); its threshold goes into ``thresholds``."""
    value, thresholds[f"{level}_f1max_threshold"] = functional.f1_max_and_threshold(scores, name=f"{level}_f1max")
    return value
