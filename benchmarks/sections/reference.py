"""AnoVL against :func:`tests.reference.pipeline.reference_pipeline`, the authors' one-image-at-a-time loop
(every view a separate dual-path call, TTA per image): speed-up and the largest difference of their outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

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
    random_images,
    ratio,
    staged_forward,
)
from tests.reference.pipeline import reference_pipeline


def reference_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    batch = max(config.batch_sizes)
    model = build_model(
        config.backbone, config.pretrained, NUM_REFERENCE_VIEWS, TTAConfig(), workdir / "text-cache", device
    )
    images = random_images(batch, model.image_size, device)
    names = [CLASS_NAME] * batch
    count = min(config.reference_images, batch)
    with autocast(device, config.precision):
        reference_pipeline(model, images[:1], names[:1])  # warm-up
        reference_timer = StageTimer(device)
        reference_maps, reference_scores = reference_pipeline(
            model, images[:count], names[:count], reference_timer.stage
        )
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
        notes=[
            f"Reference: `reference_pipeline` on {count} images, each of the {NUM_REFERENCE_VIEWS} views a "
            f"separate dual-path call, TTA per image. AnoVL: `staged_forward` on a batch of {batch}, minimum of "
            f"{config.repeats}. Largest difference of their outputs: map {map_error:.2g}, score "
            f"{score_error:.2g}."
        ],
    )
    for part, stages in (("whole pipeline", STAGES), ("encoder", ("encoder",)), ("TTA", ("tta",))):
        reference = per_image(reference_timer, count, stages)
        optimised = per_image(timer, batch, stages)
        section.rows.append([part, f"{reference * 1e3:.4g}", f"{optimised * 1e3:.4g}", ratio(reference / optimised)])
    return section
