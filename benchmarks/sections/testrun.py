"""Peak memory and time of a Lightning test run (AnomalyModule(AnoVL) + MVTecDataModule)."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import torch

from anovl.models.anovl.torch_model import AnoVL
from anovl.models.anovl.views import NUM_REFERENCE_VIEWS
from benchmarks.common import (
    LIGHTNING_PRECISION,
    MVTEC_TEST_IMAGES,
    BenchConfig,
    PeakMemory,
    Section,
    generate_test_set,
    megabytes,
    run_isolated,
    seconds,
)


def _test_run_child(meter: PeakMemory, settings: dict[str, Any]) -> dict[str, Any]:
    """``Trainer.test`` of AnomalyModule(AnoVL) on an MVTecDataModule, as ``anovl test`` runs it."""
    from lightning.pytorch import Trainer

    from anovl.data import MVTecDataModule
    from anovl.engine import AnomalyModule

    module = AnomalyModule(
        AnoVL(
            settings["backbone"], settings["pretrained"], num_views=NUM_REFERENCE_VIEWS, cache_dir=settings["cache_dir"]
        ),
        results_dir=settings["workdir"],
    )
    datamodule = MVTecDataModule(
        settings["root"], image_size=module.model.image_size, batch_size=settings["batch_size"], num_workers=0
    )  # its memory is all in one process
    datamodule.setup("test")
    trainer = Trainer(
        accelerator="gpu" if settings["device"] == "cuda" else "cpu",
        devices=1,
        precision=LIGHTNING_PRECISION[settings["precision"]],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        default_root_dir=settings["workdir"],
    )
    meter.start()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the results table is not the benchmark's output
        trainer.test(module, datamodule=datamodule, verbose=False)
    return {"seconds": time.perf_counter() - start, "images": len(datamodule.dataset), **meter.stop()}


def testrun_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    root = generate_test_set(
        workdir / "test-set", config.test_categories, config.test_good, config.test_defect, 256, config.data_workers
    )
    batch = max(config.batch_sizes)
    settings = {
        "backbone": config.backbone,
        "pretrained": config.pretrained,
        "cache_dir": str(workdir / "text-cache"),
        "workdir": str(workdir / "test-run"),
        "root": str(root),
        "batch_size": batch,
        "device": device.type,
        "precision": config.precision,
    }
    result = run_isolated(
        _test_run_child, PeakMemory(device.type), settings, threads=config.threads, isolate=config.isolate
    )
    size = "" if result["images"] >= MVTEC_TEST_IMAGES else " (quick: a small set, not MVTec-sized)"
    return Section(
        f"Lightning test run{size}",
        ["images", "categories", "time", "images/s", "peak RSS", "peak extra RSS", "peak extra CUDA memory"],
        [
            [
                str(result["images"]),
                str(config.test_categories),
                seconds(result["seconds"]),
                f"{result['images'] / result['seconds']:.3g}",
                megabytes(result["peak_rss"]),
                megabytes(result["extra_rss"]),
                megabytes(result["cuda_extra"]),
            ]
        ],
        [
            f"`Trainer.test(AnomalyModule(AnoVL({config.backbone}, {NUM_REFERENCE_VIEWS} views, TFA)), MVTecDataModule)` on "
            f"generated 256 px images, batch {batch}, no data-loader workers, precision {config.precision}, in a "
            "fresh process; extra RSS = above the level after building the model (on the CPU) and listing the "
            "data; CUDA = all the run allocated there, weights included."
        ],
    )
