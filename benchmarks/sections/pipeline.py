"""A whole ``anovl test`` against the model alone, and the data path that feeds it.

On generated MVTec-resolution PNGs with masks (1024 px; ``--quick``: a few of them):

* the CLI run: ``anovl test`` in a child process, exactly as a user runs it (its default loader workers and
  pictures), its test loop timed by :class:`LoopTimer`; images/s ÷ the model alone (forward of a random batch of
  the same size already on the device) per number of views;
* the data path: CPU ms/image of :class:`~anovl.data.AnomalyDataset` in one process (what each loader worker
  does: decode, resize, masks and their regions) ÷ Pillow merely decoding the same image and mask files;
* loader scaling: images/s of the DataLoader with k workers ÷ with one, for k up to the cores available;
* the decoded-image cache: hit rate of a second pass and its speed-up over decoding.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image
from torch.utils.data import DataLoader

from anovl.data import AnomalyDataset, MVTecDataModule, collate_batch
from anovl.data.datamodule import available_cores
from anovl.data.decoded_cache import DecodedCache
from benchmarks.common import (
    CLASS_NAME,
    LIGHTNING_PRECISION,
    BenchConfig,
    Section,
    autocast,
    build_model,
    generate_test_set,
    interleaved_minimum,
    random_images,
    ratio,
    seconds,
    target,
    time_call,
)

CPU = torch.device("cpu")
TIMER_FILE = "ANOVL_BENCH_LOOP_TIMES"
DATA_REPEATS = 2  # passes over the images for the data path and its floor (each image's minimum)
LOADER_BATCH = 8  # small batches in the scaling test, so that 16 workers each get several  # environment variable: where LoopTimer writes, in the child


class LoopTimer(Callback):
    """Wall time and image count of a test loop (from ``on_test_start`` to ``on_test_end``: the loader, the model,
    the metrics, the pictures; not the interpreter's start-up), written as JSON to ``$ANOVL_BENCH_LOOP_TIMES``."""

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.images = 0
        self.start = time.perf_counter()

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.images += len(batch["category"])

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.device_ids and torch.cuda.is_available():
            torch.cuda.synchronize()
        Path(os.environ[TIMER_FILE]).write_text(
            json.dumps({"seconds": time.perf_counter() - self.start, "images": self.images})
        )


def cli_run(
    config: BenchConfig, device: torch.device, root: Path, workdir: Path, views: int, name: str
) -> dict[str, float]:
    """``anovl test`` on ``root`` in a child process; its loop time, image count and whole wall time."""
    timer_file = workdir / f"{name}.json"
    command = [
        sys.executable,
        "-m",
        "anovl.cli",
        "test",
        "--model",
        "anovl",
        "--model.init_args.backbone",
        config.backbone,
        "--model.init_args.pretrained",
        str(config.pretrained or "null"),
        "--model.init_args.num_views",
        str(views),
        "--data",
        "anovl.data.MVTecDataModule",
        "--data.init_args.root",
        str(root),
        "--data.init_args.batch_size",
        str(max(config.batch_sizes)),
        "--trainer.accelerator",
        "gpu" if device.type == "cuda" else "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        LIGHTNING_PRECISION[config.precision],
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(workdir / name),
        "--trainer.callbacks+",
        "benchmarks.sections.pipeline.LoopTimer",
        *(["--engine.tf32", "true"] if config.precision == "tf32" else []),
    ]
    repository = str(Path(__file__).resolve().parents[2])
    environment = {
        **os.environ,
        TIMER_FILE: str(timer_file),
        "ANOVL_CACHE_DIR": str(workdir / "anovl-cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=workdir)
    wall = time.perf_counter() - start
    if finished.returncode != 0:
        raise RuntimeError(f"anovl test failed ({finished.returncode}): {finished.stderr[-2000:]}")
    return {**json.loads(timer_file.read_text()), "wall": wall}


def model_only_rate(config: BenchConfig, device: torch.device, workdir: Path, views: int) -> float:
    """Images/s of the model's forward alone on a random batch already on the device (same batch and views)."""
    model = build_model(config.backbone, config.pretrained, views, None, workdir / "text-cache", device)
    batch = max(config.batch_sizes)
    images = random_images(batch, model.image_size, device)
    names = [CLASS_NAME] * batch

    def forward() -> None:
        with torch.no_grad(), autocast(device, config.precision):
            model(images, names)

    forward()  # warm-up: kernels, text embeddings
    (best,) = interleaved_minimum([forward], config.repeats, device)
    return batch / best


def pillow_decode(sample: Any) -> None:
    """Pillow decoding a sample's image file and its mask file, nothing else."""
    for path in (sample.image_path, sample.mask_path):
        if path is not None:
            with Image.open(path) as image:
                image.load()


def data_path_and_floor(dataset: AnomalyDataset, repeats: int) -> tuple[float, float]:
    """Seconds per image of producing a batch item in this process (one loader worker's work) and of the Pillow
    floor, alternating per image and keeping each image's minimum, so that a busy neighbour slows both alike."""
    best_path, best_floor = [math.inf] * len(dataset), [math.inf] * len(dataset)
    for _ in range(repeats):
        for index, sample in enumerate(dataset.samples):
            best_floor[index] = min(best_floor[index], time_call(lambda: pillow_decode(sample), CPU)[0])
            best_path[index] = min(best_path[index], time_call(lambda: dataset[index], CPU)[0])
    return sum(best_path) / len(dataset), sum(best_floor) / len(dataset)


def dataset_pass(dataset: AnomalyDataset) -> float:
    """Seconds per image of producing every batch item in this process."""
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return (time.perf_counter() - start) / len(dataset)


def loader_rate(dataset: AnomalyDataset, workers: int, batch: int) -> float:
    """Images/s through a DataLoader with ``workers`` processes, counted from its first batch (start-up apart)."""
    loader = iter(DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate_batch))
    next(loader)
    start = time.perf_counter()
    count = sum(len(items["category"]) for items in loader)
    return count / (time.perf_counter() - start) if count else float("nan")


def pipeline_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    root = generate_test_set(
        workdir / "pipeline-set",
        config.pipeline_categories,
        config.pipeline_good,
        config.pipeline_defect,
        config.pipeline_size,
        config.data_workers,
    )
    size = build_model(
        config.backbone, config.pretrained, 1, None, workdir / "text-cache", torch.device("cpu")
    ).image_size
    datamodule = MVTecDataModule(root, image_size=size)
    datamodule.setup("test")
    everything = datamodule.dataset.samples
    # The data path is measured on an even spread of the images: a few hundred are enough for a per-image cost.
    samples = everything[:: max(1, len(everything) // config.pipeline_data_images)]
    batch = max(config.batch_sizes)
    section = Section(
        f"Whole `anovl test` and its data path ({config.backbone}, {config.pipeline_size} px PNGs, "
        f"{len(everything)} images, batch {batch}, {device.type}, {config.precision})",
        ["quantity", "measured", "reference", "ratio"],
    )

    def add(row: list[str]) -> None:
        print("| " + " | ".join(row) + " |", flush=True)  # a run cut off by its time limit keeps it in its log
        section.rows.append(row)

    # The CLI first: it is the headline, and a later step cut off by a time limit then loses less.
    cli_run(config, device, root, workdir, min(config.pipeline_views), "warm-up")  # fills the text-embedding cache
    for views in config.pipeline_views:
        run = cli_run(config, device, root, workdir, views, f"views-{views}")
        whole = run["images"] / run["seconds"]
        model = model_only_rate(config, device, workdir, views)
        goal = 0.85 if views > 1 else 0.6
        verdict = target(whole / model >= goal, f"≥ {goal} on a GPU") if device.type == "cuda" else ""
        add(
            [
                f"`anovl test`, {views} view{'s' * (views > 1)}: images/s (loop; whole process {seconds(run['wall'])})",
                f"{whole:.3g}",
                f"model alone {model:.3g}",
                f"{ratio(whole / model)} {verdict}".strip(),
            ]
        )

    plain = AnomalyDataset(samples, size, nonzero_masks=datamodule.nonzero_masks)
    path, floor = data_path_and_floor(plain, DATA_REPEATS)
    add(
        [
            "data path, CPU ms/image per worker (decode, resize, masks, regions)",
            f"{path * 1e3:.3g}",
            f"Pillow decode {floor * 1e3:.3g}",
            f"{ratio(path / floor)} {target(path / floor <= 1.3, '≤ 1.3×')}",
        ]
    )

    cores = available_cores()
    counts = sorted({1, *[k for k in (2, 4, 8, 16) if k <= cores]})
    single = None
    for workers in counts:
        rate = loader_rate(plain, workers, LOADER_BATCH)
        single = single or rate
        verdict = "" if workers == 1 else target(rate / single >= 0.8 * workers, f"≥ {0.8 * workers:.2g}×")
        add(
            [
                f"loader, {workers} worker{'s' * (workers > 1)}: images/s",
                f"{rate:.3g}",
                "1 worker" if workers > 1 else "",
                f"{ratio(rate / single)} {verdict}".strip(),
            ]
        )

    cache_dir = workdir / "decoded-cache"
    filling = dataset_pass(
        AnomalyDataset(samples, size, nonzero_masks=datamodule.nonzero_masks, cache=DecodedCache(10**12, cache_dir))
    )
    add(
        [
            "decoded cache, first pass (decodes, writes and syncs each entry): ms/image",
            f"{filling * 1e3:.3g}",
            f"data path {path * 1e3:.3g}",
            ratio(filling / path),
        ]
    )
    cache = DecodedCache(10**12, cache_dir)
    cached = dataset_pass(AnomalyDataset(samples, size, nonzero_masks=datamodule.nonzero_masks, cache=cache))
    add(
        [
            f"decoded cache, second pass: ms/image (hit rate {cache.hits / (cache.hits + cache.misses):.0%})",
            f"{cached * 1e3:.3g}",
            f"decoding {path * 1e3:.3g}",
            f"{ratio(path / cached)} faster {target(path / cached >= 10, '≥ 10×')}",
        ]
    )

    section.notes += [
        f"Data path, loader and cache on {len(samples)} of the {len(everything)} images (an even spread).",
        "`anovl test`: the console script in a child process with its defaults (loader workers 'auto', pictures), "
        "the model's random weights; images/s over its test loop (on_test_start to on_test_end), after a first run "
        "that filled the text-embedding cache. Model alone: `model(images, names)` on a random batch already on "
        f"the device, minimum of {config.repeats}. The run's batches never mix categories, so some are smaller.",
        f"Data path and cache: {AnomalyDataset.__name__} items in this process, {torch.get_num_threads()} torch "
        "thread(s), i.e. what one loader worker does per image; the Pillow floor is `Image.open(f).load()` of the "
        f"image and mask files; both alternate per image, each image's minimum of {DATA_REPEATS}. Cache: a "
        "content-keyed `DecodedCache` in a fresh folder: its first pass (one pass, not a minimum) and a second pass "
        "(new objects), each against the data path.",
        f"Loader scaling: up to the {cores} cores this process may use"
        + (" (shared with other work here: the figures for k > 1 are a lower bound)" if cores <= 2 else "")
        + f"; batches of {LOADER_BATCH}, counted from each loader's first batch.",
    ]
    return section
