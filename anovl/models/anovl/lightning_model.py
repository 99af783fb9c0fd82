"""AnoVLModule: the AnoVL core under a Lightning Trainer, for ``test`` (metrics per category) and ``predict``.

Metrics: one :class:`~anovl.metrics.AnomalyMetrics` per category of the datamodule. In a single process a
category is finished (computed, written to the results files, logged) as soon as the next one starts;
under DDP every process holds a share of each category and the metrics' compute is a collective call, so
all categories are computed together at the end of the epoch, in the same order on every process.

A run can be continued after an interruption (``anovl test --resume``): :meth:`AnoVLModule.resume` takes the
finished categories of the earlier part, which the datamodule then leaves out. :meth:`AnoVLModule.run_config`
is what the two parts must agree on; results.json records it.

DDP's ``DistributedSampler`` pads the test set with copies of its first images so that every process gets
the same number; those copies are recognised by their position and left out of the metrics, so N processes
give exactly the table of one.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch.utils.data import DistributedSampler

from anovl.data.transforms import split_tiles, stitch_tiles
from anovl.errors import AnovlError
from anovl.metrics import AnomalyMetrics
from anovl.models.anovl.prompts import PromptSet
from anovl.models.anovl.torch_model import AnoVL
from anovl.models.anovl.tta import TTAConfig
from anovl.models.anovl.views import NUM_REFERENCE_VIEWS
from anovl.results import ResultsTable
from anovl.visualization import panel, picture_name

# The hyperparameters that the metrics depend on (not paths, caching or pictures): see AnoVLModule.run_config.
CONFIG_HPARAMS = ("backbone", "pretrained", "image_size", "num_views", "layers", "prompts", "tta", "init_seed",
                  "cflow_pro")

# The padded copies that this warning is about are dropped by AnoVLModule (see the module docstring).
warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders")


def run_directory(trainer: Trainer) -> Path:
    """Where a run's files go: the CSV/TensorBoard logger's version folder, else <save_dir>/<name>/<version>
    of the first logger, else the trainer's default_root_dir. Must be called on every process."""
    logger = trainer.logger
    if logger is None or isinstance(logger, (CSVLogger, TensorBoardLogger)):
        directory = trainer.log_dir  # already broadcast from rank 0 (versions are numbered there)
    else:
        parts = [logger.save_dir or trainer.default_root_dir, logger.name, logger.version]
        directory = str(Path(*(str(part) for part in parts if part)))
    return Path(trainer.strategy.broadcast(directory))


def log_picture(trainer: Trainer, key: str, picture: Image.Image, caption: str) -> None:
    """Send a picture to every logger that takes images (W&B, TensorBoard); CSV loggers have none."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[picture], caption=[caption])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, np.asarray(picture),
                                        global_step=trainer.global_step, dataformats="HWC")


def _category_runs(categories: Sequence[str]) -> list[slice]:
    """Slices of consecutive equal categories."""
    starts = [index for index, category in enumerate(categories) if index == 0 or category != categories[index - 1]]
    return [slice(start, end) for start, end in zip(starts, starts[1:] + [len(categories)])]


def _plain_data(value: Any) -> Any:
    """Dataclasses and tuples as JSON-like dicts and lists."""
    return json.loads(json.dumps(asdict(value) if is_dataclass(value) else value))


def _distributed_sampler(dataloader: Any) -> DistributedSampler | None:
    for sampler in (getattr(getattr(dataloader, "batch_sampler", None), "sampler", None),
                    getattr(dataloader, "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


class AnoVLModule(LightningModule):
    """Zero-shot anomaly localisation (AnoVL) for ``Trainer.test`` and ``Trainer.predict``.

    Model args (see :class:`~anovl.models.anovl.torch_model.AnoVL`):
        backbone, pretrained, image_size, num_views, layers, prompts, cache_dir, use_text_cache, tta,
        encoder_chunk_size.
        init_seed: seed of the weights when ``pretrained`` is None (random weights, for tests and demos),
            so that every process and every run builds the same model.

    Framework args:
        cflow_pro: also report the cflow-style AUPRO of the authors' evaluation (for comparison with papers).
        max_pictures: panels (input | ground truth | heatmap) saved per category during ``test``; 0 = none.
            Under DDP each process saves its share. Saved panels are also sent to image loggers.
        picture_dir: where the panels go (default: ``<run dir>/pictures``).
        results_dir: where results.csv / .json / .md go (default: the run dir, i.e. the logger's folder).

    In VisA's tile mode (images wider than tall) each image is cut into square tiles, the tiles are run
    separately and their maps stitched back (overlaps averaged); the image score is the tiles' mean.

    After ``Trainer.test`` the table is in :attr:`results` (a :class:`~anovl.results.ResultsTable`).
    """

    def __init__(
        self,
        backbone: str = "ViT-B-16-plus-240",
        pretrained: str | None = "laion400m_e32",
        image_size: int | None = None,
        num_views: int = NUM_REFERENCE_VIEWS,
        layers: Sequence[int] = (-1,),
        prompts: PromptSet | None = None,
        cache_dir: str | None = None,
        use_text_cache: bool = True,
        tta: TTAConfig | None = None,
        encoder_chunk_size: int | None = None,
        init_seed: int = 0,
        cflow_pro: bool = False,
        max_pictures: int = 0,
        picture_dir: str | None = None,
        results_dir: str | None = None,
    ):
        super().__init__()
        if max_pictures < 0:
            raise AnovlError(f"max_pictures must be >= 0, got {max_pictures}")
        self.save_hyperparameters()
        # Again as plain data, so that hparams.yaml and W&B configs carry no Python object tags.
        self.save_hyperparameters({name: _plain_data(value) for name, value in self.hparams.items()})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.model = AnoVL(backbone, pretrained, image_size, num_views, layers, prompts, cache_dir,
                               use_text_cache, tta, encoder_chunk_size)
        self.pretrained = pretrained
        self.random_weights = pretrained is None
        self.cflow_pro = cflow_pro
        self.max_pictures = max_pictures
        self.picture_dir = picture_dir
        self.results_dir = results_dir
        self.results: ResultsTable | None = None
        self._resumed: ResultsTable | None = None
        self._metrics: dict[str, AnomalyMetrics] = {}
        self._image_counts: dict[str, int] = {}
        self._pictures_saved: dict[str, int] = {}
        self._current_category: str | None = None  # of the last images run (TTA state follows it)
        self._open_category: str | None = None  # of the last images added to the metrics
        self._samples_seen = 0
        self._sampler: DistributedSampler | None = None
        self._picture_root = Path(".")

    # ----------------------------------------------------------------- running the core

    def setup(self, stage: str) -> None:
        data_size = getattr(self.trainer.datamodule, "image_size", None)
        if data_size is not None and data_size != self.model.image_size:
            raise AnovlError(
                f"the data is resized to {data_size} px but the model expects {self.model.image_size} px; "
                f"set data.init_args.image_size and model.init_args.image_size to the same value"
            )

    def _start_category(self, category: str) -> None:
        # Reference-mode TTA carries its optimiser over within a category only.
        if category != self._current_category and self.model.tta is not None:
            self.model.tta.reset()
        self._current_category = category

    def anomaly_maps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (B×H×W, the size of the batch images) and image scores (B) of a batch."""
        categories = list(batch["category"])
        maps, scores = [], []
        for run in _category_runs(categories):
            self._start_category(categories[run.start])
            corrupted = batch.get("corrupted_image")
            run_maps, run_scores = self._run_core(batch["image"][run], list(batch["class_name"][run]),
                                                  None if corrupted is None else corrupted[run])
            maps.append(run_maps)
            scores.append(run_scores)
        return torch.cat(maps), torch.cat(scores)

    def _run_core(self, images: torch.Tensor, class_names: list[str],
                  corrupted: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = images.shape[-2:]
        if height == width:
            output = self.model(images, class_names, corrupted)
            return output.anomaly_map, output.pred_score
        tiles = split_tiles(images)
        per_image = tiles.shape[0] // images.shape[0]
        output = self.model(tiles, [name for name in class_names for _ in range(per_image)],
                            None if corrupted is None else split_tiles(corrupted))
        return stitch_tiles(output.anomaly_map, height, width), output.pred_score.view(-1, per_image).mean(1)

    # ----------------------------------------------------------------- test

    def run_config(self, datamodule: Any) -> dict[str, Any]:
        """The model and data settings that the metrics depend on, as JSON-like data (written to results.json)."""
        model = {name: self.hparams[name] for name in CONFIG_HPARAMS}
        model["image_size"] = self.model.image_size  # None stands for the backbone's native size
        if self.pretrained is not None and Path(self.pretrained).expanduser().is_file():
            model["pretrained"] = str(Path(self.pretrained).expanduser().resolve())  # same file, however named
        fingerprint = getattr(datamodule, "fingerprint", None)
        data = fingerprint() if fingerprint is not None else {"class": type(datamodule).__name__}
        return _plain_data({"model": model, "data": data})

    def resume(self, earlier: ResultsTable) -> None:
        """Continue an interrupted run: the next ``test`` starts its table with ``earlier``'s finished categories
        (the datamodule must leave them out) and keeps ``earlier``'s configuration record."""
        self._resumed = earlier

    def on_test_start(self) -> None:
        datamodule = self.trainer.datamodule
        categories = getattr(datamodule, "categories", None)
        if categories is None:
            raise AnovlError("AnoVLModule.test needs a datamodule with a 'categories' list (e.g. MVTecDataModule)")
        tta = self.model.tta_config
        if tta is not None and tta.mode == "reference" and self.trainer.world_size > 1:
            raise AnovlError("tta.mode 'reference' carries optimiser state from image to image in data order, "
                             "which several processes cannot follow; run it on one device or use mode 'independent'")
        self._metrics = {category: AnomalyMetrics(cflow_pro=self.cflow_pro).to(self.device) for category in categories}
        self._image_counts = dict.fromkeys(categories, 0)
        self._pictures_saved = dict.fromkeys(categories, 0)
        self._current_category = None
        self._open_category = None
        self._samples_seen = 0
        self._sampler = _distributed_sampler(self.trainer.test_dataloaders)
        run_dir = run_directory(self.trainer)
        self._picture_root = Path(self.picture_dir) if self.picture_dir else run_dir / "pictures"
        title = (f"AnoVL {self.model.variant}, {self.model.backbone_name} ({self.pretrained or 'random weights'}) on "
                 f"{type(datamodule).__name__}{self._data_location(datamodule)}")
        results_dir = Path(self.results_dir) if self.results_dir else run_dir
        earlier = self._resumed
        finished = len(earlier.rows) if earlier is not None else 0
        # Every process computes the table (compute syncs), only rank 0 writes it.
        self.results = ResultsTable(results_dir if self.trainer.is_global_zero else None, title,
                                    self.random_weights, finished + len(categories), self.model.variant,
                                    config=earlier.config if earlier is not None else self.run_config(datamodule),
                                    skipped_files=getattr(datamodule, "skipped_files", ()))
        if earlier is not None:
            self.results.include(earlier)
            # The loggers of this part get the whole table (a reused CSV logger folder starts a new metrics.csv).
            for category in earlier.rows:
                self._log_category(category)

    def _log_category(self, category: str) -> None:
        self._log_metrics({f"{category}/{name}": value for name, value in self.results.rows[category].items()})

    @staticmethod
    def _data_location(datamodule: Any) -> str:
        location = getattr(datamodule, "root", None) or getattr(datamodule, "path", None)
        return f" {location}" if location else ""

    def _real_samples(self, batch_size: int) -> torch.Tensor:
        """Which items of the batch are not DistributedSampler padding (position beyond the dataset)."""
        first = self._samples_seen
        self._samples_seen += batch_size
        keep = torch.ones(batch_size, dtype=torch.bool)
        if self._sampler is None or self._sampler.drop_last:
            return keep
        positions = self._sampler.rank + self._sampler.num_replicas * torch.arange(first, first + batch_size)
        return positions < len(self._sampler.dataset)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        keep = self._real_samples(len(batch["category"]))
        if not keep.any():
            return
        if not keep.all():
            batch = {key: [item for item, kept in zip(value, keep) if kept] if isinstance(value, list)
                     else value[keep.to(value.device)] for key, value in batch.items()}
        maps, scores = self.anomaly_maps(batch)
        categories = list(batch["category"])
        for run in _category_runs(categories):
            category = categories[run.start]
            if category not in self._metrics:
                raise AnovlError(f"category {category!r} of a batch is not among the datamodule's categories")
            if category in self.results.rows:
                raise AnovlError(f"images of category {category!r} came after the category was finished; the "
                                 "test data must come grouped by category, as anovl's datamodules give it")
            if self.trainer.world_size == 1 and self._open_category not in (None, category):
                self._finish_category(self._open_category)
            self._open_category = category
            self._metrics[category].update(maps[run], batch["mask"][run], scores[run], batch["label"][run],
                                           batch["has_mask"][run])
            self._image_counts[category] += run.stop - run.start
            self._save_pictures(batch, maps, run, category)

    def _save_pictures(self, batch: dict[str, Any], maps: torch.Tensor, run: slice, category: str) -> None:
        # Under DDP the processes share the quota (rank r takes every world_size-th picture slot).
        quota = len(range(self.trainer.global_rank, self.max_pictures, self.trainer.world_size))
        for index in range(run.start, run.stop):
            if self._pictures_saved[category] >= quota:
                return
            name = picture_name(batch["image_path"][index], category)
            label = {0: "normal", 1: "anomalous"}.get(int(batch["label"][index]), "unlabelled")
            picture = panel(batch["image"][index], maps[index],
                            batch["mask"][index] if bool(batch["has_mask"][index]) else None,
                            f"{category}/{name} ({label})")
            folder = self._picture_root / category
            folder.mkdir(parents=True, exist_ok=True)
            picture.save(folder / f"{name}.png")
            log_picture(self.trainer, f"pictures/{category}", picture, name)
            self._pictures_saved[category] += 1

    def _finish_category(self, category: str) -> None:
        if category in self.results.rows:
            return
        metric = self._metrics[category]
        with warnings.catch_warnings():
            # compute() before any update on this process is expected under DDP (its share may be empty).
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
            values = metric.compute()
        metric.reset()  # frees the category's pixel scores
        count = self._image_counts[category]
        if self.trainer.world_size > 1:
            count = int(self.trainer.strategy.reduce(torch.tensor(count, device=self.device), reduce_op="sum"))
        self.results.add(category, values, count)
        self._log_category(category)

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        # Straight to the loggers (rank 0 only): the values are already synced, and Lightning's own
        # end-of-test table would only repeat the results table.
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)

    def on_test_epoch_end(self) -> None:
        for category in self._metrics:
            self._finish_category(category)
        self._log_metrics({f"mean/{name}": value for name, value in self.results.mean().items()})
        if self.trainer.is_global_zero:
            self.results.print()

    # ----------------------------------------------------------------- predict

    def on_predict_start(self) -> None:
        self._current_category = None

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per image: ``anomaly_map`` (H×W), ``pred_score``, ``image_path`` and ``category`` (CPU tensors)."""
        maps, scores = self.anomaly_maps(batch)
        return {
            "anomaly_map": maps.detach().float().cpu(),
            "pred_score": scores.detach().float().cpu(),
            "image_path": list(batch["image_path"]),
            "category": list(batch["category"]),
        }

