"""Performance benchmark of AnoVL: every figure is a ratio of two things measured in the same run.

    python -m benchmarks.bench --quick                 # from the repository root; CPU, a few minutes
    python -m benchmarks.bench --device cuda --precision bf16 --output gpu.md
    python benchmarks/bench.py --quick                 # the same, as a file

Sections (``--sections`` picks some):

* ``encoder``: TFA forward (dual path, 1 view) ÷ CLIP's plain ``encode_image``, same batch and resolution;
* ``throughput``: images/s of TFA 1 view, TFA 22 views and TFA+TTA per batch size, split into the stages of
  ``AnoVL.forward`` (timed inside the real call through ``AnoVL.stage_timer``, see :func:`staged_forward`)
  and checked against the end-to-end call;
* ``reference``: AnoVL against :func:`tests.reference.pipeline.reference_pipeline`, the authors'
  one-image-at-a-time loop (every view a separate dual-path call, TTA per image): speed-up and the largest
  difference of their outputs;
* ``text``: text-embedding start-up, encoding a class's prompts (cold) against reading the on-disk cache;
* ``metrics``: exact pixel AUROC + AUPRO (:class:`~anovl.metrics.AnomalyMetrics`) over an MVTec-sized set of
  maps against :func:`threshold_pro_curve`, the 200-threshold connected-component PRO of cflow-ad;
* ``testrun``: peak memory and time of a Lightning test run (AnomalyModule(AnoVL) + MVTecDataModule);
* ``precision``: with ``--precision bf16|fp16``, what autocast changes in the maps and what it gains.

Memory is the kernel's resident-set high-water mark of a fresh process (see :class:`PeakMemory`), which sees
numpy, torch and C allocations alike. Linux only for the memory figures.

It lives outside the package (it needs the repository: the reference pipeline is a test oracle, under tests/).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import gc
import io
import logging
import math
import multiprocessing
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a file (python benchmarks/bench.py): the repository root is not on the path
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from anovl.metrics import AnomalyMetrics, functional
from anovl.models.anovl.prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, PromptSet
from anovl.models.text_cache import TextEmbeddingCache, encode_sentences
from anovl.models.anovl.torch_model import AnoVL
from anovl.models.anovl.tta import TTAConfig
from anovl.models.anovl.views import NUM_REFERENCE_VIEWS
from anovl.results import markdown_table
from tests.reference.pipeline import reference_pipeline

SECTIONS = ("encoder", "throughput", "reference", "text", "metrics", "testrun", "precision")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
STAGES = ("text", "views", "encoder", "maps", "tta", "metrics")
MVTEC_TEST_IMAGES = 1725  # MVTec AD's test set: 15 categories
CLASS_NAME = "bottle"
# Without TTA the forward's cost does not depend on the number of prompts (they are averaged into two
# embeddings once), while encoding all 924 takes ~100 s with ViT-B-16-plus-240's text tower on a CPU.
FEW_PROMPTS = PromptSet(normal_states=NORMAL_STATES[:1], abnormal_states=ABNORMAL_STATES[:1], templates=TEMPLATES[:1])


@dataclass
class BenchConfig:
    """What to run and how big; :func:`quick_config` and :func:`full_config` give the two presets."""

    device: str = "cpu"
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = (1, 16)
    backbone: str = "ViT-B-16-plus-240"  # every section but ``encoder``
    encoder_backbone: str = "ViT-B-16-plus-240"
    pretrained: str | None = None  # random weights: speed does not depend on them
    repeats: int = 5  # timed repetitions; the minimum is reported
    encoder_repeats: int = 5
    reference_images: int = 16
    num_maps: int = MVTEC_TEST_IMAGES
    map_size: int = 240
    baseline_maps: int | None = None  # maps the threshold baseline runs on (None: all), time extrapolated
    test_categories: int = 15
    test_good: int = 31  # normal test images per category
    test_defect: int = 21  # test images per defect type (4 types) per category: 15 × (31 + 84) = 1725
    precision_categories: int = 4
    precision_good: int = 8
    precision_defect: int = 4
    data_workers: int = 8  # processes generating the synthetic test set
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    isolate: bool = True  # memory measurements in a fresh process; False (tests): in this one, figures may read low
    sections: tuple[str, ...] = SECTIONS
    quick: bool = False


def full_config(**overrides: Any) -> BenchConfig:
    """Full sizes, meant for a GPU."""
    return replace(BenchConfig(), **overrides)


def quick_config(**overrides: Any) -> BenchConfig:
    """A few minutes on a CPU: the reference backbone for the encoder ratio, a small one elsewhere.

    One torch thread: on a CPU shared with other work, two threads ran 3× slower than one and varied 2×
    between repetitions, one thread within 10 %; the ratios are what quick mode is for.
    """
    quick = BenchConfig(
        backbone="anovl-small-vit", repeats=2, encoder_repeats=2, reference_images=4, baseline_maps=60,
        test_categories=2, test_good=4, test_defect=2, precision_categories=2, precision_good=4,
        precision_defect=2, data_workers=1, threads=1, quick=True,
    )
    return replace(quick, **overrides)


# ----------------------------------------------------------------------------- report


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", *markdown_table(self.columns, self.rows)]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def seconds(value: float) -> str:
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def ratio(value: float) -> str:
    return f"{value:.3g}×"


def megabytes(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MB"


def target(met: bool, text: str) -> str:
    return f"(target {text}: {'met' if met else 'MISSED'})"


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"{cpu}, {cores} cores usable ({os.cpu_count()} online), {torch.get_num_threads()} torch threads"]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def time_call(function: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall-clock seconds of one call, with the device's queued work finished on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def interleaved_minimum(functions: Sequence[Callable[[], Any]], repeats: int, device: torch.device) -> list[float]:
    """Minimum time of each function over ``repeats`` rounds, the functions alternating within a round so that a
    noisy neighbour slows all of them alike."""
    best = [math.inf] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            best[index] = min(best[index], time_call(function, device)[0])
    return best


class StageTimer:
    """Seconds per pipeline stage; on CUDA it synchronises around each stage so that its kernels count in it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def stage(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


class PeakMemory:
    """Peak resident memory of this process above the level at :meth:`start` (and peak CUDA memory).

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), which then records every
    page the process touches, whatever allocated it; tracemalloc sees neither numpy's nor torch's buffers.
    Run it in a fresh process (:func:`run_isolated`): memory freed earlier in a long-lived process can be
    reused without raising RSS, hiding part of the peak.
    """

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.baseline: int | None = None

    def start(self) -> None:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = _status_bytes("VmRSS")
        except OSError:
            self.baseline = None  # not Linux, or no permission: memory figures become n/a
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_baseline = torch.cuda.memory_allocated(self.device)

    def stop(self) -> dict[str, int | None]:
        peak = None if self.baseline is None else _status_bytes("VmHWM")
        result = {"peak_rss": peak, "extra_rss": None if peak is None else peak - self.baseline, "cuda_extra": None}
        if self.device.type == "cuda":
            synchronize(self.device)
            result["cuda_extra"] = torch.cuda.max_memory_allocated(self.device) - self.cuda_baseline
        return result


def run_isolated(function: Callable[..., Any], *args: Any, threads: int | None = None, isolate: bool = True) -> Any:
    """``function(*args)`` in a fresh interpreter (spawned), so that its memory peak is its own.

    ``isolate=False`` calls it here instead (tests: no interpreter start-up; the memory peak may read low).
    """
    if not isolate:
        return function(*args)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_call_in_fresh_process, threads, function, *args).result()


def _call_in_fresh_process(threads: int | None, function: Callable[..., Any], *args: Any) -> Any:
    setup_process(threads)
    return function(*args)


def setup_process(threads: int | None) -> None:
    """Set the torch thread count and silence warnings and log chatter (random weights, Lightning's banner)."""
    if threads is not None:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    # Disabling below ERROR holds even for loggers that set their own level later (Lightning does, on import).
    logging.disable(logging.WARNING)


# ----------------------------------------------------------------------------- synthetic inputs


def synthetic_masks(count: int, size: int, seed: int = 0,
                    anomalous_fraction: float = 1 / 3) -> tuple[torch.Tensor, torch.Tensor]:
    """MVTec-like ground truth: bool masks (count, size, size) and labels (count,).

    About ``anomalous_fraction`` of the images hold 1–3 defects: irregular blobs from 2 % to 25 % of the side
    across, and thin scratches; the others are empty.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(count, generator=generator) < anomalous_fraction).long()
    labels[0], labels[-1] = 1, 0  # both classes present however small the set
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    for index in torch.nonzero(labels).flatten().tolist():
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            u = torch.rand(7, generator=generator).tolist()
            radius = size * 0.02 * 12.5 ** u[2]  # log-uniform
            minor = max(1.0, radius * 0.05) if u[3] < 0.25 else radius * (0.4 + 0.6 * u[4])  # scratch or blob
            angle = math.pi * u[5]
            # Drawn in the defect's bounding box only: a full-image grid per defect costs seconds per thousand.
            reach = int(1.3 * radius) + 2
            centre_x, centre_y = int(size * (0.1 + 0.8 * u[0])), int(size * (0.1 + 0.8 * u[1]))
            top, left = max(0, centre_y - reach), max(0, centre_x - reach)
            bottom, right = min(size, centre_y + reach), min(size, centre_x + reach)
            dy = torch.arange(top, bottom, dtype=torch.float32)[:, None] - centre_y
            dx = torch.arange(left, right, dtype=torch.float32)[None, :] - centre_x
            along = (dx * math.cos(angle) + dy * math.sin(angle)) / radius
            across = (-dx * math.sin(angle) + dy * math.cos(angle)) / minor
            wobble = 1 + 0.25 * torch.sin(5 * torch.atan2(across, along) + 2 * math.pi * u[6])
            masks[index, top:bottom, left:right] |= along**2 + across**2 < wobble**2
    return masks, labels


def synthetic_maps(masks: torch.Tensor, seed: int = 0, chunk: int = 256) -> torch.Tensor:
    """Float32 anomaly maps correlated with ``masks``, built like AnoVL's: a value per 16×16 patch (the
    patch's anomalous fraction, weighted per image, plus noise), 3×3 mean, bilinear upsampling."""
    generator = torch.Generator().manual_seed(seed)
    count, size, _ = masks.shape
    patch = max(1, size // 16)
    maps = torch.empty(count, size, size)
    for start in range(0, count, chunk):
        part = masks[start:start + chunk, None].float()
        fraction = F.avg_pool2d(part, patch)
        strength = 2 + 6 * torch.rand(part.shape[0], 1, 1, 1, generator=generator)
        logits = strength * fraction + 0.8 * torch.randn(fraction.shape, generator=generator) - 1.5
        smooth = F.avg_pool2d(F.pad(torch.sigmoid(logits), (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        maps[start:start + chunk] = F.interpolate(smooth, size=(size, size), mode="bilinear", align_corners=True)[:, 0]
    return maps


def random_images(batch: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


def metric_targets(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(masks, labels, has_mask) for :meth:`AnomalyMetrics.update`."""
    masks, labels = synthetic_masks(batch, size)
    return masks.float().to(device), labels.to(device), torch.ones(batch, dtype=torch.bool, device=device)


def build_model(backbone: str, pretrained: str | None, num_views: int, tta: TTAConfig | None, cache_dir: Path,
                device: torch.device, prompts: PromptSet | None = None) -> AnoVL:
    torch.manual_seed(0)  # random weights: the same model in every section and run
    return AnoVL(backbone, pretrained=pretrained, num_views=num_views, tta=tta, cache_dir=cache_dir,
                 prompts=prompts).to(device)


# ----------------------------------------------------------------------------- the pipelines


def staged_forward(model: AnoVL, images: torch.Tensor, class_names: Sequence[str], timer: StageTimer,
                   metrics: AnomalyMetrics | None = None,
                   targets: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``AnoVL.forward`` with its stages timed (text, views, encoder, maps, tta), then ``AnomalyMetrics.update``."""
    model.stage_timer = timer.stage
    try:
        output = model(images, class_names)
    finally:
        model.stage_timer = None
    if metrics is not None:
        with timer.stage("metrics"):
            metrics.update(output.anomaly_map, targets[0], output.pred_score, targets[1], targets[2])
    return output.anomaly_map, output.pred_score


# ----------------------------------------------------------------------------- threshold PRO baseline


def threshold_pro_curve(maps: np.ndarray, masks: np.ndarray,
                        num_thresholds: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at ``num_thresholds`` thresholds, computed as cflow-ad's ``cal_pro_score`` does.

    For each threshold ``min + k·(max − min)/num_thresholds`` every map is binarised (score > threshold) and, per
    image, the ground-truth regions are labelled (8-connected) and each region's detected fraction taken; PRO
    is the mean over all regions, FPR the detected fraction of all normal pixels.
    """
    masks = np.asarray(masks) > 0.5
    normal = ~masks
    lowest, highest = float(maps.min()), float(maps.max())
    step = (highest - lowest) / num_thresholds
    thresholds = (lowest + step * np.arange(num_thresholds)).astype(maps.dtype)
    eight_connected = np.ones((3, 3), dtype=bool)
    fprs, pros = [], []
    for threshold in thresholds:
        detected = maps > threshold
        overlaps = []
        for image_detected, mask in zip(detected, masks):
            regions, count = ndimage.label(mask, structure=eight_connected)
            for region in range(1, count + 1):
                overlaps.append(image_detected[regions == region].mean())
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(detected, normal).sum() / normal.sum())
    return np.array(fprs), np.array(pros)


def cflow_pro_from_curve(fprs: np.ndarray, pros: np.ndarray, fpr_limit: float = 0.3) -> float:
    """cflow-ad's reduction: keep FPR < limit, min-max rescale FPR, trapezoid (docs/METHOD.md §6)."""
    kept = fprs < fpr_limit
    fpr, pro = fprs[kept][::-1], pros[kept][::-1]  # thresholds descending: FPR ascending
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    return float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1]) / 2))


def aupro_from_curve(fprs: np.ndarray, pros: np.ndarray, fpr_limit: float = 0.3) -> float:
    """The standard AUPRO from a sampled curve: from (0, 0), cut at the limit by interpolation, over the limit."""
    fpr = np.concatenate([[0.0], fprs[::-1]])  # thresholds descending (FPR ascending), from above the maximum
    pro = np.concatenate([[0.0], pros[::-1]])
    pro_at_limit = np.interp(fpr_limit, fpr, pro)
    kept = fpr < fpr_limit
    fpr, pro = np.append(fpr[kept], fpr_limit), np.append(pro[kept], pro_at_limit)
    return float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1]) / 2) / fpr_limit)


# ----------------------------------------------------------------------------- sections


def encoder_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    model = build_model(config.encoder_backbone, config.pretrained, 1, None, workdir / "text-cache", device,
                        FEW_PROMPTS)
    section = Section(
        f"TFA forward vs plain CLIP encode_image ({config.encoder_backbone}, {model.image_size} px)",
        ["batch", "encode_image", "TFA encoder (dual path)", "TFA forward, 1 view", "encoder ÷ encode_image",
         "TFA forward ÷ encode_image"],
        notes=[f"Minimum of {config.encoder_repeats} interleaved repetitions. 'TFA forward' is "
               "`AnoVL(num_views=1)(images, names)`: dual-path encoder, maps and image scores (text embeddings of "
               "a 6-sentence prompt set, encoded during the warm-up: the prompt count does not change this cost); "
               "target ≤ 1.2 at batch 16."],
    )
    for batch in config.batch_sizes:
        images = random_images(batch, model.image_size, device)
        names = [CLASS_NAME] * batch
        functions = [lambda x, n: model.clip.encode_image(x),
                     lambda x, n: model.encoder(x, num_local=len(n), layers=model.layers),
                     lambda x, n: model(x, n)]
        with torch.no_grad(), autocast(device, config.precision):
            for function in functions:  # warm-up (lazy initialisation, CUDA context) on one image: cheap on a CPU
                function(images[:1], names[:1])
            plain, dual, forward = interleaved_minimum([functools.partial(f, images, names) for f in functions],
                                                       config.encoder_repeats, device)
        verdict = target(forward / plain <= 1.2, "≤ 1.2") if batch == 16 else ""
        section.rows.append([str(batch), seconds(plain), seconds(dual), seconds(forward), ratio(dual / plain),
                             f"{ratio(forward / plain)} {verdict}".strip()])
    return section


PIPELINES = (("TFA, 1 view", 1, False), (f"TFA, {NUM_REFERENCE_VIEWS} views", NUM_REFERENCE_VIEWS, False),
             (f"TFA+TTA (5 steps), {NUM_REFERENCE_VIEWS} views", NUM_REFERENCE_VIEWS, True))


def measure_pipeline(model: AnoVL, batch: int, device: torch.device, precision: str,
                     repeats: int) -> tuple[float, StageTimer]:
    """Minimum end-to-end seconds of ``model(images, names)`` + metrics update, and the staged run of the
    smallest total, over ``repeats`` alternating repetitions after a one-image warm-up."""
    images = random_images(batch, model.image_size, device)
    names = [CLASS_NAME] * batch
    targets = metric_targets(batch, model.image_size, device)

    def end_to_end(metrics: AnomalyMetrics) -> None:
        with autocast(device, precision):
            output = model(images, names)
        metrics.update(output.anomaly_map, targets[0], output.pred_score, targets[1], targets[2])

    with autocast(device, precision):
        model(images[:1], names[:1])  # warm-up
    best_total, best_timer = math.inf, None
    for _ in range(repeats):
        metrics = AnomalyMetrics().to(device)
        best_total = min(best_total, time_call(lambda: end_to_end(metrics), device)[0])
        timer = StageTimer(device)
        with autocast(device, precision):
            staged_forward(model, images, names, timer, AnomalyMetrics().to(device), targets)
        if best_timer is None or timer.total < best_timer.total:
            best_timer = timer
    return best_total, best_timer


def stage_cells(timer: StageTimer, batch: int) -> list[str]:
    return [f"{timer.seconds[stage] / batch * 1e3:.3g}" for stage in STAGES]


def throughput_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    section = Section(
        f"Throughput and stage split ({config.backbone})",
        ["pipeline", "batch", "images/s", "× batch 1", *[f"{stage} ms/img" for stage in STAGES],
         "Σ stages ÷ end-to-end"],
        notes=["images/s: end-to-end `model(images, names)` + `AnomalyMetrics.update`, minimum of "
               f"{config.repeats} repetitions. Stages: `staged_forward`, timed inside the real `AnoVL.forward` "
               "call (text = embedding look-up; tta = seeds, adaptation and the adapted map), each "
               "synchronised on CUDA. Σ stages ÷ end-to-end near 1 says the split accounts for the whole call."],
    )
    for name, num_views, with_tta in PIPELINES:
        model = build_model(config.backbone, config.pretrained, num_views, TTAConfig() if with_tta else None,
                            workdir / "text-cache", device)
        single = None
        for batch in config.batch_sizes:
            total, timer = measure_pipeline(model, batch, device, config.precision, config.repeats)
            rate = batch / total
            single = rate if batch == 1 else single
            section.rows.append([name, str(batch), f"{rate:.3g}", ratio(rate / single) if single else "",
                                 *stage_cells(timer, batch), f"{timer.total / total:.2f}"])
        del model
    return section


def reference_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    batch = max(config.batch_sizes)
    model = build_model(config.backbone, config.pretrained, NUM_REFERENCE_VIEWS, TTAConfig(),
                        workdir / "text-cache", device)
    images = random_images(batch, model.image_size, device)
    names = [CLASS_NAME] * batch
    count = min(config.reference_images, batch)
    with autocast(device, config.precision):
        reference_pipeline(model, images[:1], names[:1])  # warm-up
        reference_timer = StageTimer(device)
        reference_maps, reference_scores = reference_pipeline(model, images[:count], names[:count],
                                                              reference_timer.stage)
        output = model(images, names)  # warm-up, and the outputs compared
        timers = []
        for _ in range(config.repeats):
            timers.append(StageTimer(device))
            staged_forward(model, images, names, timers[-1])
    timer = min(timers, key=lambda t: t.total)
    map_error = (output.anomaly_map[:count].float() - reference_maps.float()).abs().max().item()
    score_error = (output.pred_score[:count].float() - reference_scores.float()).abs().max().item()

    def per_image(stage_timer: StageTimer, images_run: int, stages: Sequence[str]) -> float:
        return sum(stage_timer.seconds[stage] for stage in stages) / images_run

    section = Section(
        f"AnoVL vs the one-image-at-a-time reference pipeline ({config.backbone}, {NUM_REFERENCE_VIEWS} views + TTA)",
        ["part", "reference ms/img", f"AnoVL batch {batch} ms/img", "speed-up"],
        notes=[f"Reference: `reference_pipeline` on {count} images, each of the {NUM_REFERENCE_VIEWS} views a "
               f"separate dual-path call, TTA per image. AnoVL: `staged_forward` on a batch of {batch}, minimum of "
               f"{config.repeats}. Largest difference of their outputs: map {map_error:.2g}, score "
               f"{score_error:.2g}."],
    )
    for part, stages in (("whole pipeline", STAGES), ("encoder", ("encoder",)), ("TTA", ("tta",))):
        reference = per_image(reference_timer, count, stages)
        optimised = per_image(timer, batch, stages)
        section.rows.append([part, f"{reference * 1e3:.4g}", f"{optimised * 1e3:.4g}", ratio(reference / optimised)])
    return section


def text_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    model = build_model(config.backbone, config.pretrained, 1, None, workdir / "text-cache-model", device)
    backbone, prompts = model.text_cache.backbone, model.prompts
    cache_dir = workdir / "text-cache-timed"
    encode_sentences(backbone, ["a warm-up sentence"])  # first-call costs (CUDA context, kernels) are not the cache's
    normal, abnormal = prompts.normal_sentences(CLASS_NAME), prompts.abnormal_sentences(CLASS_NAME)
    cold, _ = time_call(lambda: TextEmbeddingCache(backbone, cache_dir).get(normal, abnormal), device)
    cached = min(time_call(lambda: TextEmbeddingCache(backbone, cache_dir).get(normal, abnormal), device)[0]
                 for _ in range(max(3, config.repeats)))
    return Section(
        f"Text-embedding start-up ({config.backbone})",
        ["cold: encode the class's prompts", "cached: new TextEmbeddingCache reading safetensors", "ratio"],
        [[seconds(cold), seconds(cached), f"{ratio(cold / cached)} {target(cold / cached >= 20, '≥ 20×')}"]],
        [f"{len(normal) + len(abnormal)} sentences for one class; cold includes writing the cache file; cached is the minimum "
         f"of {max(3, config.repeats)} fresh caches (key, file read), as in a new process."],
    )


def _exact_metrics_child(meter: PeakMemory, data: str) -> dict[str, Any]:
    """AnomalyMetrics over all maps, updated in batches of 16 as in a test run, then computed."""
    maps, masks, labels = (np.load(Path(data) / f"{name}.npy") for name in ("maps", "masks", "labels"))
    meter.start()
    start = time.perf_counter()
    metrics = AnomalyMetrics()
    for index in range(0, len(maps), 16):
        batch_maps = torch.from_numpy(maps[index:index + 16])
        metrics.update(batch_maps, torch.from_numpy(masks[index:index + 16]).float(), batch_maps.amax((1, 2)),
                       torch.from_numpy(labels[index:index + 16]), torch.ones(len(batch_maps), dtype=torch.bool))
    values = metrics.compute()
    return {"seconds": time.perf_counter() - start, **meter.stop(), **values}


def _threshold_baseline_child(meter: PeakMemory, data: str, count: int) -> dict[str, Any]:
    maps, masks = (np.load(Path(data) / f"{name}.npy")[:count] for name in ("maps", "masks"))
    meter.start()
    start = time.perf_counter()
    fprs, pros = threshold_pro_curve(maps, masks)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, **meter.stop(), "cflow_pro": cflow_pro_from_curve(fprs, pros),
            "aupro": aupro_from_curve(fprs, pros)}


def metrics_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    masks, labels = synthetic_masks(config.num_maps, config.map_size)
    maps = synthetic_maps(masks)
    data = workdir / "metric-data"
    data.mkdir(exist_ok=True)
    for name, array in (("maps", maps.numpy()), ("masks", masks.numpy()), ("labels", labels.numpy())):
        np.save(data / f"{name}.npy", array)
    count = min(config.baseline_maps or config.num_maps, config.num_maps)
    exact = run_isolated(_exact_metrics_child, PeakMemory(), str(data), threads=config.threads,
                         isolate=config.isolate)
    baseline = run_isolated(_threshold_baseline_child, PeakMemory(), str(data), count, threads=config.threads,
                            isolate=config.isolate)
    subset = functional.RankedScores.from_maps(maps[:count].numpy(), masks[:count].numpy())
    extrapolated = baseline["seconds"] * config.num_maps / count
    speed = extrapolated / exact["seconds"]
    extra = exact["extra_rss"]
    scaled = f" (run on {count} maps, time extrapolated linearly)" if count < config.num_maps else ""
    return Section(
        f"Pixel metrics over {config.num_maps} maps of {config.map_size}×{config.map_size}",
        ["implementation", "time", "peak extra memory", "ratio"],
        [["exact: AnomalyMetrics update (batches of 16) + compute, all 7 metrics", seconds(exact["seconds"]),
          f"{megabytes(extra)} {target(extra is not None and extra < 2 * 2**30, '< 2 GB')}", ""],
         [f"baseline: 200-threshold connected-component PRO only{scaled}", seconds(extrapolated),
          megabytes(baseline["extra_rss"]), f"exact is {ratio(speed)} faster {target(speed >= 10, '≥ 10×')}"]],
        [f"Synthetic MVTec-like set: {int(labels.sum())} anomalous images (1–3 blobs or scratches each), "
         f"{masks.float().mean().item():.1%} anomalous pixels, smooth maps correlated with the masks: exact pixel "
         f"AUROC {exact['pixel_auroc']:.3f}, AUPRO {exact['pixel_aupro']:.3f}.",
         "Both on the CPU, whatever the device. Peak extra memory: resident-set high-water mark above the level "
         f"with the maps loaded, in a fresh process{' (baseline: for its ' + str(count) + ' maps)' if scaled else ''}.",
         f"Agreement on the {count} baseline maps: cflow-style PRO {baseline['cflow_pro']:.5f} (baseline) vs "
         f"{functional.cflow_pro(subset):.5f} (anovl.metrics); AUPRO from the 200-threshold curve "
         f"{baseline['aupro']:.4f} vs exact {functional.aupro(subset):.4f}."],
    )


def _test_run_child(meter: PeakMemory, settings: dict[str, Any]) -> dict[str, Any]:
    """``Trainer.test`` of AnomalyModule(AnoVL) on an MVTecDataModule, as ``anovl test`` runs it."""
    from lightning.pytorch import Trainer

    from anovl.data import MVTecDataModule
    from anovl.engine import AnomalyModule

    module = AnomalyModule(AnoVL(settings["backbone"], settings["pretrained"], num_views=NUM_REFERENCE_VIEWS,
                                 cache_dir=settings["cache_dir"]), results_dir=settings["workdir"])
    datamodule = MVTecDataModule(settings["root"], image_size=module.model.image_size,
                                 batch_size=settings["batch_size"])
    datamodule.setup("test")
    trainer = Trainer(accelerator="gpu" if settings["device"] == "cuda" else "cpu", devices=1,
                      precision=LIGHTNING_PRECISION[settings["precision"]], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      inference_mode=False, default_root_dir=settings["workdir"])
    meter.start()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the results table is not the benchmark's output
        trainer.test(module, datamodule=datamodule, verbose=False)
    return {"seconds": time.perf_counter() - start, "images": len(datamodule.dataset), **meter.stop()}


def generate_test_set(root: Path, categories: int, good: int, defect: int, image_size: int, workers: int) -> Path:
    """A synthetic MVTec-layout set of ``categories`` categories cycling through the generator's styles."""
    from anovl.data import generate_mvtec_like
    from anovl.data.synthetic import OBJECT_STYLES, TEXTURE_STYLES

    styles = OBJECT_STYLES + TEXTURE_STYLES
    names = {f"{styles[index % len(styles)]}{index:02d}": styles[index % len(styles)] for index in range(categories)}
    arguments = [(root, {name: style}, good, defect, 0, image_size) for name, style in names.items()]
    if workers > 1:
        # Spawned, not forked: the parent may hold CUDA and thread pools that a fork must not copy.
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(generate_mvtec_like, *zip(*arguments)))
    else:
        for argument in arguments:
            generate_mvtec_like(*argument)
    return root


def testrun_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    root = generate_test_set(workdir / "test-set", config.test_categories, config.test_good, config.test_defect,
                             256, config.data_workers)
    batch = max(config.batch_sizes)
    settings = {"backbone": config.backbone, "pretrained": config.pretrained, "cache_dir": str(workdir / "text-cache"),
                "workdir": str(workdir / "test-run"), "root": str(root), "batch_size": batch,
                "device": device.type, "precision": config.precision}
    result = run_isolated(_test_run_child, PeakMemory(device.type), settings, threads=config.threads,
                          isolate=config.isolate)
    size = "" if result["images"] >= MVTEC_TEST_IMAGES else " (quick: a small set, not MVTec-sized)"
    return Section(
        f"Lightning test run{size}",
        ["images", "categories", "time", "images/s", "peak RSS", "peak extra RSS", "peak extra CUDA memory"],
        [[str(result["images"]), str(config.test_categories), seconds(result["seconds"]),
          f"{result['images'] / result['seconds']:.3g}", megabytes(result["peak_rss"]), megabytes(result["extra_rss"]),
          megabytes(result["cuda_extra"])]],
        [f"`Trainer.test(AnomalyModule(AnoVL({config.backbone}, {NUM_REFERENCE_VIEWS} views, TFA)), MVTecDataModule)` on "
         f"generated 256 px images, batch {batch}, no data-loader workers, precision {config.precision}, in a "
         "fresh process; extra RSS = above the level after building the model (on the CPU) and listing the "
         "data; CUDA = all the run allocated there, weights included."],
    )


def precision_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    from anovl.data import MVTecDataModule
    from anovl.data.transforms import prepare_batch

    batch = max(config.batch_sizes)
    model = build_model(config.backbone, config.pretrained, NUM_REFERENCE_VIEWS, TTAConfig(),
                        workdir / "text-cache", device)
    root = generate_test_set(workdir / "precision-set", config.precision_categories, config.precision_good,
                             config.precision_defect, 256, config.data_workers)
    datamodule = MVTecDataModule(root, image_size=model.image_size, batch_size=batch)
    outputs: dict[str, dict[str, list[torch.Tensor]]] = {"fp32": {}, config.precision: {}}
    truth: dict[str, list[torch.Tensor]] = {"masks": [], "labels": []}
    for batch_data in map(prepare_batch, datamodule.test_dataloader()):
        images = batch_data["image"].to(device)
        truth["masks"].append(batch_data["mask"])
        truth["labels"].append(batch_data["label"])
        for precision, collected in outputs.items():
            with autocast(device, precision):
                output = model(images, list(batch_data["category"]), list(batch_data["prompt_name"]))
            for key, value in (("tfa", output.tfa_map), ("tta", output.anomaly_map), ("score", output.pred_score)):
                collected.setdefault(key, []).append(value.float().cpu())
    merged = {precision: {key: torch.cat(values) for key, values in collected.items()}
              for precision, collected in outputs.items()}
    masks, labels = torch.cat(truth["masks"]).numpy(), torch.cat(truth["labels"]).numpy()

    def aurocs(values: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        pixel_tfa = functional.auroc(functional.RankedScores.from_maps(values["tfa"].numpy(), masks))
        pixel_tta = functional.auroc(functional.RankedScores.from_maps(values["tta"].numpy(), masks))
        image = functional.auroc(functional.RankedScores.from_targets(values["score"].numpy(), labels))
        return pixel_tfa, pixel_tta, image

    full, low = merged["fp32"], merged[config.precision]
    full_auroc, low_auroc = aurocs(full), aurocs(low)
    images = random_images(batch, model.image_size, device)
    names = [CLASS_NAME] * batch

    def forward(precision: str) -> Callable[[], Any]:
        def run() -> Any:
            with autocast(device, precision):
                return model(images, names)
        return run

    for precision in outputs:  # warm-up
        forward(precision)()
    fp32_time, low_time = interleaved_minimum([forward("fp32"), forward(config.precision)], config.repeats, device)
    labelled = {"tfa": "TFA map", "tta": "TTA map", "score": "image score"}
    rows = [[f"max abs Δ, {name}", "", "", f"{(full[key] - low[key]).abs().max().item():.3g}"]
            for key, name in labelled.items()]
    rows += [[name, f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"]
             for name, a, b in zip(("pixel AUROC, TFA", "pixel AUROC, TTA", "image AUROC"), full_auroc, low_auroc)]
    rows.append([f"forward time, batch {batch}", seconds(fp32_time), seconds(low_time),
                 f"{ratio(fp32_time / low_time)} faster"])
    return Section(
        f"{config.precision} autocast vs fp32 ({config.backbone}, {NUM_REFERENCE_VIEWS} views + TTA)",
        ["quantity", "fp32", config.precision, "Δ"], rows,
        [f"{len(labels)} generated images in {config.precision_categories} categories. With random weights the "
         "maps are nearly flat, so the AUROCs are near chance and their Δ overstates what real weights would show."],
    )


SECTION_FUNCTIONS = {
    "encoder": encoder_section, "throughput": throughput_section, "reference": reference_section,
    "text": text_section, "metrics": metrics_section, "testrun": testrun_section, "precision": precision_section,
}


def run_benchmark(config: BenchConfig, emit: Callable[[str], None] = print) -> str:
    """Run the chosen sections, emitting each as markdown when done; returns the whole report."""
    device = torch.device(config.device)
    sections = [name for name in config.sections if name != "precision" or config.precision != "fp32"]
    mode = "quick (small counts, CPU-sized)" if config.quick else "full"
    header = (f"# AnoVL benchmark\n\n- Machine: {machine_description(device)}\n- Date: {date.today().isoformat()}\n"
              f"- Mode: {mode}; device {device}; precision {config.precision}; batch sizes "
              f"{', '.join(map(str, config.batch_sizes))}; weights {config.pretrained or 'random'}\n")
    emit(header)
    parts = [header]
    with tempfile.TemporaryDirectory(prefix="anovl-bench-") as workdir:
        for name in sections:
            start = time.perf_counter()
            text = SECTION_FUNCTIONS[name](config, device, Path(workdir)).markdown()
            text += f"\n_(section took {time.perf_counter() - start:.0f} s)_\n"
            emit(text)
            parts.append(text)
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts and a small model: minutes on a CPU")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                        help="autocast dtype of the model runs; bf16/fp16 add the 'precision' section")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--backbone", help="model of every section but 'encoder' (default: ViT-B-16-plus-240; "
                                           "--quick: anovl-small-vit)")
    parser.add_argument("--encoder-backbone", help="model of the 'encoder' section (default: ViT-B-16-plus-240)")
    parser.add_argument("--pretrained", help="open_clip tag or local weights (default: random weights)")
    parser.add_argument("--repeats", type=int, help="timed repetitions (minimum reported)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; --quick: 1)")
    parser.add_argument("--baseline-maps", type=int,
                        help="maps the slow threshold PRO baseline runs on, its time extrapolated to all maps")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m benchmarks.bench: error: --device cuda but CUDA is not available")
    overrides = {key: value for key, value in (
        ("backbone", args.backbone), ("encoder_backbone", args.encoder_backbone), ("pretrained", args.pretrained),
        ("repeats", args.repeats), ("baseline_maps", args.baseline_maps), ("threads", args.threads))
        if value is not None}
    if args.repeats is not None:
        overrides["encoder_repeats"] = args.repeats
    preset = quick_config if args.quick else full_config
    config = preset(device=args.device, precision=args.precision, batch_sizes=tuple(args.batch_sizes),
                    sections=tuple(args.sections), **overrides)
    setup_process(config.threads)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") if args.output else contextlib.nullcontext() as output:

        def emit(text: str) -> None:
            print(text, flush=True)
            if output is not None:  # section by section, so that a run cut short keeps what it measured
                output.write(text + "\n")
                output.flush()

        run_benchmark(config, emit)


if __name__ == "__main__":
    # Through the importable module, so that functions sent to spawned processes pickle as benchmarks.bench.*.
    from benchmarks.bench import main as bench_main

    bench_main()
