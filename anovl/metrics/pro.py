"""Per-region-overlap metrics (standard AUPRO, cflow-style PRO) as DDP-syncing torchmetrics classes."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchmetrics import Metric

from anovl.metrics import functional
from anovl.metrics._state import add_cat_states, ranked_from_states, split_pixels


class _PixelScoresMetric(Metric):
    """Stores pixel scores split by ground truth, with region sizes; subclasses compute one metric from them."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    positive_scores: list[Tensor]
    positive_region_sizes: list[Tensor]
    negative_scores: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        add_cat_states(self, "positive_scores", "positive_region_sizes", "negative_scores")

    def update(self, anomaly_maps: Tensor, masks: Tensor) -> None:
        """Add B×H×W anomaly maps and {0, 1} masks; H×W may change between updates."""
        positive, sizes, negative = split_pixels(anomaly_maps, masks, self.dtype)
        self.positive_scores.append(positive)
        self.positive_region_sizes.append(sizes)
        self.negative_scores.append(negative)

    def _ranked(self) -> functional.RankedScores:
        return ranked_from_states(self.positive_scores, self.negative_scores, self.positive_region_sizes)


class AUPRO(_PixelScoresMetric):
    """Standard (MVTec) AUPRO up to ``fpr_limit``, normalised by it."""

    def __init__(self, fpr_limit: float = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        functional.check_pro_arguments(fpr_limit)
        self.fpr_limit = fpr_limit

    def compute(self) -> float:
        return functional.aupro(self._ranked(), self.fpr_limit)


class CflowPRO(_PixelScoresMetric):
    """AUPRO as computed by cflow-ad / APRIL-GAN papers (see ``functional.cflow_pro``)."""

    def __init__(self, num_thresholds: int = 200, fpr_limit: float = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        functional.check_pro_arguments(fpr_limit, num_thresholds)
        self.num_thresholds = num_thresholds
        self.fpr_limit = fpr_limit

    def compute(self) -> float:
        return functional.cflow_pro(self._ranked(), self.num_thresholds, self.fpr_limit)
