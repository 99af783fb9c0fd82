"""Callbacks, one concern each: the panels of ``anovl test`` and the prediction writer of ``anovl predict``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from rich.console import Console

from anovl.engine.module import category_runs, run_directory
from anovl.errors import AnovlError
from anovl.results import RANDOM_WEIGHTS_WARNING
from anovl.visualization import map_to_png16, overlay_image, panel, picture_name

SCORE_COLUMNS = ("image_path", "category", "pred_score")


def log_picture(trainer: Trainer, key: str, picture: Image.Image, caption: str) -> None:
    """Send a picture to every logger that takes images (W&B, TensorBoard); CSV loggers have none."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[picture], caption=[caption])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, np.asarray(picture), global_step=trainer.global_step, dataformats="HWC")


class PanelWriter(Callback):
    """Saves panels (input | ground truth | heatmap) of ``test`` images under ``<output_dir>/<category>/`` and
    sends them to image loggers.

    Args:
        max_per_category: panels per category; 0 = none. Under DDP the processes share the quota.
        output_dir: default ``<run dir>/pictures``.
    """

    def __init__(self, max_per_category: int = 0, output_dir: str | None = None):
        if max_per_category < 0:
            raise AnovlError(f"pictures.max_per_category must be >= 0, got {max_per_category}")
        self.max_per_category = max_per_category
        self.output_dir = output_dir
        self.directory = Path(".")
        self._saved: dict[str, int] = {}

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.directory = Path(self.output_dir) if self.output_dir else run_directory(trainer) / "pictures"
        self._saved = {}

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.max_per_category or outputs is None:
            return
        # Rank r takes every world_size-th picture slot.
        quota = len(range(trainer.global_rank, self.max_per_category, trainer.world_size))
        categories = list(outputs["category"])
        for run in category_runs(categories):
            category = categories[run.start]
            for index in range(run.start, run.stop):
                if self._saved.get(category, 0) >= quota:
                    break
                self._save(trainer, outputs, index, category)
                self._saved[category] = self._saved.get(category, 0) + 1

    def _save(self, trainer: Trainer, outputs: dict[str, Any], index: int, category: str) -> None:
        name = picture_name(outputs["image_path"][index], category)
        label = {0: "normal", 1: "anomalous"}.get(int(outputs["label"][index]), "unlabelled")
        picture = panel(outputs["image"][index], outputs["anomaly_map"][index],
                        outputs["mask"][index] if bool(outputs["has_mask"][index]) else None,
                        f"{category}/{name} ({label})")
        folder = self.directory / category
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"{name}.png")
        log_picture(trainer, f"pictures/{category}", picture, name)


class AnomalyMapWriter(BasePredictionWriter):
    """Writes what ``predict`` finds, per image, under ``<output_dir>/<category>/``:

    * ``<name>_overlay.png``: the heatmap (jet, min–max scaled per image) blended over the input;
    * ``<name>_map.npy``: the anomaly map, float32 H×W, abnormal probability in [0, 1];
    * ``<name>_map.png``: the same map as a 16-bit greyscale PNG (value / 65535 gives it back to 1/65535);

    and one row per image (path, category, image score) in ``<output_dir>/scores.csv`` (under DDP one file
    per process, ``scores.rank<N>.csv``). ``<name>`` comes from
    :func:`~anovl.visualization.picture_name`.

    Args:
        output_dir: default ``<run dir>/predictions``.
        overlays: write the overlay PNGs.
        raw_maps: write the .npy and 16-bit PNG maps.
    """

    def __init__(self, output_dir: str | None = None, overlays: bool = True, raw_maps: bool = True):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.overlays = overlays
        self.raw_maps = raw_maps
        self.directory: Path | None = None
        self._scores_file: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self.directory = Path(self.output_dir) if self.output_dir else run_directory(trainer) / "predictions"
        self.directory.mkdir(parents=True, exist_ok=True)
        name = "scores.csv" if trainer.world_size == 1 else f"scores.rank{trainer.global_rank}.csv"
        self._scores_file = self.directory / name
        with self._scores_file.open("w", newline="") as handle:
            csv.writer(handle).writerow(SCORE_COLUMNS)

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: dict[str, Any],
                           batch_indices: Any, batch: dict[str, Any], batch_idx: int, dataloader_idx: int) -> None:
        rows = []
        for index, (image_path, category) in enumerate(zip(prediction["image_path"], prediction["category"])):
            folder = self.directory / category
            folder.mkdir(parents=True, exist_ok=True)
            stem = picture_name(image_path, category)
            anomaly_map = prediction["anomaly_map"][index]
            if self.overlays:
                overlay_image(batch["image"][index], anomaly_map).save(folder / f"{stem}_overlay.png")
            if self.raw_maps:
                np.save(folder / f"{stem}_map.npy", anomaly_map.numpy().astype(np.float32))
                map_to_png16(anomaly_map).save(folder / f"{stem}_map.png")
            rows.append((image_path, category, repr(float(prediction["pred_score"][index]))))
        with self._scores_file.open("a", newline="") as handle:
            csv.writer(handle).writerows(rows)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            console = Console()
            console.print(f"Anomaly maps and scores written to {self.directory}")
            if getattr(pl_module, "random_weights", False):
                console.print(RANDOM_WEIGHTS_WARNING, style="bold red")
