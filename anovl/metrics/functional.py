"""Exact, sort-based anomaly-detection metrics on NumPy arrays.

Every metric reads a :class:`RankedScores`: the scores split by class and sorted ascending. The normal
(negative) set is large and sorted once; the anomalous (positive) set is small and binary-searched into it,
which yields every tie-grouped curve point without materialising per-pixel curves or threshold loops.
Undefined cases (one class missing, NaN scores) return NaN with a ``UserWarning`` naming the metric and the
reason; equal scores are not undefined (a single tie group: the curve joins (0, 0) and (1, 1)).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# 8-connectivity inside each image of a B×H×W stack and none across images (MVTec uses a 3×3 ones structure).
_PER_IMAGE_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_PER_IMAGE_8_CONNECTIVITY[1] = True


def region_sizes(anomalous: np.ndarray) -> np.ndarray:
    """Size of the 8-connected ground-truth region of each anomalous pixel of a bool B×H×W stack (row-major order)."""
    labels, _ = ndimage.label(anomalous, structure=_PER_IMAGE_8_CONNECTIVITY)
    # Only anomalous pixels carry a label, so counting those alone gives every region's size.
    anomalous_labels = labels[anomalous]
    return np.bincount(anomalous_labels)[anomalous_labels]


def region_size_map(anomalous: np.ndarray) -> np.ndarray:
    """Per pixel of a bool H×W mask (or B×H×W stack): the size of its 8-connected region, 0 outside (int32).

    The loader computes it where the mask is decoded, so that the metrics never label regions on the host.
    """
    sizes = np.zeros(anomalous.shape, dtype=np.int32)
    if not anomalous.any():  # a normal image's mask: nothing to label
        return sizes
    # Every region lies inside the anomalous pixels' bounding box: labelling that alone gives the same sizes, at a
    # fraction of the cost for a small defect.
    box = tuple(
        slice(present[0], present[-1] + 1)
        for present in (
            np.flatnonzero(anomalous.any(axis=tuple(other for other in range(anomalous.ndim) if other != axis)))
            for axis in range(anomalous.ndim)
        )
    )
    structure = _PER_IMAGE_8_CONNECTIVITY if anomalous.ndim == 3 else _PER_IMAGE_8_CONNECTIVITY[1]
    labels, _ = ndimage.label(anomalous[box], structure=structure)
    counts = np.bincount(labels.ravel())
    counts[0] = 0  # the background
    sizes[box] = counts[labels]
    return sizes


def split_pixels(anomaly_maps: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anomalous pixel scores, their ground-truth region sizes, and normal pixel scores (bool ``anomalous``)."""
    return anomaly_maps[anomalous], region_sizes(anomalous), anomaly_maps[~anomalous]


@dataclass(frozen=True)
class RankedScores:
    """Scores of a binary problem split by class, each sorted ascending.

    ``positive_region_sizes`` (aligned with ``positive``) gives the ground-truth region size of each anomalous
    pixel; only the PRO metrics need it.
    """

    positive: np.ndarray
    negative: np.ndarray
    positive_region_sizes: np.ndarray | None = None

    @classmethod
    def from_unsorted(
        cls, positive: np.ndarray, negative: np.ndarray, positive_region_sizes: np.ndarray | None = None
    ) -> RankedScores:
        """Sort both classes. ``negative`` is sorted in place to spare a copy of the largest array."""
        negative.sort()
        if positive_region_sizes is None:
            return cls(np.sort(positive), negative)
        # The region size breaks score ties so that PRO's float sums do not depend on the input order (DDP ranks).
        order = np.lexsort((positive_region_sizes, positive))
        return cls(positive[order], negative, positive_region_sizes[order])

    @functools.cached_property
    def counts_at_positive_scores(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positives equal to, positives at or above and negatives at or above each distinct positive score.

        These are the thresholds at which recall changes (AP and F1-max share them, computed once).
        """
        positive = self.positive
        starts = np.flatnonzero(np.concatenate(([True], positive[1:] != positive[:-1])))
        new_positives = np.diff(np.append(starts, positive.size))
        true_positives = positive.size - starts
        false_positives = self.negative.size - np.searchsorted(self.negative, positive[starts], side="left")
        return new_positives, true_positives, false_positives

    @classmethod
    def from_targets(cls, scores: np.ndarray, targets: np.ndarray) -> RankedScores:
        """Flat scores with targets 1 (positive) or 0 (negative); any other target (e.g. -1) is ignored."""
        scores, targets = np.asarray(scores).ravel(), np.asarray(targets).ravel()
        return cls.from_unsorted(scores[targets == 1], scores[targets == 0])

    @classmethod
    def from_maps(cls, anomaly_maps: np.ndarray, masks: np.ndarray) -> RankedScores:
        """Pixels of B×H×W anomaly maps against ground-truth masks (binarised at 0.5), with region sizes."""
        positive, sizes, negative = split_pixels(np.asarray(anomaly_maps), np.asarray(masks) > 0.5)
        return cls.from_unsorted(positive, negative, sizes)


def auroc(scores: RankedScores, name: str = "auroc") -> float:
    """Area under the ROC curve, equal to sklearn's trapezoid over tie-grouped ROC points."""
    if (reason := _undefined_reason(scores)) is not None:
        return _undefined(name, reason)
    # Mann-Whitney form of the same area: each positive counts the negatives below it, ties count one half.
    below = np.searchsorted(scores.negative, scores.positive, side="left").sum()
    below_or_tied = np.searchsorted(scores.negative, scores.positive, side="right").sum()
    return float((below + below_or_tied) / (2 * scores.positive.size * scores.negative.size))


def average_precision(scores: RankedScores, name: str = "average_precision") -> float:
    """Step-wise average precision with tied scores grouped, as sklearn's ``average_precision_score``."""
    if (reason := _undefined_reason(scores)) is not None:
        return _undefined(name, reason)
    new_positives, true_positives, false_positives = scores.counts_at_positive_scores
    precision = true_positives / (true_positives + false_positives)
    return float(np.sum(new_positives * precision) / scores.positive.size)


def f1_max(scores: RankedScores, name: str = "f1_max") -> float:
    """Maximum of 2PR/(P+R) over all thresholds, tied scores grouped."""
    return f1_max_and_threshold(scores, name)[0]


def f1_max_and_threshold(scores: RankedScores, name: str = "f1_max") -> tuple[float, float]:
    """F1-max and the score at which it is reached: predicting "anomalous" where ``score >= threshold`` gives
    that F1 (sklearn's ``precision_recall_curve`` convention). Of equal maxima, the lowest threshold. Both are
    NaN (one warning) where F1-max is undefined."""
    if (reason := _undefined_reason(scores)) is not None:
        return _undefined(name, reason), math.nan
    # For a fixed recall F1 falls with more false positives, so the maximum lies at a distinct positive score.
    _, true_positives, false_positives = scores.counts_at_positive_scores
    f1 = 2 * true_positives / (true_positives + false_positives + scores.positive.size)
    best = int(np.argmax(f1))
    distinct_positive = scores.positive[np.concatenate(([True], scores.positive[1:] != scores.positive[:-1]))]
    return float(f1[best]), float(distinct_positive[best])


def aupro(scores: RankedScores, fpr_limit: float = 0.3, name: str = "aupro") -> float:
    """Standard (MVTec) AUPRO: exact area under the per-region-overlap/FPR curve up to ``fpr_limit``, over it.

    Each anomalous pixel adds 1/(region size · number of regions) to PRO, each normal pixel 1/(number of
    normal pixels) to FPR; the curve joins the points of all distinct thresholds and is cut at exactly
    ``fpr_limit`` by linear interpolation.
    """
    check_pro_arguments(fpr_limit)
    if (reason := _undefined_reason(scores)) is not None:
        return _undefined(name, reason)
    positive, negative, weights = scores.positive, scores.negative, _region_weights(scores)
    num_negative = negative.size
    limit_count = fpr_limit * num_negative
    # The tie group of normal scores during which FPR crosses the limit, and the normal counts above / at it.
    cut_score = negative[num_negative - math.ceil(limit_count)]
    above_cut = num_negative - np.searchsorted(negative, cut_score, side="right")
    at_or_above_cut = num_negative - np.searchsorted(negative, cut_score, side="left")
    first_positive_above = np.searchsorted(positive, cut_score, side="right")
    first_positive_tied = np.searchsorted(positive, cut_score, side="left")

    # Full segments (normal scores above the cut): a normal pixel spans 1/n of FPR at the mean height of its tie
    # group's segment ends. Summed per anomalous pixel instead: its weight times the normal pixels between the
    # cut and its score, ties counted one half.
    upper_positive = positive[first_positive_above:]
    upper_weights = weights[first_positive_above:]
    normals_below = (
        np.searchsorted(negative, upper_positive, side="left") + np.searchsorted(negative, upper_positive, side="right")
    ) / 2 - (num_negative - above_cut)
    area = np.sum(upper_weights * normals_below) / num_negative

    # The cut group's segment, interpolated up to exactly the limit.
    overlap_before = np.sum(upper_weights)
    overlap_after = overlap_before + np.sum(weights[first_positive_tied:first_positive_above])
    fpr_span = min(at_or_above_cut, limit_count) - above_cut
    overlap_at_limit = overlap_before + (overlap_after - overlap_before) * fpr_span / (at_or_above_cut - above_cut)
    area += fpr_span / num_negative * (overlap_before + overlap_at_limit) / 2
    return float(area / fpr_limit)


def cflow_pro(
    scores: RankedScores, num_thresholds: int = 200, fpr_limit: float = 0.3, name: str = "cflow_pro"
) -> float:
    """AUPRO as computed by cflow-ad / APRIL-GAN (docs/METHOD.md §6), for comparison with published numbers.

    Thresholds ``min + k·(max − min)/num_thresholds`` (k = 0 … num_thresholds − 1, in the scores' dtype); a pixel
    is detected when its score is strictly above the threshold. Points with FPR < ``fpr_limit`` are kept, their
    FPR axis min-max rescaled to [0, 1], and the PRO curve integrated with the trapezoid rule.
    """
    check_pro_arguments(fpr_limit, num_thresholds)
    if (reason := _undefined_reason(scores)) is not None:
        return _undefined(name, reason)
    positive, negative = scores.positive, scores.negative
    lowest, highest = min(positive[0], negative[0]), max(positive[-1], negative[-1])
    if not np.isfinite([lowest, highest]).all():
        return _undefined(name, "scores are not finite")
    step = (float(highest) - float(lowest)) / num_thresholds
    # Thresholds in the scores' dtype keep the binary searches from upcasting the large normal array.
    thresholds = (float(lowest) + step * np.arange(num_thresholds)).astype(negative.dtype)
    fpr = (negative.size - np.searchsorted(negative, thresholds, side="right")) / negative.size
    overlap_from = np.append(np.cumsum(_region_weights(scores)[::-1])[::-1], 0.0)
    pro = overlap_from[np.searchsorted(positive, thresholds, side="right")]

    kept = fpr < fpr_limit
    fpr, pro = fpr[kept], pro[kept]
    if fpr.size < 2 or fpr.min() == fpr.max():
        return _undefined(name, f"fewer than two distinct FPR values below {fpr_limit}")
    # Thresholds ascend, so FPR descends: reverse for a left-to-right trapezoid.
    rescaled = ((fpr - fpr.min()) / (fpr.max() - fpr.min()))[::-1]
    pro = pro[::-1]
    return float(np.sum(np.diff(rescaled) * (pro[1:] + pro[:-1]) / 2))


def _region_weights(scores: RankedScores) -> np.ndarray:
    """PRO contribution of each anomalous pixel: 1 / (its region's size · number of regions)."""
    if scores.positive_region_sizes is None:
        raise ValueError("PRO metrics need RankedScores with positive_region_sizes (e.g. RankedScores.from_maps)")
    sizes = scores.positive_region_sizes.astype(np.int64)
    unique_sizes, pixel_counts = np.unique(sizes, return_counts=True)
    # Every region of size s holds exactly s of these pixels, so this count is exact.
    num_regions = int(np.sum(pixel_counts // unique_sizes))
    return 1.0 / (sizes * float(num_regions))


def _undefined_reason(scores: RankedScores) -> str | None:
    positive, negative = scores.positive, scores.negative
    if positive.size == 0 and negative.size == 0:
        return "no samples"
    if positive.size == 0:
        return "no positive (anomalous) samples"
    if negative.size == 0:
        return "no negative (normal) samples"
    # NaN sorts last.
    if np.isnan(positive[-1]) or np.isnan(negative[-1]):
        return "scores contain NaN"
    # Equal scores are defined: one threshold takes every sample at once (AUROC 0.5, AUPRO 0.15 at FPR 0.3),
    # as sklearn and the MVTec evaluation code give.
    return None


def _undefined(name: str, reason: str) -> float:
    warnings.warn(f"{name} is undefined ({reason}); returning NaN", UserWarning, stacklevel=3)
    return math.nan


def check_pro_arguments(fpr_limit: float, num_thresholds: int = 2) -> None:
    """Raise ValueError unless 0 < fpr_limit <= 1 and num_thresholds >= 2."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
