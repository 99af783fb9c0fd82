"""The panels of ``anovl test``: :class:`PanelWriter` draws the images :mod:`anovl.callbacks.picks` chose."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from anovl.callbacks.picks import Candidate, CategoryPicks
from anovl.categories import category_runs
from anovl.errors import AnovlError
from anovl.io import make_folder, write_file
from anovl.io.output_names import OutputNames
from anovl.tracking import run_directory
from anovl.visualization import denormalize, panel, panel_lines, stack_padded

if TYPE_CHECKING:
    from anovl.engine.module import AnomalyModule


def log_gallery(trainer: Trainer, key: str, pictures: list[Image.Image], captions: list[str]) -> None:
    """Send a category's pictures to every logger that takes images, in one call each: a W&B gallery, a
    TensorBoard image grid (padded to one size); CSV loggers take none."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=pictures, caption=captions)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_images(
                key, stack_padded(pictures), global_step=trainer.global_step, dataformats="NHWC"
            )


def output_names(trainer: Trainer) -> OutputNames:
    """Output stems for the images of the trainer's datamodule (all of them, on every process)."""
    dataset = getattr(getattr(trainer, "datamodule", None), "dataset", None)
    samples = getattr(dataset, "samples", ())
    return OutputNames((str(sample.image_path), sample.key, sample.category) for sample in samples)


def output_root(trainer: Trainer, pl_module: LightningModule, directory: Path) -> Path:
    """The run folder that holds ``directory`` (the results folder, else the logger's run folder), below which
    no link is followed; ``directory`` itself when it lies elsewhere (the user chose it)."""
    results_dir = getattr(pl_module, "results_dir", None)
    for root in ([Path(results_dir)] if results_dir else []) + [run_directory(trainer)]:
        if directory.absolute().is_relative_to(root.absolute()):
            return root
    return directory


def _nan_to_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


class PanelWriter(Callback):
    """Saves panels of chosen ``test`` images under ``<output_dir>/<category>/<name>.png`` and sends each
    category's panels to the image loggers as one gallery (W&B) or image grid (TensorBoard).

    A panel shows input | ground truth | anomaly map (on the method's fixed colour scale, 0 to its
    :attr:`~anovl.models.base.AnomalyModel.map_range`, with a colour bar), the
    image's label and score, and the category's F1-max thresholds from this run (the image threshold against
    the score, the pixel threshold as an outline on the map).

    Which images: per category, the roles of :data:`PICK_ROLES` take turns until ``max_per_category`` distinct
    images are chosen: the highest-scoring anomalous image, a normal image (a fixed pseudo-random sample by
    path), the lowest-scoring anomalous image, the highest-scoring normal image, then the next of each. The
    choice needs all scores of the category, so each role keeps its best ``max_per_category`` candidates
    (memory bounded by ``6 · max_per_category`` images) and the panels are written when the category is
    finished. Ties are broken by image path, so the choice depends neither on batch size nor on data order.
    Under DDP the choice is global: at the end every process sends its candidates of each category to rank 0
    (at most ``6 · max_per_category`` images per category and process), which chooses among them all and
    writes the panels, so the pictures and captions are those of a single process.

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
        self._root = self.directory
        self._names = OutputNames()
        self._keys: dict[str, str] = {}
        self._categories: list[str] = []  # of the whole dataset, in its order (the same on every process)
        self._pending: dict[str, CategoryPicks] = {}

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.directory = Path(self.output_dir) if self.output_dir else run_directory(trainer) / "pictures"
        self._root = output_root(trainer, pl_module, self.directory)
        self._pending = {}
        if self.max_per_category:
            self._names = output_names(trainer)
            samples = getattr(getattr(getattr(trainer, "datamodule", None), "dataset", None), "samples", ())
            self._keys = {str(sample.image_path): sample.key for sample in samples}
            self._categories = list(dict.fromkeys(sample.category for sample in samples))

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.max_per_category or outputs is None:
            return
        categories = list(outputs["category"])
        for run in category_runs(categories):
            picks = self._pending.setdefault(categories[run.start], CategoryPicks(self.max_per_category))
            for index in range(run.start, run.stop):
                path = outputs["image_path"][index]
                key = self._keys.get(path, path)
                picks.offer(
                    path,
                    key,
                    int(outputs["label"][index]),
                    float(outputs["pred_score"][index]),
                    lambda index=index, key=key: self._capture(outputs, index, key),
                )
        if trainer.world_size > 1:
            return  # categories are finished together at the end (see on_test_end)
        finished = getattr(getattr(pl_module, "results", None), "rows", {})
        for category in [category for category in self._pending if category in finished]:
            self._write(trainer, pl_module, category, self._pending.pop(category).choose())

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size == 1:
            for category in list(self._pending):
                self._write(trainer, pl_module, category, self._pending.pop(category).choose())
            return
        if not self.max_per_category:
            return
        import torch.distributed as dist  # initialised: the trainer runs several processes

        # Every process takes part in every category's gather, in the dataset's order, even with no share of it.
        for category in self._categories:
            picks = self._pending.pop(category, None)
            mine = picks.candidates() if picks is not None else []
            gathered: list[Any] | None = [None] * trainer.world_size if trainer.is_global_zero else None
            dist.gather_object(mine, gathered, dst=0)
            if gathered is None:
                continue
            merged = CategoryPicks(self.max_per_category)
            for candidate in (candidate for part in gathered for candidate in part):
                merged.add(candidate)
            self._write(trainer, pl_module, category, merged.choose())

    @staticmethod
    def _capture(outputs: dict[str, Any], index: int, key: str) -> Candidate:
        mask = outputs["mask"][index].detach().cpu().numpy() > 0.5 if bool(outputs["has_mask"][index]) else None
        return Candidate(
            outputs["image_path"][index],
            key,
            int(outputs["label"][index]),
            float(outputs["pred_score"][index]),
            denormalize(outputs["image"][index]),
            outputs["anomaly_map"][index].detach().float().cpu().numpy(),
            mask,
        )

    def _write(
        self, trainer: Trainer, pl_module: LightningModule, category: str, chosen: list[tuple[str, Candidate]]
    ) -> None:
        if not chosen:
            return
        results = getattr(pl_module, "results", None)
        thresholds = getattr(results, "thresholds", {}).get(category, {})
        image_threshold = _nan_to_none(thresholds.get("image"))
        pixel_threshold = _nan_to_none(thresholds.get("pixel"))
        map_range = cast("AnomalyModule", pl_module).model.map_range  # anovl's test runs an AnomalyModule
        folder = make_folder(self.directory / self._names.folder(category), self._root)
        pictures, captions = [], []
        for role, candidate in chosen:
            name = self._names.stem(candidate.image_path, category)
            lines = panel_lines(
                category,
                name,
                candidate.label,
                candidate.score,
                image_threshold,
                pixel_threshold,
                (float(candidate.anomaly_map.min()), float(candidate.anomaly_map.max())),
                role,
                map_range,
            )
            picture = panel(candidate.rgb, candidate.anomaly_map, candidate.mask, lines, pixel_threshold, map_range)
            write_file(folder / f"{name}.png", picture.save, self._root)
            pictures.append(picture)
            captions.append(" | ".join(lines[:2]))
        log_gallery(trainer, f"pictures/{category}", pictures, captions)
