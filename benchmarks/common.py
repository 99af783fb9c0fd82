"""What every benchmark section shares: settings, the report format, timing and memory, synthetic inputs.

Sections live in :mod:`benchmarks.sections` (one module each); :mod:`benchmarks.bench` runs them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import logging
import math
import multiprocessing
import os
import platform
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from anovl.metrics import AnomalyMetrics, functional
from anovl.models.anovl.prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, PromptSet
from anovl.models.anovl.torch_model import AnoVL
from anovl.models.anovl.tta import TTAConfig
from anovl.results import markdown_table

SECTIONS = (
    "pipeline",
    "throughput",
    "reference",
    "encoder",
    "text",
    "metrics",
    "testrun",
    "precision",
    "fit",
)  # headline first
PRECISIONS = {
    "fp32": None,
    "tf32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}  # tf32: see bench.run_benchmark
LIGHTNING_PRECISION = {"fp32": "32-true", "tf32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
STAGES = ("text", "views", "encoder", "maps", "tta", "metrics")
MVTEC_TEST_IMAGES = 1725  # MVTec AD's test set: 15 categories
CLASS_NAME = "bottle"
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
    pipeline_categories: int = 15  # the pipeline section's PNGs: 15 × (31 + 4 × 21) = 1725, as MVTec AD's test set
    pipeline_good: int = 31
    pipeline_defect: int = 21
    pipeline_size: int = 1024  # MVTec's largest side
    pipeline_views: tuple[int, ...] = (22, 1)
    pipeline_data_images: int = 128  # of them, for the data path, the loader scaling and the cache
    data_workers: int = min(16, os.cpu_count() or 1)  # processes generating the synthetic test sets
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    isolate: bool = True  # memory measurements in a fresh process; False (tests): in this one, figures may read low
    sections: tuple[str, ...] = SECTIONS
    tta_compile: bool = False  # TTA's adapter steps through torch.compile (TTAConfig.compile)
    quick: bool = False
    smoke: bool = False


def full_config(**overrides: Any) -> BenchConfig:
    """Full sizes, meant for a GPU."""
    return replace(BenchConfig(), **overrides)


def quick_config(**overrides: Any) -> BenchConfig:
    """A few minutes on a CPU: the reference backbone for the encoder ratio, a small one elsewhere.

    One torch thread: on a CPU shared with other work, two threads ran 3× slower than one and varied 2×
    between repetitions, one thread within 10 %; the ratios are what quick mode is for.
    """
    quick = BenchConfig(
        backbone="anovl-small-vit",
        repeats=2,
        encoder_repeats=2,
        reference_images=4,
        baseline_maps=60,
        test_categories=2,
        test_good=4,
        test_defect=2,
        precision_categories=2,
        precision_good=4,
        precision_defect=2,
        pipeline_categories=3,  # two object styles and a texture: MVTec AD's mix (10 objects, 5 textures)
        pipeline_good=4,
        pipeline_defect=2,
        data_workers=1,
        threads=1,
        quick=True,
    )
    return replace(quick, **overrides)


def smoke_config(**overrides: Any) -> BenchConfig:
    """Every section's code path in seconds on a CPU: the tiny random model and a handful of inputs (gpu.sh's dry
    run, the tests). Its figures mean nothing."""
    smoke = quick_config(
        backbone="anovl-tiny-vit",
        encoder_backbone="anovl-tiny-vit",
        batch_sizes=(1, 2),
        repeats=1,
        encoder_repeats=1,
        reference_images=1,
        num_maps=12,
        map_size=32,
        baseline_maps=4,
        test_categories=1,
        test_good=1,
        test_defect=1,
        precision_categories=1,
        precision_good=1,
        precision_defect=1,
        pipeline_categories=1,
        pipeline_good=2,
        pipeline_defect=1,
        pipeline_size=96,
        pipeline_views=(2, 1),
        pipeline_data_images=4,
        smoke=True,
    )
    return replace(smoke, **overrides)


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


# ----------------------------------------------------------------------------- synthetic inputs and models


def synthetic_masks(
    count: int, size: int, seed: int = 0, anomalous_fraction: float = 1 / 3
) -> tuple[torch.Tensor, torch.Tensor]:
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
        part = masks[start : start + chunk, None].float()
        fraction = F.avg_pool2d(part, patch)
        strength = 2 + 6 * torch.rand(part.shape[0], 1, 1, 1, generator=generator)
        logits = strength * fraction + 0.8 * torch.randn(fraction.shape, generator=generator) - 1.5
        smooth = F.avg_pool2d(F.pad(torch.sigmoid(logits), (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        maps[start : start + chunk] = F.interpolate(smooth, size=(size, size), mode="bilinear", align_corners=True)[
            :, 0
        ]
    return maps


def random_images(batch: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


def metric_targets(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(masks, labels, has_mask, region_sizes) for :meth:`AnomalyMetrics.update`, on ``device`` as a test run's
    batch brings them (region sizes labelled by the loader, not in the timed update)."""
    masks, labels = synthetic_masks(batch, size)
    regions = torch.from_numpy(functional.region_size_map(masks.numpy()))
    return (
        masks.float().to(device),
        labels.to(device),
        torch.ones(batch, dtype=torch.bool, device=device),
        regions.to(device),
    )


def build_model(
    backbone: str,
    pretrained: str | None,
    num_views: int,
    tta: TTAConfig | None,
    cache_dir: Path,
    device: torch.device,
    prompts: PromptSet | None = None,
) -> AnoVL:
    torch.manual_seed(0)  # random weights: the same model in every section and run
    return AnoVL(
        backbone, pretrained=pretrained, num_views=num_views, tta=tta, cache_dir=cache_dir, prompts=prompts
    ).to(device)


def staged_forward(
    model: AnoVL,
    images: torch.Tensor,
    class_names: Sequence[str],
    timer: StageTimer,
    metrics: AnomalyMetrics | None = None,
    targets: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``AnoVL.forward`` with its stages timed (text, views, encoder, maps, tta), then ``AnomalyMetrics.update``."""
    model.stage_timer = timer.stage
    try:
        output = model(images, class_names)
    finally:
        model.stage_timer = None
    if metrics is not None:
        with timer.stage("metrics"):
            metrics.update(output.anomaly_map, targets[0], output.pred_score, *targets[1:])
    return output.anomaly_map, output.pred_score


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
