"""Methods trained on auxiliary data (``anovl fit``): one training step against the test forward, per method.

Per method and batch size: the test forward (``model(images, categories)``) and one training step
(``training_losses`` → backward → optimiser step) on the same images, their times (minimum over interleaved
repetitions) and peak memories, and the ratios step ÷ forward. Gradients reach only the trained part (heads,
prompts), so the targets are a step ≤ 1.5× the forward in time and in peak memory. Quick: a small backbone;
otherwise each method's published settings (ViT-L-14-336 at 518 px).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from anovl.models import create_method
from benchmarks.common import (
    BenchConfig,
    PeakMemory,
    Section,
    autocast,
    interleaved_minimum,
    megabytes,
    ratio,
    run_isolated,
    target,
)

TARGET = 1.5
FIT_METHODS = ("aprilgan", "anomalyclip")
# What --quick runs: three blocks of a small backbone (three or more blocks, two text blocks) in place of the
# published blocks 6/12/18/24 of 24 (both count blocks from 1, as their authors).
QUICK_SETTINGS: dict[str, dict[str, Any]] = {
    "aprilgan": {"layers": (1, 2, 3)},
    "anomalyclip": {"layers": (1, 2, 3), "dpam_blocks": 2, "depth": 2},
}


def method_settings(method: str, config: BenchConfig, workdir: Path) -> dict[str, Any]:
    # The text cache: the prompts are encoded once, not again by each fresh process measuring memory.
    settings: dict[str, Any] = {"pretrained": config.pretrained, "cache_dir": str(workdir / "fit-text-cache")}
    if config.quick:
        settings.update(backbone=config.backbone, image_size=None, **QUICK_SETTINGS.get(method, {}))
    return settings


def fit_inputs(model, batch: int, device: torch.device):
    """Random images, every other one anomalous with a rectangular mask."""
    generator = torch.Generator().manual_seed(0)
    size = model.image_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    masks = torch.zeros(batch, size, size)
    masks[::2, size // 4 : size // 2, size // 3 : size // 2] = 1
    return images.to(device), masks.to(device), ["bottle"] * batch


def forward_function(model, images, categories, device: torch.device, precision: str):
    def forward():
        with autocast(device, precision):
            return model(images, categories)

    return forward


def step_function(model, images, masks, categories, device: torch.device, precision: str):
    optimizer = model.configure_optimizer(model.trained_module().parameters())

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = sum(model.training_losses(images, masks, categories).values())
        loss.backward()
        optimizer.step()

    return step


def _peak(method: str, settings: dict[str, Any], batch: int, device: str, precision: str, what: str) -> dict:
    device_ = torch.device(device)
    model = create_method(method, **settings).to(device_)
    images, masks, categories = fit_inputs(model, batch, device_)
    call = (
        step_function(model, images, masks, categories, device_, precision)
        if what == "step"
        else forward_function(model, images, categories, device_, precision)
    )
    meter = PeakMemory(device)
    meter.start()
    call()
    return meter.stop()


def fit_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    section = Section(
        f"anovl fit: one training step against the test forward ({config.precision}"
        f"{', quick: ' + config.backbone if config.quick else ', published settings'})",
        [
            "method",
            "batch",
            "forward img/s",
            "step img/s",
            f"step ÷ forward time (≤ {TARGET})",
            "forward peak",
            "step peak",
            f"step ÷ forward memory (≤ {TARGET})",
        ],
    )
    # CPU memory is a process's resident high-water mark: a fresh one per measurement; CUDA's is reset in place.
    isolate = config.isolate and device.type == "cpu"
    key = "cuda_extra" if device.type == "cuda" else "extra_rss"
    for method in FIT_METHODS:
        settings = method_settings(method, config, workdir)
        model = create_method(method, **settings).to(device)
        for batch in config.batch_sizes:
            images, masks, categories = fit_inputs(model, batch, device)
            step = step_function(model, images, masks, categories, device, config.precision)
            forward = forward_function(model, images, categories, device, config.precision)
            forward_time, step_time = interleaved_minimum([forward, step], config.repeats, device)
            memory = [
                run_isolated(
                    _peak,
                    method,
                    settings,
                    batch,
                    str(device),
                    config.precision,
                    what,
                    threads=config.threads,
                    isolate=isolate,
                )[key]
                for what in ("forward", "step")
            ]
            memory_ratio = memory[1] / memory[0] if memory[0] and memory[1] is not None else None
            section.rows.append(
                [
                    model.label,
                    str(batch),
                    f"{batch / forward_time:.3g}",
                    f"{batch / step_time:.3g}",
                    target(step_time / forward_time <= TARGET, ratio(step_time / forward_time)),
                    megabytes(memory[0]),
                    megabytes(memory[1]),
                    "n/a" if memory_ratio is None else target(memory_ratio <= TARGET, ratio(memory_ratio)),
                ]
            )
        del model
    section.notes.append(
        "Random weights. Both run the frozen visual side without gradients; the step adds the "
        "trained part's backward, the losses and the optimiser step."
    )
    return section
