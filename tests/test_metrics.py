"""anovl.metrics against independent references: sklearn, threshold-loop AUPRO / cflow PRO, hand-computed values."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from anovl.metrics import AUPRO, AnomalyMetrics, AveragePrecision, CflowPRO, ExactAUROC, F1Max, RankedScores
from anovl.metrics import functional
from tests.reference.metrics import reference_aupro, reference_cflow_pro, reference_f1_max, reference_f1_threshold


def random_maps(seed: int, count: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantised maps (many ties) and blob masks with several 8-connected regions; image 0 is normal."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((count, height, width)), sigma=(0, 1.0, 1.0))
    masks = noise > np.quantile(noise, 0.85)
    masks[0] = False
    levels = rng.integers(0, 40, size=(count, height, width)) + 12 * masks
    return (levels / 40).astype(np.float32), masks.astype(np.float32)


def anomaly_metrics(batches: list[dict[str, torch.Tensor]], **kwargs) -> dict[str, float]:
    metrics = AnomalyMetrics(**kwargs)
    for batch in batches:
        metrics.update(**batch)
    return metrics.compute()


def make_batch(seed: int, count: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """A batch with tied map values, a normal image, an unlabelled image and an image without ground truth."""
    maps, masks = random_maps(seed, count, height, width)
    rng = np.random.default_rng(seed + 1000)
    labels = torch.from_numpy((masks.reshape(count, -1).max(1) > 0).astype(np.int64))
    labels[1] = -1
    has_mask = torch.ones(count, dtype=torch.bool)
    has_mask[2] = False
    masks[2] = 1 - masks[2]  # garbage that must be ignored
    return {
        "anomaly_maps": torch.from_numpy(maps),
        "masks": torch.from_numpy(masks),
        "pred_scores": torch.from_numpy(rng.integers(0, 5, count).astype(np.float32)) + labels.clamp(min=0),
        "labels": labels,
        "has_mask": has_mask,
    }


def split(batch: dict[str, torch.Tensor], order: torch.Tensor, parts: int) -> list[dict[str, torch.Tensor]]:
    chunks = [order[i::parts] for i in range(parts)]
    return [{key: value[chunk] for key, value in batch.items()} for chunk in chunks]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, 3000)
    scores = (rng.integers(0, 30, 3000) + 8 * targets).astype(np.float32) / 7
    preds, target = torch.from_numpy(scores), torch.from_numpy(targets)
    for metric_class, reference in (
        (ExactAUROC, roc_auc_score),
        (AveragePrecision, average_precision_score),
        (F1Max, reference_f1_max),
    ):
        metric = metric_class()
        for part in range(3):  # several updates, each with ties across update boundaries
            metric.update(preds[part::3], target[part::3])
        assert metric.compute() == pytest.approx(reference(targets, scores), abs=1e-12), metric_class.__name__
    ranked = RankedScores.from_targets(scores, targets)
    assert functional.auroc(ranked) == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)


def test_binary_metrics_ignore_unknown_targets():
    scores = torch.tensor([0.9, 0.2, 0.7, 0.4, 5.0])
    targets = torch.tensor([1, 0, 1, 0, -1])
    metric = ExactAUROC()
    metric.update(scores, targets)
    assert metric.compute() == 1.0


@pytest.mark.parametrize(("seed", "fpr_limit"), [(0, 0.3), (1, 0.3), (2, 0.05), (3, 1.0)])
def test_aupro_matches_threshold_loop(seed, fpr_limit):
    maps, masks = random_maps(seed, 5, 10, 11)
    metric = AUPRO(fpr_limit=fpr_limit)
    metric.update(torch.from_numpy(maps[:2]), torch.from_numpy(masks[:2]))
    metric.update(torch.from_numpy(maps[2:]), torch.from_numpy(masks[2:]))
    expected = reference_aupro(list(maps), list(masks), fpr_limit)
    assert metric.compute() == pytest.approx(expected, abs=1e-9)
    assert functional.aupro(RankedScores.from_maps(maps, masks), fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_hand_computed():
    # 8-connectivity: (0,0) and (1,1) touch diagonally -> region A (2 px, weight 1/4 each); (1,4) is region B
    # (weight 1/2). 7 normal pixels. Curve (FPR, PRO): (0,1/4) -> (1/7,1/4) -> (1/7,3/4) -> (2/7,3/4) -> (2/7,1) ...
    # Area to 0.3 = 1/7·1/4 + 1/7·3/4 + (0.3 − 2/7)·1 = 11/70, normalised: 11/21.
    mask = torch.tensor([[[1, 0, 0, 0, 0], [0, 1, 0, 0, 1]]], dtype=torch.float32)
    amap = torch.tensor([[[0.9, 0.8, 0.6, 0.4, 0.3], [0.2, 0.5, 0.1, 0.05, 0.7]]])
    metric = AUPRO()
    metric.update(amap, mask)
    assert metric.compute() == pytest.approx(11 / 21, abs=1e-12)
    # Tying the 0.9 pixel with the 0.8 normal one makes the first segment diagonal: 1/7·1/8 + 3/28 + 1/70 = 39/280.
    amap[0, 0, 0] = 0.8
    metric = AUPRO()
    metric.update(amap, mask)
    assert metric.compute() == pytest.approx(13 / 28, abs=1e-12)


@pytest.mark.parametrize(("seed", "num_thresholds"), [(0, 200), (1, 37)])
def test_cflow_pro_matches_reference_loop(seed, num_thresholds):
    maps, masks = random_maps(seed, 4, 9, 12)
    maps = maps + np.random.default_rng(seed).random(maps.shape, dtype=np.float32) * 0.01  # not on the thresholds
    metric = CflowPRO(num_thresholds=num_thresholds)
    metric.update(torch.from_numpy(maps), torch.from_numpy(masks))
    expected = reference_cflow_pro(list(maps), list(masks), num_thresholds)
    assert metric.compute() == pytest.approx(expected, abs=1e-9)


def test_anomaly_metrics_match_references():
    batch = make_batch(seed=5, count=8, height=10, width=9)
    results = anomaly_metrics(split(batch, torch.arange(8), 3), cflow_pro=True)

    pixel_images = batch["has_mask"].numpy()
    maps, masks = batch["anomaly_maps"].numpy()[pixel_images], batch["masks"].numpy()[pixel_images]
    pixel_targets, pixel_scores = masks.ravel(), maps.ravel()
    image_known = batch["labels"].numpy() >= 0
    image_targets, image_scores = batch["labels"].numpy()[image_known], batch["pred_scores"].numpy()[image_known]
    expected = {
        "pixel_auroc": roc_auc_score(pixel_targets, pixel_scores),
        "pixel_ap": average_precision_score(pixel_targets, pixel_scores),
        "pixel_f1max": reference_f1_max(pixel_targets, pixel_scores),
        "pixel_aupro": reference_aupro(list(maps), list(masks), 0.3),
        "image_auroc": roc_auc_score(image_targets, image_scores),
        "image_ap": average_precision_score(image_targets, image_scores),
        "image_f1max": reference_f1_max(image_targets, image_scores),
        "pixel_aupro_cflow": reference_cflow_pro(list(maps), list(masks)),
        "image_f1max_threshold": reference_f1_threshold(image_targets, image_scores),
        "pixel_f1max_threshold": reference_f1_threshold(pixel_targets, pixel_scores),
    }
    assert results.keys() == expected.keys()
    for key, value in expected.items():
        assert isinstance(results[key], float)
        assert results[key] == pytest.approx(value, abs=1e-9), key


def test_results_do_not_depend_on_batching_or_order():
    batch = make_batch(seed=7, count=12, height=8, width=8)
    reference = anomaly_metrics([batch], cflow_pro=True)
    for seed, parts in ((0, 1), (1, 4), (2, 12)):
        order = torch.randperm(12, generator=torch.Generator().manual_seed(seed))
        assert anomaly_metrics(split(batch, order, parts), cflow_pro=True) == reference


def test_map_sizes_may_change_between_updates():
    small, wide = make_batch(seed=3, count=5, height=8, width=8), make_batch(seed=4, count=5, height=6, width=13)
    results = anomaly_metrics([small, wide])
    maps = [amap.numpy() for batch in (small, wide) for amap in batch["anomaly_maps"][batch["has_mask"]]]
    masks = [mask.numpy() for batch in (small, wide) for mask in batch["masks"][batch["has_mask"]]]
    flat_scores, flat_targets = np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
    assert results["pixel_auroc"] == pytest.approx(roc_auc_score(flat_targets, flat_scores), abs=1e-12)
    assert results["pixel_aupro"] == pytest.approx(reference_aupro(maps, masks, 0.3), abs=1e-9)


def single_batch(amap: torch.Tensor, mask: torch.Tensor, has_mask: bool = True) -> dict[str, torch.Tensor]:
    return {
        "anomaly_maps": amap[None],
        "masks": mask[None],
        "pred_scores": torch.tensor([0.5]),
        "labels": torch.tensor([int(mask.max() > 0)]),
        "has_mask": torch.tensor([has_mask]),
    }


@pytest.mark.parametrize(
    ("batches", "reason"),
    [
        ([single_batch(torch.rand(6, 6), torch.zeros(6, 6))], "no positive"),
        ([single_batch(torch.rand(6, 6), torch.ones(6, 6))], "no negative"),
        ([single_batch(torch.rand(6, 6), torch.ones(6, 6), has_mask=False)], "no samples"),
        ([single_batch(torch.full((6, 6), math.nan), torch.eye(6))], "NaN"),
    ],
)
def test_undefined_pixel_metrics_are_nan_with_warning(batches, reason):
    with pytest.warns(UserWarning) as caught:
        results = anomaly_metrics(batches, cflow_pro=True)
    messages = [str(warning.message) for warning in caught]
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_aupro_cflow"):
        assert math.isnan(results[key]), key
        assert any(message.startswith(f"{key} is undefined (") and reason in message for message in messages), key


@pytest.mark.parametrize("seed", range(6))
def test_equal_scores_follow_sklearn_and_the_standard_aupro(seed):
    # One tie group: ROC and PRO curves jump from (0, 0) to (1, 1); AUROC 0.5, AUPRO 0.3²/2 / 0.3 = 0.15.
    rng = np.random.default_rng(seed)
    count, height, width = int(rng.integers(1, 4)), int(rng.integers(3, 9)), int(rng.integers(3, 9))
    masks = (rng.random((count, height, width)) < rng.uniform(0.05, 0.6)).astype(np.float32)
    masks[0, 0, 0], masks[0, -1, -1] = 1, 0  # both classes present
    value = np.float32(rng.uniform(-5, 5))
    maps = np.full(masks.shape, value, dtype=np.float32)
    labels = torch.tensor([1] + [int(label) for label in rng.integers(0, 2, count - 1)])
    batch = {
        "anomaly_maps": torch.from_numpy(maps),
        "masks": torch.from_numpy(masks),
        "pred_scores": torch.full((count,), float(value)),
        "labels": labels,
        "has_mask": torch.ones(count, dtype=torch.bool),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = anomaly_metrics([batch], cflow_pro=True)
    targets, scores = masks.ravel(), maps.ravel()
    assert results["pixel_auroc"] == roc_auc_score(targets, scores) == 0.5
    assert results["pixel_ap"] == pytest.approx(average_precision_score(targets, scores), abs=1e-12)
    assert results["pixel_f1max"] == pytest.approx(reference_f1_max(targets, scores), abs=1e-12)
    assert results["pixel_aupro"] == pytest.approx(reference_aupro(list(maps), list(masks), 0.3), abs=1e-12)
    assert results["pixel_aupro"] == pytest.approx(0.15, abs=1e-12)
    if (labels == 0).any():
        assert results["image_auroc"] == 0.5
        assert results["image_ap"] == pytest.approx(average_precision_score(labels.numpy(), np.full(count, value)))
    # cflow-ad's loop divides by the FPR range, zero here: it stays undefined, as in the reference code.
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(reference_cflow_pro(list(maps), list(masks)))
    assert math.isnan(results["pixel_aupro_cflow"])
    undefined = [str(warning.message).split(" ")[0] for warning in caught if "is undefined" in str(warning.message)]
    assert set(undefined) <= {"pixel_aupro_cflow", "image_auroc", "image_ap", "image_f1max"}


def test_unknown_image_labels_give_nan_image_metrics():
    batch = make_batch(seed=1, count=4, height=6, width=6)
    batch["labels"][:] = -1
    with pytest.warns(UserWarning) as caught:
        results = anomaly_metrics([batch])
    assert [str(warning.message) for warning in caught] == [
        f"{key} is undefined (no samples); returning NaN" for key in ("image_auroc", "image_ap", "image_f1max")
    ]
    assert all(math.isnan(value) == key.startswith("image") for key, value in results.items())


def test_cflow_pro_without_enough_points_below_limit_is_nan():
    # Two score levels: FPR is 0 or 1, a single point below the limit.
    amap = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    with pytest.warns(UserWarning) as caught:
        results = anomaly_metrics([single_batch(amap, mask)], cflow_pro=True)
    assert "pixel_aupro_cflow is undefined (fewer than two distinct FPR values below 0.3); returning NaN" in [
        str(warning.message) for warning in caught
    ]
    assert math.isnan(results["pixel_aupro_cflow"]) and results["pixel_aupro"] == 1.0


def test_invalid_inputs_raise():
    batch = make_batch(seed=0, count=3, height=4, width=4)
    with pytest.raises(ValueError, match="B×H×W"):
        AnomalyMetrics().update(**{**batch, "masks": batch["masks"][:, :2]})
    metrics = AnomalyMetrics()
    metrics.update(**{**batch, "labels": torch.tensor([0, 2, 1])})  # checked on the host, in compute
    with pytest.raises(ValueError, match="labels"):
        metrics.compute()
    with pytest.raises(ValueError, match="pred_scores"):
        AnomalyMetrics().update(**{**batch, "pred_scores": torch.zeros(2)})
    with pytest.raises(ValueError, match="fpr_limit"):
        AnomalyMetrics(aupro_fpr_limit=0)


def ddp_batches() -> list[dict[str, torch.Tensor]]:
    """Rank 0: mixed images; rank 1: other map size, only normal image labels and no ground truth at all."""
    first, second = make_batch(seed=11, count=6, height=8, width=8), make_batch(seed=12, count=4, height=6, width=10)
    second["labels"][:] = 0
    second["has_mask"][:] = False
    return [first, second]


def ddp_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # forked from a parent whose OpenMP pool is not fork-safe
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        metrics = AnomalyMetrics(cflow_pro=True)
        metrics.update(**ddp_batches()[rank])
        results = metrics.compute()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_equals_single_process(tmp_path):
    # Forked rather than spawned: a spawned child re-imports torchmetrics, which alone takes seconds.
    mp.start_processes(
        ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every metric is defined here
        single = anomaly_metrics(ddp_batches()[::-1], cflow_pro=True)  # other concatenation order than the ranks
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single


def naive_region_size_map(mask: np.ndarray) -> np.ndarray:
    """Flood fill, 8-connected: per pixel the size of its region, 0 outside."""
    sizes = np.zeros(mask.shape, dtype=np.int64)
    seen = np.zeros(mask.shape, dtype=bool)
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        region, stack = [], [start]
        seen[start] = True
        while stack:
            row, column = stack.pop()
            region.append((row, column))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    r, c = row + dr, column + dc
                    if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c] and not seen[r, c]:
                        seen[r, c] = True
                        stack.append((r, c))
        for pixel in region:
            sizes[pixel] = len(region)
    return sizes


def test_region_size_map_matches_a_flood_fill():
    _, masks = random_maps(seed=9, count=4, height=12, width=11)
    stacked = functional.region_size_map(masks > 0.5)
    for mask, sizes in zip(masks > 0.5, stacked):
        assert np.array_equal(functional.region_size_map(mask), naive_region_size_map(mask))
        assert np.array_equal(sizes, naive_region_size_map(mask))  # no region crosses images of a stack
    for empty in (np.zeros((5, 4), dtype=bool), np.zeros((2, 5, 4), dtype=bool)):
        sizes = functional.region_size_map(empty)
        assert sizes.dtype == stacked.dtype == np.int32 and sizes.shape == empty.shape and not sizes.any()


def test_region_sizes_from_the_loader_give_the_same_metrics():
    batches = [make_batch(seed=21, count=6, height=9, width=9), make_batch(seed=22, count=4, height=7, width=12)]
    reference = anomaly_metrics(batches, cflow_pro=True)
    with_regions = [
        {**batch, "region_sizes": torch.from_numpy(functional.region_size_map(batch["masks"].numpy() > 0.5))}
        for batch in batches
    ]
    assert anomaly_metrics(with_regions, cflow_pro=True) == reference


def test_update_with_loader_regions_needs_no_values():
    # Tensors on the meta device have no values: anything that reads one (.item(), a selection through a boolean
    # index, .cpu(), a Python `if` on a tensor) raises. On CUDA each of those would be a host round trip.
    batch = {key: value.to("meta") for key, value in make_batch(seed=1, count=4, height=8, width=8).items()}
    metrics = AnomalyMetrics().to("meta")
    metrics.update(**batch, region_sizes=torch.zeros(4, 8, 8, dtype=torch.int32, device="meta"))
    assert [state[0].device.type for state in (metrics.pixel_scores, metrics.pixel_regions)] == ["meta", "meta"]
    with pytest.raises((NotImplementedError, RuntimeError)):  # the fallback labels regions on the host
        AnomalyMetrics().to("meta").update(**batch)
