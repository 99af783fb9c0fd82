"""Oracles of anovl.metrics (docs/METHOD.md §6): AUPRO by brute force over every distinct threshold, the
cflow-ad / APRIL-GAN 200-threshold PRO loop, and F1-max from sklearn's precision-recall curve.

Written from the definitions with numpy, scipy's connected components and sklearn: keep them independent of
anovl.metrics. (benchmarks/sections/metrics.py's ``threshold_pro_curve`` is the benchmark's timed baseline, checked
against anovl.metrics in tests/test_bench.py.)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, precision_recall_curve

EIGHT_CONNECTED = np.ones((3, 3))


def reference_aupro(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float) -> float:
    """MVTec AUPRO by brute force: every distinct threshold, per-region overlaps, cut at the limit."""
    regions = []
    for index, mask in enumerate(masks):
        labels, count = ndimage.label(mask, EIGHT_CONNECTED)
        regions += [(index, labels == label) for label in range(1, count + 1)]
    normal_total = sum((mask == 0).sum() for mask in masks)
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(np.concatenate([amap.ravel() for amap in maps]))[::-1]:
        detected = [amap >= threshold for amap in maps]
        fprs.append(sum((hits & (mask == 0)).sum() for hits, mask in zip(detected, masks)) / normal_total)
        pros.append(np.mean([detected[index][region].mean() for index, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    beyond = np.searchsorted(fprs, fpr_limit, side="right")
    x, y = fprs[:beyond], pros[:beyond]
    if beyond < len(fprs):
        y_limit = y[-1] + (pros[beyond] - y[-1]) * (fpr_limit - x[-1]) / (fprs[beyond] - x[-1])
        x, y = np.append(x, fpr_limit), np.append(y, y_limit)
    return auc(x, y) / fpr_limit


def reference_cflow_pro(
    maps: list[np.ndarray], masks: list[np.ndarray], num_thresholds: int = 200, fpr_limit: float = 0.3
) -> float:
    """The cflow-ad / APRIL-GAN loop: equally spaced thresholds, FPR < limit, min-max rescaled FPR, trapezoid."""
    everything = np.concatenate([amap.ravel() for amap in maps])
    lowest, highest = everything.min(), everything.max()
    step = (float(highest) - float(lowest)) / num_thresholds
    labelled = [ndimage.label(mask, EIGHT_CONNECTED) for mask in masks]
    normal_total = sum((mask == 0).sum() for mask in masks)
    fprs, pros = [], []
    for k in range(num_thresholds):
        threshold = np.float32(float(lowest) + k * step)
        overlaps = [
            (amap[labels == label] > threshold).mean()
            for amap, (labels, count) in zip(maps, labelled)
            for label in range(1, count + 1)
        ]
        false_positives = sum(((amap > threshold) & (mask == 0)).sum() for amap, mask in zip(maps, masks))
        pros.append(np.mean(overlaps))
        fprs.append(false_positives / normal_total)
    fprs, pros = np.array(fprs), np.array(pros)
    kept = fprs < fpr_limit
    fprs = fprs[kept]
    return auc((fprs - fprs.min()) / (fprs.max() - fprs.min()), pros[kept])


def reference_f1_max(targets: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(targets, scores)
    with np.errstate(invalid="ignore"):
        return float(np.nanmax(2 * precision * recall / (precision + recall)))


def reference_f1_threshold(targets: np.ndarray, scores: np.ndarray) -> float:
    """The (lowest) score threshold of the F1 maximum on sklearn's curve (anomalous where score >= it)."""
    precision, recall, thresholds = precision_recall_curve(targets, scores)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]  # the last point has no threshold
    return float(thresholds[np.flatnonzero(f1 == f1.max())].min())
