"""All image- and pixel-level anomaly metrics of one evaluation (docs/METHOD.md §6) in one DDP-syncing Metric."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchmetrics import Metric

from anovl.metrics import functional
from anovl.metrics._state import add_cat_states, ranked_from_states, split_by_target, split_pixels


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
    pixel_positive_scores: list[Tensor]
    pixel_positive_region_sizes: list[Tensor]
    pixel_negative_scores: list[Tensor]
    image_positive_scores: list[Tensor]
    image_negative_scores: list[Tensor]

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
        add_cat_states(
            self,
            "pixel_positive_scores",
            "pixel_positive_region_sizes",
            "pixel_negative_scores",
            "image_positive_scores",
            "image_negative_scores",
        )

    def update(
        self, anomaly_maps: Tensor, masks: Tensor, pred_scores: Tensor, labels: Tensor, has_mask: Tensor
    ) -> None:
        """Add a batch: B×H×W maps and {0, 1} masks (H×W may change between updates), B scores, labels and flags.

        Labels are 0 normal, 1 anomalous, -1 unknown (skipped by image metrics); images whose ``has_mask`` is
        False are skipped by pixel metrics.
        """
        batch_size = anomaly_maps.shape[0]
        for name, values in (("pred_scores", pred_scores), ("labels", labels), ("has_mask", has_mask)):
            if values.shape != (batch_size,):
                raise ValueError(f"{name} must have shape ({batch_size},), got {tuple(values.shape)}")
        if ((labels < -1) | (labels > 1)).any():
            raise ValueError(f"labels must be 0, 1 or -1 (unknown), got {labels.unique().tolist()}")
        has_mask = has_mask.bool()
        if not has_mask.all():  # indexing copies the maps, which every image of a usual batch keeps
            anomaly_maps, masks = anomaly_maps[has_mask], masks[has_mask]
        positive, sizes, negative = split_pixels(anomaly_maps, masks, self.dtype)
        self.pixel_positive_scores.append(positive)
        self.pixel_positive_region_sizes.append(sizes)
        self.pixel_negative_scores.append(negative)
        positive, negative = split_by_target(pred_scores, labels, self.dtype)
        self.image_positive_scores.append(positive)
        self.image_negative_scores.append(negative)

    def compute(self) -> dict[str, float]:
        image = ranked_from_states(self.image_positive_scores, self.image_negative_scores)
        pixel = ranked_from_states(
            self.pixel_positive_scores, self.pixel_negative_scores, self.pixel_positive_region_sizes
        )
        thresholds = {}
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
