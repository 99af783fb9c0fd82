"""Exact binary ranking metrics (AUROC, average precision, F1-max) as DDP-syncing torchmetrics classes."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchmetrics import Metric

from anovl.metrics import functional
from anovl.metrics._state import add_cat_states, ranked_from_states, split_by_target


class _BinaryScoresMetric(Metric):
    """Stores scores split by target; subclasses compute one metric from them."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    positive_scores: list[Tensor]
    negative_scores: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        add_cat_states(self, "positive_scores", "negative_scores")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add scores with targets 1 (positive) or 0 (negative); any other target (e.g. -1) is ignored."""
        positive, negative = split_by_target(preds, target, self.dtype)
        self.positive_scores.append(positive)
        self.negative_scores.append(negative)

    def _ranked(self) -> functional.RankedScores:
        return ranked_from_states(self.positive_scores, self.negative_scores)


class ExactAUROC(_BinaryScoresMetric):
    """Exact area under the ROC curve (ties as in sklearn's ``roc_auc_score``)."""

    def compute(self) -> float:
        return functional.auroc(self._ranked())


class AveragePrecision(_BinaryScoresMetric):
    """Average precision exactly as sklearn's ``average_precision_score``."""

    def compute(self) -> float:
        return functional.average_precision(self._ranked())


class F1Max(_BinaryScoresMetric):
    """Best F1 score over all thresholds."""

    def compute(self) -> float:
        return functional.f1_max(self._ranked())
