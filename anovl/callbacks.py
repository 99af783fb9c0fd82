"""Callbacks, one concern each: the panels of ``anovl test`` and the prediction writer of ``anovl predict``."""

from __future__ import annotations

import csv
import heapq
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import ExifTags, Image
from rich.console import Console
from torch.utils.data import DataLoader

from anovl.data.base import AnomalyDataModule, AnomalyDataset, collate_batch
from anovl.data.corruptions import Corruptor
from anovl.data.folder import FolderDataModule
from anovl.data.image_io import load_rgb
from anovl.engine.module import category_runs, run_directory
from anovl.errors import AnovlError
from anovl.results import RANDOM_WEIGHTS_WARNING
from anovl.thresholds import RunThresholds, Thresholds, check_quantile, check_threshold, quantile_thresholds
from anovl.visualization import (
    OutputNames,
    denormalize,
    map_to_png16,
    mask_to_png,
    overlay,
    panel,
    panel_lines,
    resize_map,
    stack_padded,
)

SCORE_COLUMNS = ("image_path", "category", "output", "score", "image_threshold", "pixel_threshold",
                 "predicted_label", "true_label")
LABEL_WORDS = {0: "normal", 1: "anomalous"}


def log_gallery(trainer: Trainer, key: str, pictures: list[Image.Image], captions: list[str]) -> None:
    """Send a category's pictures to every logger that takes images, in one call each: a W&B gallery, a
    TensorBoard image grid (padded to one size); CSV loggers take none."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=pictures, caption=captions)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_images(key, stack_padded(pictures), global_step=trainer.global_step,
                                         dataformats="NHWC")


def output_names(trainer: Trainer) -> OutputNames:
    """Output stems for the images of the trainer's datamodule (all of them, on every process)."""
    dataset = getattr(getattr(trainer, "datamodule", None), "dataset", None)
    samples = getattr(dataset, "samples", ())
    return OutputNames((str(sample.image_path), sample.key, sample.category) for sample in samples)


def _nan_to_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


# ----------------------------------------------------------------------------- test panels


@dataclass(frozen=True)
class _Candidate:
    """One test image kept for a panel, on the CPU."""

    image_path: str
    label: int
    score: float
    rgb: np.ndarray
    anomaly_map: np.ndarray
    mask: np.ndarray | None


# Roles of the chosen pictures, in the order they take turns: (caption, label taken, ranking).
PICK_ROLES = (
    ("highest-scoring anomalous", 1, "highest"),
    ("a normal image (sample)", 0, "sample"),
    ("lowest-scoring anomalous", 1, "lowest"),
    ("highest-scoring normal", 0, "highest"),
    ("highest-scoring unlabelled", -1, "highest"),
    ("an unlabelled image (sample)", -1, "sample"),
)


def _sample_rank(key: str) -> int:
    """A pseudo-random but fixed rank of an image, from its key: the "sample" roles take the lowest."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")


class _CategoryPicks:
    """Bounded candidates of one category: for each role the ``count`` best images so far (min-heaps of
    ``(rank key, image path)``), so memory is at most ``len(PICK_ROLES) · count`` images per category."""

    def __init__(self, count: int):
        self.count = count
        self.heaps: list[list[tuple[tuple, int, _Candidate]]] = [[] for _ in PICK_ROLES]
        self._order = itertools.count()  # only separates two entries of the very same image

    def offer(self, image_path: str, key: str, label: int, score: float, capture: Any) -> None:
        ordered_score = score if not math.isnan(score) else -math.inf
        candidate = None
        for heap, (_, role_label, ranking) in zip(self.heaps, PICK_ROLES):
            if label != role_label:
                continue
            value = {"highest": ordered_score, "lowest": -ordered_score, "sample": -_sample_rank(key)}[ranking]
            rank = (value, image_path)  # ties broken by the image path: independent of data order
            if len(heap) >= self.count and rank <= heap[0][0]:
                continue
            candidate = candidate or capture()
            entry = (rank, next(self._order), candidate)
            if len(heap) < self.count:
                heapq.heappush(heap, entry)
            else:
                heapq.heapreplace(heap, entry)

    def choose(self) -> list[tuple[str, _Candidate]]:
        """Up to ``count`` distinct images: the roles take turns, each its best image not yet taken."""
        queues = [sorted(heap, key=lambda entry: entry[0], reverse=True) for heap in self.heaps]
        chosen: list[tuple[str, _Candidate]] = []
        taken: set[str] = set()
        while len(chosen) < self.count and any(queues):
            for queue, (role, _, _) in zip(queues, PICK_ROLES):
                while queue and queue[0][2].image_path in taken:
                    queue.pop(0)
                if queue and len(chosen) < self.count:
                    candidate = queue.pop(0)[2]
                    taken.add(candidate.image_path)
                    chosen.append((role, candidate))
        return chosen


class PanelWriter(Callback):
    """Saves panels of chosen ``test`` images under ``<output_dir>/<category>/<name>.png`` and sends each
    category's panels to the image loggers as one gallery (W&B) or image grid (TensorBoard).

    A panel shows input | ground truth | anomaly map (on the fixed 0-1 colour scale, with a colour bar), the
    image's label and score, and the category's F1-max thresholds from this run (the image threshold against
    the score, the pixel threshold as an outline on the map).

    Which images: per category, the roles of :data:`PICK_ROLES` take turns until ``max_per_category`` distinct
    images are chosen: the highest-scoring anomalous image, a normal image (a fixed pseudo-random sample by
    path), the lowest-scoring anomalous image, the highest-scoring normal image, then the next of each. The
    choice needs all scores of the category, so each role keeps its best ``max_per_category`` candidates
    (memory bounded by ``6 · max_per_category`` images) and the panels are written when the category is
    finished. Ties are broken by image path, so the choice depends neither on batch size nor on data order.
    Under DDP each process chooses from its own share of the images and writes every ``world_size``-th of its
    choices (so ``max_per_category`` in all); the set can then differ from a single process's.

    Args:
        max_per_category: panels per category; 0 = none.
        output_dir: default ``<run dir>/pictures``.
    """

    def __init__(self, max_per_category: int = 0, output_dir: str | None = None):
        if max_per_category < 0:
            raise AnovlError(f"pictures.max_per_category must be >= 0, got {max_per_category}")
        self.max_per_category = max_per_category
        self.output_dir = output_dir
        self.directory = Path(".")
        self._names = OutputNames()
        self._keys: dict[str, str] = {}
        self._pending: dict[str, _CategoryPicks] = {}

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.directory = Path(self.output_dir) if self.output_dir else run_directory(trainer) / "pictures"
        self._pending = {}
        if self.max_per_category:
            self._names = output_names(trainer)
            samples = getattr(getattr(trainer.datamodule, "dataset", None), "samples", ())
            self._keys = {str(sample.image_path): sample.key for sample in samples}

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.max_per_category or outputs is None:
            return
        categories = list(outputs["category"])
        for run in category_runs(categories):
            picks = self._pending.setdefault(categories[run.start], _CategoryPicks(self.max_per_category))
            for index in range(run.start, run.stop):
                path = outputs["image_path"][index]
                picks.offer(path, self._keys.get(path, path), int(outputs["label"][index]),
                            float(outputs["pred_score"][index]), lambda index=index: self._capture(outputs, index))
        finished = getattr(getattr(pl_module, "results", None), "rows", {})
        for category in [category for category in self._pending if category in finished]:
            self._write(trainer, pl_module, category)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for category in list(self._pending):
            self._write(trainer, pl_module, category)

    @staticmethod
    def _capture(outputs: dict[str, Any], index: int) -> _Candidate:
        mask = outputs["mask"][index].detach().cpu().numpy() > 0.5 if bool(outputs["has_mask"][index]) else None
        return _Candidate(outputs["image_path"][index], int(outputs["label"][index]),
                          float(outputs["pred_score"][index]), denormalize(outputs["image"][index]),
                          outputs["anomaly_map"][index].detach().float().cpu().numpy(), mask)

    def _write(self, trainer: Trainer, pl_module: LightningModule, category: str) -> None:
        chosen = self._pending.pop(category).choose()[trainer.global_rank :: trainer.world_size]
        if not chosen:
            return
        results = getattr(pl_module, "results", None)
        thresholds = getattr(results, "thresholds", {}).get(category, {})
        image_threshold = _nan_to_none(thresholds.get("image"))
        pixel_threshold = _nan_to_none(thresholds.get("pixel"))
        folder = self.directory / self._names.folder(category)
        folder.mkdir(parents=True, exist_ok=True)
        pictures, captions = [], []
        for role, candidate in chosen:
            name = self._names.stem(candidate.image_path, category)
            lines = panel_lines(category, name, candidate.label, candidate.score, image_threshold, pixel_threshold,
                                (float(candidate.anomaly_map.min()), float(candidate.anomaly_map.max())), role)
            picture = panel(candidate.rgb, candidate.anomaly_map, candidate.mask, lines, pixel_threshold)
            picture.save(folder / f"{name}.png")
            pictures.append(picture)
            captions.append(" | ".join(lines[:2]))
        log_gallery(trainer, f"pictures/{category}", pictures, captions)


# ----------------------------------------------------------------------------- predictions


def upright_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as :func:`~anovl.data.image_io.load_rgb` gives it (EXIF orientation
    applied), from its header alone."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)  # these orientations turn by 90°


class AnomalyMapWriter(BasePredictionWriter):
    """Writes what ``predict`` finds, per image, under ``<output_dir>/<category>/``:

    * ``<name>_overlay.png``: the heatmap (jet, fixed 0-1 scale) blended over the image, with the outline of
      the predicted mask (white) when a pixel threshold is set;
    * ``<name>_map.npy``: the anomaly map, float32 H×W, abnormal probability in [0, 1];
    * ``<name>_map.png``: the same map as a 16-bit greyscale PNG (value / 65535 gives it back to 1/65535);
    * ``<name>_mask.png``: the predicted mask, 255 where ``map >= pixel threshold`` (with a pixel threshold);

    at the image's original size (the model's map resized back bilinearly; EXIF orientation applied), or at
    the model's input size with ``resolution: model``. ``<output_dir>/scores.csv`` gets one row per image
    (:data:`SCORE_COLUMNS`: the output name, the score, the thresholds, the predicted label where a threshold
    is set, the true label where the data has one; under DDP one file per process, ``scores.rank<N>.csv``),
    and ``<output_dir>/thresholds.json`` the thresholds used per category and their source.
    ``<name>`` is unique per category folder (see :class:`~anovl.visualization.OutputNames`).

    Thresholds (see :mod:`anovl.thresholds`): from a test run's results.json (``thresholds``), a quantile of
    the scores of known-normal images (``normal_images``, ``quantile``), or given values (``image_threshold``,
    ``pixel_threshold``, which win over the others). Without any, no mask and no predicted label.

    Args:
        output_dir: default ``<run dir>/predictions``.
        overlays: write the overlay PNGs.
        raw_maps: write the .npy and 16-bit PNG maps.
        resolution: ``original`` (each image's own size) or ``model`` (the model's input size).
        thresholds: results.json of a labelled ``anovl test`` run (or its folder): its F1-max thresholds.
        image_threshold: an image is predicted anomalous where its score >= this.
        pixel_threshold: a pixel is predicted anomalous where its map value >= this.
        normal_images: a folder of normal images (flat, or a good/ subfolder) of the one category being
            predicted; the thresholds become the ``quantile`` of their image scores and map pixels.
        quantile: see ``normal_images``; in (0, 1).
    """

    def __init__(self, output_dir: str | None = None, overlays: bool = True, raw_maps: bool = True,
                 resolution: Literal["original", "model"] = "original", thresholds: str | None = None,
                 image_threshold: float | None = None, pixel_threshold: float | None = None,
                 normal_images: str | None = None, quantile: float = 0.99):
        super().__init__(write_interval="batch")
        if resolution not in ("original", "model"):
            raise AnovlError(f"predictions.resolution must be 'original' or 'model', got {resolution!r}")
        if thresholds is not None and normal_images is not None:
            raise AnovlError("give predictions.thresholds (a test run's results.json) or predictions.normal_images "
                             "(a folder of normal images), not both")
        self.output_dir = output_dir
        self.overlays = overlays
        self.raw_maps = raw_maps
        self.resolution = resolution
        self.thresholds = thresholds
        self.image_threshold = check_threshold("predictions.image_threshold", image_threshold)
        self.pixel_threshold = check_threshold("predictions.pixel_threshold", pixel_threshold)
        self.normal_images = normal_images
        self.quantile = check_quantile(quantile)
        self.directory: Path | None = None
        self._scores_file: Path | None = None
        self._names = OutputNames()
        self._run_thresholds: RunThresholds | None = None
        self._normal_thresholds: Thresholds | None = None
        self._used: dict[str, Thresholds] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self._run_thresholds = RunThresholds.read(self.thresholds) if self.thresholds is not None else None
        self._normal_thresholds = None
        self._used = {}
        self._names = output_names(trainer)
        self.directory = Path(self.output_dir) if self.output_dir else run_directory(trainer) / "predictions"
        self.directory.mkdir(parents=True, exist_ok=True)
        name = "scores.csv" if trainer.world_size == 1 else f"scores.rank{trainer.global_rank}.csv"
        self._scores_file = self.directory / name
        with self._scores_file.open("w", newline="") as handle:
            csv.writer(handle).writerow(SCORE_COLUMNS)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.normal_images is not None:
            self._normal_thresholds = self._thresholds_from_normal_images(trainer, pl_module)

    def _thresholds_from_normal_images(self, trainer: Trainer, pl_module: LightningModule) -> Thresholds:
        """Run the model on the normal images, preprocessed as the data to predict is (size, resize mode,
        corruption branch), under that data's category and prompt name; every process runs all of them."""
        data = trainer.datamodule
        categories = getattr(data, "categories", None)
        if not isinstance(data, AnomalyDataModule):
            raise AnovlError("predictions.normal_images needs one of anovl's datamodules (data.class_path)")
        if categories is None or len(categories) != 1:
            raise AnovlError(f"predictions.normal_images calibrates one category, but the data has {categories}; "
                             "predict one category at a time (data.init_args.categories) or give thresholds")
        category = categories[0]
        listing = FolderDataModule(self.normal_images, on_bad_image=data.on_bad_image)
        anomalous = [str(sample.image_path) for sample in listing.samples if sample.label == 1]
        if anomalous:
            raise AnovlError(f"predictions.normal_images must hold only normal images, but {self.normal_images} "
                             f"has {len(anomalous)} in an anomalous subfolder (e.g. {anomalous[0]})")
        samples = [replace(sample, category=category, prompt_name=data.prompt_name_for(category))
                   for sample in listing.samples]
        corruptor = Corruptor(data.corruption, data.seed) if data.corruption is not None else None
        dataset = AnomalyDataset(samples, data.image_size, data.mode, on_bad_image=data.on_bad_image,
                                 corruptor=corruptor)
        image_scores, pixel_values = [], []
        with trainer.precision_plugin.predict_step_context():
            for batch in DataLoader(dataset, batch_size=data.batch_size, collate_fn=collate_batch):
                batch = {key: value.to(pl_module.device) if isinstance(value, torch.Tensor) else value
                         for key, value in batch.items()}
                maps, scores = pl_module.anomaly_maps(batch)
                image_scores.append(scores.detach().float().cpu().numpy())
                pixel_values.append(maps.detach().float().cpu().numpy().ravel())
        return quantile_thresholds(np.concatenate(image_scores), np.concatenate(pixel_values), self.quantile,
                                   str(self.normal_images))

    def thresholds_for(self, category: str) -> Thresholds:
        """The thresholds applied to a category (also recorded for thresholds.json)."""
        if category not in self._used:
            if self._run_thresholds is not None:
                base = self._run_thresholds.for_category(category)
            else:
                base = self._normal_thresholds or Thresholds()
            self._used[category] = base.with_given(self.image_threshold, self.pixel_threshold)
        return self._used[category]

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: dict[str, Any],
                           batch_indices: Any, batch: dict[str, Any], batch_idx: int, dataloader_idx: int) -> None:
        labels = batch["label"].tolist() if "label" in batch else [-1] * len(prediction["image_path"])
        rows = []
        for index, (image_path, category) in enumerate(zip(prediction["image_path"], prediction["category"])):
            thresholds = self.thresholds_for(category)
            folder = self.directory / self._names.folder(category)
            folder.mkdir(parents=True, exist_ok=True)
            stem = self._names.stem(image_path, category)
            anomaly_map, rgb = self._map_and_image(prediction["anomaly_map"][index], batch["image"][index], image_path)
            values = anomaly_map.numpy()
            mask = values >= thresholds.pixel if thresholds.pixel is not None else None
            if self.overlays:
                Image.fromarray(overlay(rgb, values, thresholds.pixel)).save(folder / f"{stem}_overlay.png")
            if self.raw_maps:
                np.save(folder / f"{stem}_map.npy", values.astype(np.float32))
                map_to_png16(values).save(folder / f"{stem}_map.png")
            if mask is not None:
                mask_to_png(mask).save(folder / f"{stem}_mask.png")
            score = float(prediction["pred_score"][index])
            predicted = "" if thresholds.image is None else LABEL_WORDS[int(score >= thresholds.image)]
            rows.append((image_path, category, stem, repr(score), _cell(thresholds.image), _cell(thresholds.pixel),
                         predicted, LABEL_WORDS.get(int(labels[index]), "")))
        with self._scores_file.open("a", newline="") as handle:
            csv.writer(handle).writerows(rows)

    def _map_and_image(self, anomaly_map: torch.Tensor, image: torch.Tensor,
                       image_path: str) -> tuple[torch.Tensor, np.ndarray | None]:
        """The map at the output resolution, and the image under it for the overlay (None without overlays)."""
        if self.resolution == "model":
            return anomaly_map.float().cpu(), denormalize(image) if self.overlays else None
        rgb = load_rgb(image_path) if self.overlays else None
        size = rgb.shape[:2] if rgb is not None else upright_size(image_path)
        return resize_map(anomaly_map, size), rgb

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for category in getattr(trainer.datamodule, "categories", None) or []:
            self.thresholds_for(category)
        (self.directory / "thresholds.json").write_text(
            json.dumps({"rule": "anomalous where score (image) or map value (pixel) >= threshold",
                        "categories": {category: used.as_dict() for category, used in self._used.items()}},
                       indent=2) + "\n", encoding="utf-8")
        console = Console()
        for category, used in self._used.items():
            console.print(f"{category}: image threshold {_cell(used.image) or 'none'}, pixel threshold "
                          f"{_cell(used.pixel) or 'none'} ({used.source})", markup=False)
        console.print(f"Anomaly maps and scores written to {self.directory}", markup=False)
        if getattr(pl_module, "random_weights", False):
            console.print(RANDOM_WEIGHTS_WARNING, style="bold red")


def _cell(value: float | None) -> str:
    return "" if value is None else repr(float(value))
