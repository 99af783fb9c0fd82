"""Images/s of TFA 1 view, TFA 22 views and TFA+TTA per batch size, split into the stages of ``AnoVL.forward``
(timed inside the real call through ``AnoVL.stage_timer``, see :func:`~benchmarks.common.staged_forward`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from anovl.metrics import AnomalyMetrics
from anovl.models.anovl.torch_model import AnoVL
from anovl.models.anovl.tta import TTAConfig
from anovl.models.anovl.views import NUM_REFERENCE_VIEWS
from benchmarks.common import (
    CLASS_NAME,
    STAGES,
    BenchConfig,
    Section,
    StageTimer,
    autocast,
    build_model,
    metric_targets,
    random_images,
    ratio,
    staged_forward,
    time_call,
)

PIPELINES = (
    ("TFA, 1 view", 1, False),
    (f"TFA, {NUM_REFERENCE_VIEWS} views", NUM_REFERENCE_VIEWS, False),
    (f"TFA+TTA (5 steps), {NUM_REFERENCE_VIEWS} views", NUM_REFERENCE_VIEWS, True),
)


def measure_pipeline(
    model: AnoVL, batch: int, device: torch.device, precision: str, repeats: int
) -> tuple[float, StageTimer]:
    """Minimum end-to-end seconds of ``model(images, names)`` + metrics update, and the staged run of the
    smallest total, over ``repeats`` alternating repetitions after a one-image warm-up."""
    images = random_images(batch, model.image_size, device)
    names = [CLASS_NAME] * batch
    targets = metric_targets(batch, model.image_size, device)

    def end_to_end(metrics: AnomalyMetrics) -> None:
        with autocast(device, precision):
            output = model(images, names)
        metrics.update(output.anomaly_map, targets[0], output.pred_score, *targets[1:])

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
        [
            "pipeline",
            "batch",
            "images/s",
            "× batch 1",
            *[f"{stage} ms/img" for stage in STAGES],
            "Σ stages ÷ end-to-end",
        ],
        notes=[
            "images/s: end-to-end `model(images, names)` + `AnomalyMetrics.update`, minimum of "
            f"{config.repeats} repetitions. Stages: `staged_forward`, timed inside the real `AnoVL.forward` "
            "call (text = embedding look-up; tta = seeds, adaptation and the adapted map), each "
            "synchronised on CUDA. Σ stages ÷ end-to-end near 1 says the split accounts for the whole call."
        ],
    )
    for name, num_views, with_tta in PIPELINES:
        name += ", compiled" if with_tta and config.tta_compile else ""
        model = build_model(
            config.backbone,
            config.pretrained,
            num_views,
            TTAConfig(compile=config.tta_compile) if with_tta else None,
            workdir / "text-cache",
            device,
        )
        single = None
        for batch in config.batch_sizes:
            total, timer = measure_pipeline(model, batch, device, config.precision, config.repeats)
            rate = batch / total
            single = rate if batch == 1 else single
            section.rows.append(
                [
                    name,
                    str(batch),
                    f"{rate:.3g}",
                    ratio(rate / single) if single else "",
                    *stage_cells(timer, batch),
                    f"{timer.total / total:.2f}",
                ]
            )
        del model
    return section
