"""Methods trained on auxiliary data (``anovl fit``): one training step against the test forward.

    PYTHONPATH=. .venv/bin/python benchmarks/trained_methods.py --quick                 # CPU, small backbone
    PYTHONPATH=. .venv/bin/python benchmarks/trained_methods.py --device cuda           # published settings

Per method and batch size: the test forward (``model(images, categories)``) and one training step
(``training_losses`` → backward → optimiser step) on the same images, their times (minimum over interleaved
repetitions) and peak memories (each in a fresh process), and the ratios step ÷ forward. Gradients reach only
the trained part (prompts, heads), so the targets are a step ≤ 1.5× the forward in time and in peak memory.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from benchmarks.bench import (
    PeakMemory,
    Section,
    interleaved_minimum,
    megabytes,
    ratio,
    run_isolated,
    seconds,
    setup_process,
    target,
)

TARGET = 1.5
# The published settings (docs/METHOD.md, AnomalyCLIP) and a small stand-in that a CPU runs in seconds.
PUBLISHED: dict[str, dict[str, Any]] = {"anomalyclip": {"pretrained": None}}
QUICK: dict[str, dict[str, Any]] = {
    "anomalyclip": {"backbone": "anovl-small-vit", "pretrained": None, "image_size": 224, "layers": (0, 1, 2, 3),
                    "dpam_blocks": 3, "depth": 2},
}


def build(method: str, kwargs: dict[str, Any], device: str):
    from anovl.models import create_method

    return create_method(method, use_text_cache=False, **kwargs).to(device)


def inputs(model, batch: int, device: str):
    generator = torch.Generator().manual_seed(0)
    size = model.image_size
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    masks = torch.zeros(batch, size, size)
    masks[::2, size // 4:size // 2, size // 3:size // 2] = 1  # every other image anomalous
    return images, masks.to(device), ["bottle"] * batch


def step_function(model, images, masks, categories):
    module = model.trained_module()
    optimizer = model.configure_optimizer(module.parameters())

    def step():
        optimizer.zero_grad(set_to_none=True)
        sum(model.training_losses(images, masks, categories).values()).backward()
        optimizer.step()

    return step


def _peak_child(method: str, kwargs: dict[str, Any], batch: int, device: str, what: str) -> dict[str, Any]:
    model = build(method, kwargs, device)
    images, masks, categories = inputs(model, batch, device)
    call = step_function(model, images, masks, categories) if what == "step" else \
        (lambda: model(images, categories))
    meter = PeakMemory(device)
    meter.start()
    call()
    return meter.stop()


def method_rows(method: str, kwargs: dict[str, Any], batches: list[int], device: str, repeats: int,
                threads: int | None, isolate: bool = True) -> list[list[str]]:
    model = build(method, kwargs, device)
    rows = []
    for batch in batches:
        images, masks, categories = inputs(model, batch, device)
        step = step_function(model, images, masks, categories)
        forward_time, step_time = interleaved_minimum(  # the forward runs without gradients by itself
            [lambda: model(images, categories), step], repeats, torch.device(device))
        memory = {what: run_isolated(_peak_child, method, kwargs, batch, device, what, threads=threads,
                                     isolate=isolate) for what in ("forward", "step")}
        key = "cuda_extra" if device.startswith("cuda") else "extra_rss"
        forward_memory, step_memory = memory["forward"][key], memory["step"][key]
        memory_ratio = step_memory / forward_memory if forward_memory and step_memory is not None else None
        rows.append([model.label, str(batch), f"{batch / forward_time:.3g}", f"{batch / step_time:.3g}",
                     target(step_time / forward_time <= TARGET, ratio(step_time / forward_time)),
                     megabytes(forward_memory), megabytes(step_memory),
                     "n/a" if memory_ratio is None else target(memory_ratio <= TARGET, ratio(memory_ratio))])
        print(f"  {method} batch {batch}: forward {seconds(forward_time)}, step {seconds(step_time)}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> Section:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small backbone, one thread, 2 repetitions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(PUBLISHED))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else PUBLISHED
    batches = args.batch_sizes or ([2, 8] if args.quick else [1, 8])
    repeats = args.repeats or (2 if args.quick else 5)
    threads = 1 if args.quick else None
    setup_process(threads)
    section = Section(
        f"Trained methods: one training step against the test forward ({args.device}"
        f"{', quick: small backbone' if args.quick else ''})",
        ["method", "batch", "forward img/s", "step img/s", f"step ÷ forward time (≤ {TARGET})",
         "forward peak", "step peak", f"step ÷ forward memory (≤ {TARGET})"])
    for method in args.methods:
        section.rows += method_rows(method, settings.get(method, {}), batches, args.device, repeats, threads)
    section.notes.append("Random weights; the visual side runs without gradients in both, the step adds the "
                         "trained part's forward and backward, the losses and the optimiser.")
    print(section.markdown())
    return section


if __name__ == "__main__":
    main()
