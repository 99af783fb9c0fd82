"""The prediction writer of ``anovl predict``: maps, overlays, masks, scores.csv and thresholds.json."""

from __future__ import annotations

import csv
import io
import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import ExifTags, Image
from rich.console import Console

from anovl.callbacks.calibration import calibrate_on_normal_images
from anovl.callbacks.panels import output_names, output_root
from anovl.data.image_io import load_rgb
from anovl.errors import AnovlError
from anovl.io import append_text, csv_cell, make_folder, terminal, write_file
from anovl.io.files import Writer
from anovl.io.output_names import OutputNames
from anovl.results import RANDOM_WEIGHTS_WARNING
from anovl.thresholds import RunThresholds, Thresholds, check_quantile, check_threshold
from anovl.tracking import run_directory
from anovl.visualization import denormalize, mask_to_png, overlay, resize_map, write_map_png16

if TYPE_CHECKING:
    from anovl.engine.module import AnomalyModule

SCORE_COLUMNS = (
    "image_path",
    "category",
    "output",
    "score",
    "image_threshold",
    "pixel_threshold",
    "predicted_label",
    "true_label",
)
LABEL_WORDS = {0: "normal", 1: "anomalous"}


def upright_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as :func:`~anovl.data.image_io.load_rgb` gives it (EXIF orientation
    applied), from its header alone."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)  # these orientations turn by 90°


class AnomalyMapWriter(BasePredictionWriter):
    """Writes what ``predict`` finds, per image, under ``<output_dir>/<category>/``:

    * ``<name>_overlay.png``: the heatmap (jet on the method's fixed scale, 0 to its ``map_range``) blended over
      the image, with the outline of the predicted mask (white) when a pixel threshold is set;
    * ``<name>_map.npy``: the anomaly map, float32 H×W, in [0, the method's ``map_range``] (abnormal
      probability in [0, 1] for AnoVL and WinCLIP; sums over blocks for APRIL-GAN and AnomalyCLIP);
    * ``<name>_map.png``: the same map as a 16-bit greyscale PNG: value / 65535 × ``map_range`` gives it back
      (to 1/65535 of the range), the range recorded in the PNG's text chunk ``anovl:map_range``
      (:func:`~anovl.visualization.png16_to_map` reads it);
    * ``<name>_mask.png``: the predicted mask, 255 where ``map >= pixel threshold`` (with a pixel threshold);

    at the image's original size (the model's map resized back bilinearly; EXIF orientation applied), or at
    the model's input size with ``resolution: model``. ``<output_dir>/scores.csv`` gets one row per image
    (:data:`SCORE_COLUMNS`: the output name, the score, the thresholds, the predicted label where a threshold
    is set, the true label where the data has one), in the dataset's order whatever the number of processes
    (under DDP each process writes ``scores.rank<N>.csv``, and rank 0 merges them into scores.csv at the end and
    removes them), and ``<output_dir>/thresholds.json`` the thresholds used per category and their source.
    ``<name>`` is unique per category folder (see :class:`~anovl.io.output_names.OutputNames`).

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

    def __init__(
        self,
        output_dir: str | None = None,
        overlays: bool = True,
        raw_maps: bool = True,
        resolution: Literal["original", "model"] = "original",
        thresholds: str | None = None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        normal_images: str | None = None,
        quantile: float = 0.99,
    ):
        super().__init__(write_interval="batch")
        if resolution not in ("original", "model"):
            raise AnovlError(f"predictions.resolution must be 'original' or 'model', got {resolution!r}")
        if thresholds is not None and normal_images is not None:
            raise AnovlError(
                "give predictions.thresholds (a test run's results.json) or predictions.normal_images "
                "(a folder of normal images), not both"
            )
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
        self._root: Path | None = None
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
        self._root = output_root(trainer, pl_module, self.directory)
        make_folder(self.directory, self._root)
        name = "scores.csv" if trainer.world_size == 1 else f"scores.rank{trainer.global_rank}.csv"
        self._scores_file = self.directory / name
        write_file(self._scores_file, _csv_rows([SCORE_COLUMNS]), self._root)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.normal_images is not None and getattr(getattr(pl_module, "model", None), "scores_need_category", False):
            raise AnovlError(
                "predictions.normal_images cannot calibrate a model whose image scores are normalised over a "
                "whole category (few-shot APRIL-GAN): the normal images would form a category of their own; "
                "give thresholds (a test run's results.json) instead"
            )
        if self.normal_images is not None:
            self._normal_thresholds = calibrate_on_normal_images(trainer, pl_module, self.normal_images, self.quantile)

    def thresholds_for(self, category: str) -> Thresholds:
        """The thresholds applied to a category (also recorded for thresholds.json)."""
        if category not in self._used:
            if self._run_thresholds is not None:
                base = self._run_thresholds.for_category(category)
            else:
                base = self._normal_thresholds or Thresholds()
            self._used[category] = base.with_given(self.image_threshold, self.pixel_threshold)
        return self._used[category]

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any] | None,
        batch_indices: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if prediction is None:
            return  # padding only, or held until its category's scores are final (AnomalyModule.predict_step)
        assert self.directory is not None and self._scores_file is not None, "setup('predict') sets them"
        # From the prediction, not the batch: a model whose scores need the whole category hands over a
        # category's images at once.
        labels = prediction["label"].tolist()
        map_range = cast("AnomalyModule", pl_module).model.map_range  # anovl's predict runs an AnomalyModule
        rows = []
        for index, (image_path, category) in enumerate(zip(prediction["image_path"], prediction["category"])):
            thresholds = self.thresholds_for(category)
            folder = make_folder(self.directory / self._names.folder(category), self._root)
            stem = self._names.stem(image_path, category)
            anomaly_map, rgb = self._map_and_image(
                prediction["anomaly_map"][index], prediction["image"][index], image_path
            )
            values = anomaly_map.numpy()
            mask = values >= thresholds.pixel if thresholds.pixel is not None else None
            files: dict[str, Writer] = {}
            if rgb is not None:  # loaded for overlays only
                files[f"{stem}_overlay.png"] = Image.fromarray(overlay(rgb, values, thresholds.pixel, map_range)).save
            if self.raw_maps:
                files[f"{stem}_map.npy"] = partial(np.save, arr=values.astype(np.float32))
                files[f"{stem}_map.png"] = partial(write_map_png16, anomaly_map=values, map_range=map_range)
            if mask is not None:
                files[f"{stem}_mask.png"] = mask_to_png(mask).save
            for name, writer in files.items():
                write_file(folder / name, writer, self._root)
            score = float(prediction["pred_score"][index])
            predicted = "" if thresholds.image is None else LABEL_WORDS[int(score >= thresholds.image)]
            rows.append(
                (
                    image_path,
                    category,
                    stem,
                    repr(score),
                    _cell(thresholds.image),
                    _cell(thresholds.pixel),
                    predicted,
                    LABEL_WORDS.get(int(labels[index]), ""),
                )
            )
        append_text(self._scores_file, _csv_rows(rows), self._root)

    def _map_and_image(
        self, anomaly_map: torch.Tensor, image: torch.Tensor, image_path: str
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """The map at the output resolution, and the image under it for the overlay (None without overlays)."""
        if self.resolution == "model":
            return anomaly_map.float().cpu(), denormalize(image) if self.overlays else None
        rgb = load_rgb(image_path) if self.overlays else None
        size = rgb.shape[:2] if rgb is not None else upright_size(image_path)
        return resize_map(anomaly_map, size), rgb

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.directory is not None, "setup('predict') sets it"
        if trainer.world_size > 1:
            trainer.strategy.barrier()  # every part is written
            if trainer.is_global_zero:
                samples = getattr(getattr(getattr(trainer, "datamodule", None), "dataset", None), "samples", ())
                merge_score_parts(
                    self.directory,
                    trainer.world_size,
                    {str(sample.image_path): index for index, sample in enumerate(samples)},
                    self._root,
                )
        if not trainer.is_global_zero:
            return
        for category in getattr(getattr(trainer, "datamodule", None), "categories", None) or []:
            self.thresholds_for(category)
        write_file(
            self.directory / "thresholds.json",
            json.dumps(
                {
                    "rule": "anomalous where score (image) or map value (pixel) >= threshold",
                    "categories": {category: used.as_dict() for category, used in self._used.items()},
                },
                indent=2,
            )
            + "\n",
            self._root,
        )
        console = Console()
        for category, used in self._used.items():
            console.print(
                terminal(
                    f"{category}: image threshold {_cell(used.image) or 'none'}, pixel threshold "
                    f"{_cell(used.pixel) or 'none'} ({used.source})"
                ),
                markup=False,
            )
        console.print(f"Anomaly maps and scores written to {terminal(self.directory)}", markup=False)
        if getattr(pl_module, "random_weights", False):
            console.print(RANDOM_WEIGHTS_WARNING, style="bold red")


def merge_score_parts(directory: Path, parts: int, order: dict[str, int], root: Path | None = None) -> None:
    """Merge ``scores.rank<N>.csv`` (N < ``parts``) into one scores.csv: the rows in dataset order (``order``:
    image path -> position), each image once, then remove the parts. An image the dataset does not list (not
    expected) keeps its place after the listed ones."""
    files = [directory / f"scores.rank{rank}.csv" for rank in range(parts)]
    rows: dict[tuple[str, str], list[str]] = {}
    for path in files:
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:  # as append_text wrote
            reader = csv.reader(handle)
            next(reader, None)  # the header
            for row in reader:
                rows.setdefault((row[0], row[1]), row)  # the first copy of an image: no padding duplicates
    ordered = sorted(rows.values(), key=lambda row: order.get(row[0], len(order)))
    text = io.StringIO(newline="")
    csv.writer(text).writerows([SCORE_COLUMNS, *ordered])
    write_file(directory / "scores.csv", text.getvalue().encode("utf-8", "surrogateescape"), root)
    for path in files:
        path.unlink()


def _csv_rows(rows: list[tuple]) -> str:
    """CSV text of rows; text from data (paths, categories, names) cannot start a formula."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows([csv_cell(value) for value in row] for row in rows)
    return buffer.getvalue()


def _cell(value: float | None) -> str:
    return "" if value is None else repr(float(value))
