"""Exact, DDP-syncing anomaly-detection metrics (docs/METHOD.md §6): AUROC, AP, F1-max, AUPRO, cflow-style PRO."""

from anovl.metrics.anomaly import AnomalyMetrics
from anovl.metrics.binary import AveragePrecision, ExactAUROC, F1Max
from anovl.metrics.functional import RankedScores
from anovl.metrics.pro import AUPRO, CflowPRO

__all__ = ["AUPRO", "AnomalyMetrics", "AveragePrecision", "CflowPRO", "ExactAUROC", "F1Max", "RankedScores"]
