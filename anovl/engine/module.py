"""AnomalyModule: any :class:`~anovl.models.base.AnomalyModel` under a Lightning Trainer, for ``test`` (metrics
per category, results files, ``--resume``) and ``predict``.

Metrics: one :class:`~anovl.metrics.AnomalyMetrics` per category of the datamodule. In a single process a
category is finished (computed, written to the results files, logged) as soon as the next one starts;
under DDP every process holds a share of each category and the metrics' compute is a collective call, so
all categories are computed together at the end of the epoch, in the same order on every process.

A run can be continued after an interruption (``anovl test --resume``): :meth:`AnomalyModule.resume` takes the
finished categories of the earlier part, which the datamodule then leaves out. :meth:`AnomalyModule.run_config`
is what the two parts must agree on; results.json records it.

DDP's ``DistributedSampler`` pads the test set with copies of its first images so that every process gets
the same number; those copies are recognised by their position and left out of the metrics, so N processes
give exactly the table of one.

``test_step`` and ``predict_step`` return the batch's maps and scores, so callbacks (the panel and prediction
writers in :mod:`anovl.callbacks`) see them in ``on_test_batch_end`` / ``on_predict_batch_end``.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from anovl.categories import category_runs
from anovl.data.datamodule import AnomalyDataModule, OneLineErrorsLoader
from anovl.data.sampling import collate_batch
from anovl.data.transforms import prepare_batch
from anovl.engine.training import (
    TrainingData,
    TrainingRun,
    TrainingSampler,
    check_training_samples,
    learning_rate,
)
from anovl.errors import AnovlError
from anovl.metrics import AnomalyMetrics
from anovl.models.base import AnomalyModel, check_label, json_data
from anovl.models.checkpoints import (
    METADATA_KEY,
    MODEL_PREFIX,
    check_compatible,
    checkpoint_metadata,
    lightning_trained_state,
    load_trained_state,
    trained_module,
    trained_prefix,
)
from anovl.models.components.tiling import tile_batch, untile
from anovl.models.registry import method_record
from anovl.results import ResultsTable
from anovl.tracking import log_metrics, run_directory

# The padded copies that this warning is about are dropped by AnomalyModule (see the module docstring).
warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders")
# AnomalyModule's on_after_batch_transfer (the loader's uint8 -> normalised float) is meant to run whatever the
# datamodule; Lightning warns about that on every run.
warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`")


def _distributed_sampler(dataloader: Any) -> DistributedSampler | None:
    for sampler in (
        getattr(getattr(dataloader, "batch_sampler", None), "sampler", None),
        getattr(dataloader, "sampler", None),
    ):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def _select(batch: dict[str, Any], index: slice | torch.Tensor) -> dict[str, Any]:
    """The items ``index`` (a slice, or a boolean mask) of a batch's tensors and lists."""
    if isinstance(index, slice):
        return {key: value[index] if isinstance(value, (list, torch.Tensor)) else value for key, value in batch.items()}
    return {
        key: [item for item, kept in zip(value, index) if kept]
        if isinstance(value, list)
        else value[index.to(value.device)]
        if isinstance(value, torch.Tensor)
        else value
        for key, value in batch.items()
    }


def _concatenate(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch of the items of ``parts`` (dicts of the same keys), in order."""
    return {
        key: torch.cat([part[key] for part in parts])
        if isinstance(first, torch.Tensor)
        else [item for part in parts for item in part[key]]
        if isinstance(first, list)
        else first
        for key, first in parts[0].items()
    }


def _images_per_category(datamodule: Any) -> dict[str, int]:
    """How many test images each category has, where the datamodule says (anovl's datamodules do)."""
    samples = getattr(getattr(datamodule, "dataset", None), "samples", None)
    return dict(Counter(sample.category for sample in samples)) if samples is not None else {}


class AnomalyModule(LightningModule):
    """Runs any anomaly model for ``Trainer.test`` and ``Trainer.predict``.

    Args:
        model: the method (any :class:`~anovl.models.base.AnomalyModel`, e.g. ``anovl.models.AnoVL``).
        label: the run's label in results, ``anovl compare`` and logger names; default: the model's own
            (the method plus what differs from its reference settings), taken again when a test starts, so
            that it names the weights tested (after ``Trainer.test(module, ckpt_path=...)`` has loaded them).
        group: the run's group in loggers that group runs (W&B): the experiment its variants are compared in.
            ``anovl grid`` gives the grid's name; the CLI's default is the stem of the first config file.
        variant: the variant's short key in W&B run names and tags (``anovl grid`` gives the grid's variant
            name); default: the model's variant (e.g. ``tta-text``), else its method.
        cflow_pro: also report the cflow-style AUPRO of the authors' evaluation (for comparison with papers).
        results_dir: where results.csv / .json / .md go (default: the run dir, i.e. the logger's folder).
        tf32: TF32 for float32 on CUDA: faster, maps move slightly; the recorded precision names it.
        validation: ``fit`` only: a datamodule whose test split is run at every epoch's end, reported as
            ``val/<metric>`` (the mean over its categories of the metrics ``test`` reports), e.g. another dataset
            of the protocol or held-out categories. Under DDP each process runs a share, and the metrics are
            those of one process.
        mosaic_rate: ``fit`` only: the share of training images replaced by APRIL-GAN's 2×2 mosaic of four
            images of their category (the authors: 0.2 on MVTec, 0 on VisA); see :mod:`anovl.engine.training`.

    In VisA's tile mode (images wider than tall) each image is cut into square tiles, the tiles are run
    separately and their maps stitched back (overlaps averaged); the image score is the tiles' mean; a model
    with ``handles_wide_images`` gets the whole image instead.

    After ``Trainer.test`` the table is in :attr:`results` (a :class:`~anovl.results.ResultsTable`).
    """

    def __init__(
        self,
        model: AnomalyModel,
        label: str | None = None,
        cflow_pro: bool = False,
        results_dir: str | None = None,
        group: str | None = None,
        variant: str | None = None,
        tf32: bool = False,
        mosaic_rate: float = 0.0,
        validation: AnomalyDataModule | None = None,
    ):
        super().__init__()
        if not isinstance(model, AnomalyModel):
            raise AnovlError(f"the model must be an anovl.models.base.AnomalyModel, got {type(model).__name__}")
        if model.transductive:
            raise AnovlError(
                f"{type(model).__name__} is transductive (needs whole categories at once), which the "
                "test and predict loops do not support yet"
            )
        self.model = model
        self._given_names = (
            check_label(label) if label is not None else None,
            check_label(variant) if variant is not None else None,
        )
        self._name_run()
        self.group = check_label(group) if group is not None else None
        self.cflow_pro = cflow_pro
        self.results_dir = results_dir
        self.tf32 = tf32
        self._tf32_before: tuple[bool, bool] | None = None
        if not (isinstance(mosaic_rate, (int, float)) and 0 <= mosaic_rate <= 1):
            raise AnovlError(
                f"mosaic_rate must lie in [0, 1] (the authors: 0.2 on MVTec, 0 on VisA), got {mosaic_rate!r}"
            )
        self.mosaic_rate = float(mosaic_rate)
        self.validation = validation
        self._val_metrics: dict[str, AnomalyMetrics] = {}
        # Checkpoints hold only the trained part (the frozen CLIP is rebuilt from its settings), so loading one
        # must not ask for the CLIP's tensors; on_load_checkpoint checks the trained part instead.
        self.strict_loading = False
        # The model's settings, not its weights, describe the run; the loggers get the whole run config from
        # the CLI's RunTracker instead (anovl.tracking).
        self.save_hyperparameters(
            {
                "model": {**method_record(model), "settings": model.settings()},
                "label": self.label,
                "cflow_pro": cflow_pro,
            },
            logger=False,
        )
        self.results: ResultsTable | None = None
        self._resumed: ResultsTable | None = None
        self._metrics: dict[str, AnomalyMetrics] = {}
        self._image_counts: dict[str, int] = {}
        self._expected_counts: dict[str, int] = {}
        self._current_category: str | None = None  # of the last images run (state carried within a category)
        self._open_category: str | None = None  # of the last images added to the metrics
        self._samples_seen = 0
        self._sampler: DistributedSampler | None = None
        # Outputs held until their category's image scores are final (AnomalyModel.scores_need_category).
        self._holding = False
        self._held: dict[str, list[dict[str, Any]]] = {}
        self._released: list[dict[str, Any]] = []
        self._categories: list[str] = []

    def _name_run(self) -> None:
        """The label and variant: the given ones, else the model's own as its weights are now."""
        label, variant = self._given_names
        self.label = label or self.model.label
        self.variant = variant or self.model.variant or self.model.method or self.label

    @property
    def random_weights(self) -> bool:
        return self.model.settings().get("pretrained", "") is None

    # ----------------------------------------------------------------- running the model

    def setup(self, stage: str) -> None:
        # TF32 (PyTorch's default: off) is set for the run only and restored in teardown.
        self._tf32_before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32

    def teardown(self, stage: str) -> None:
        if self._tf32_before is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._tf32_before
            self._tf32_before = None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise the loader's uint8 images where the model runs (:func:`~anovl.data.transforms.prepare_batch`);
        floating entries then follow the trainer's precision as they would have on the way in."""
        if not isinstance(batch, dict):
            return batch
        prepared = prepare_batch(batch)
        return self.trainer.precision_plugin.convert_input(prepared) if self._trainer is not None else prepared

    def anomaly_maps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (B×H×W, the size of the batch images) and image scores (B) of a batch."""
        categories = list(batch["category"])
        maps, scores = [], []
        for run in category_runs(categories):
            if categories[run.start] != self._current_category:
                self.model.start_category(categories[run.start])
                self._current_category = categories[run.start]
            extras = {key: batch[key][run] for key in self.model.batch_extras if batch.get(key) is not None}
            run_maps, run_scores = self._run_model(
                batch["image"][run], categories[run], list(batch["prompt_name"][run]), extras
            )
            maps.append(run_maps)
            scores.append(run_scores)
        return torch.cat(maps), torch.cat(scores)

    def _run_model(
        self, images: torch.Tensor, categories: list[str], prompt_names: list[str], extras: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = images.shape[-2:]
        if height == width or self.model.handles_wide_images:
            output = self.model(images, categories, prompt_names, **extras)
            return output.anomaly_map, output.pred_score
        tiles, _, per_tile = tile_batch(images, categories=categories, prompt_names=prompt_names, **extras)
        output = self.model(tiles, per_tile.pop("categories"), per_tile.pop("prompt_names"), **per_tile)
        return untile(output.anomaly_map, output.pred_score, height, width)

    # ----------------------------------------------------------------- test

    def run_config(self, datamodule: Any) -> dict[str, Any]:
        """The model, data and evaluation settings that the metrics depend on (written to results.json)."""
        fingerprint = getattr(datamodule, "fingerprint", None)
        data = fingerprint() if fingerprint is not None else {"class": type(datamodule).__name__}
        model = {**method_record(self.model), **self.model.settings()}
        # TF32 joins the precision (rather than a key of its own) so that earlier results.json files still resume.
        precision = str(self.trainer.precision) + (" with TF32" if self.tf32 else "")
        evaluation = {"cflow_pro": self.cflow_pro, "precision": precision}
        return json_data({"model": model, "data": data, "evaluation": evaluation})

    def resume(self, earlier: ResultsTable) -> None:
        """Continue an interrupted run: the next ``test`` starts its table with ``earlier``'s finished categories
        (the datamodule must leave them out) and keeps ``earlier``'s configuration record."""
        self._resumed = earlier

    def on_test_start(self) -> None:
        # Named again now that Lightning has restored a ckpt_path (or a fit in this session has trained the
        # weights): the label then names the weights the results are of, as the settings recorded below do.
        # The Engine loads a ckpt_path before it builds the module, so there the name does not change.
        self._name_run()
        datamodule = getattr(self.trainer, "datamodule", None)  # set by Lightning, not declared on Trainer
        categories = getattr(datamodule, "categories", None)
        if categories is None:
            raise AnovlError("test needs a datamodule with a 'categories' list (e.g. MVTecDataModule)")
        if self.model.order_dependent and self.trainer.world_size > 1:
            raise AnovlError(
                f"{self.label} depends on the order of the images (e.g. tta.mode 'reference' carries "
                "optimiser state from image to image), which several processes cannot follow; run it "
                "on one device or use an order-free setting (tta.mode 'independent')"
            )
        self._metrics = {category: AnomalyMetrics(cflow_pro=self.cflow_pro).to(self.device) for category in categories}
        self._image_counts = dict.fromkeys(categories, 0)
        self._expected_counts = _images_per_category(datamodule)
        self._start_holding(self.trainer.test_dataloaders, self.trainer.num_test_batches)
        run_dir = run_directory(self.trainer)
        settings = self.model.settings()
        weights = settings.get("pretrained", None)
        title = (
            f"{self.label}, {settings.get('backbone', type(self.model).__name__)} "
            f"({weights or 'random weights'}) on {type(datamodule).__name__}{self._data_location(datamodule)}"
        )
        results_dir = Path(self.results_dir) if self.results_dir else run_dir
        earlier = self._resumed
        finished = len(earlier.rows) if earlier is not None else 0
        # Every process computes the table (compute syncs), only rank 0 writes it.
        self.results = ResultsTable(
            results_dir if self.trainer.is_global_zero else None,
            title,
            self.random_weights,
            finished + len(categories),
            self.label,
            config=earlier.config if earlier is not None else self.run_config(datamodule),
            skipped_files=getattr(datamodule, "skipped_files", ()),
        )
        if earlier is not None:
            self.results.include(earlier)
            # The loggers of this part get the whole table (a reused CSV logger folder starts a new metrics.csv).
            for category in earlier.rows:
                self._log_category(category)

    def _start_holding(self, dataloaders: Any, batches: list[float]) -> None:
        """Per-run state of test and predict (``batches``: the loaders' lengths)."""
        self._current_category = None
        self._open_category = None
        self._samples_seen = 0
        self._sampler = _distributed_sampler(dataloaders)
        self._holding = self.model.scores_need_category
        self._held = {}
        self._released = []
        self._categories = list(getattr(getattr(self.trainer, "datamodule", None), "categories", None) or ())
        if self._holding and self.trainer.world_size > 1 and not self._categories:
            raise AnovlError(
                f"{self.label}'s image scores need whole categories, which several processes can only gather "
                "with a datamodule that lists its categories (anovl's do); run it in one process"
            )
        if self._holding and not all(math.isfinite(count) for count in batches):
            # The held outputs are released at the last batch, which a loader without a length never announces.
            raise AnovlError(
                f"{self.label}'s image scores need whole categories, which it can only hand over from a data "
                "loader with a length (anovl's datamodules have one)"
            )

    def _log_category(self, category: str) -> None:
        assert self.results is not None, "on_test_start makes the table"
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
        return positions < len(cast(Sized, self._sampler.dataset))  # torch's Dataset type declares no __len__

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any] | None:
        """Updates the category metrics; returns, for callbacks, the real (not padded) images' ``batch`` entries
        with ``anomaly_map`` and ``pred_score`` added (see :meth:`_final_outputs`)."""
        outputs = self._outputs(batch)
        assert self.results is not None, "on_test_start makes the table"
        for run in category_runs(list(outputs["category"])) if outputs is not None else ():
            assert outputs is not None, "runs only come from real images"
            category = outputs["category"][run.start]
            if category not in self._metrics:
                raise AnovlError(f"category {category!r} of a batch is not among the datamodule's categories")
            if category in self.results.rows:
                raise AnovlError(
                    f"images of category {category!r} came after the category was finished; the "
                    "test data must come grouped by category, as anovl's datamodules give it"
                )
            if self.trainer.world_size == 1 and self._open_category not in (None, category):
                self._finish_category(self._open_category)
            self._open_category = category
            self._collect(category, _select(outputs, run))
            self._image_counts[category] += run.stop - run.start
            if self.trainer.world_size == 1 and self._image_counts[category] == self._expected_counts.get(category):
                # Written now, so that a failure in the next category cannot lose it.
                self._finish_category(category)
        return self._final_outputs(outputs, batch_idx, self.trainer.num_test_batches[dataloader_idx])

    def _outputs(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """The batch's real (not padded) images with ``anomaly_map`` and ``pred_score``; None: all padding."""
        keep = self._real_samples(len(batch["category"]))
        if not keep.any():
            return None
        if not keep.all():
            batch = _select(batch, keep)
        maps, scores = self.anomaly_maps(batch)
        return {**batch, "anomaly_map": maps, "pred_score": scores}

    def _update_metrics(self, metrics: AnomalyMetrics, outputs: dict[str, Any]) -> None:
        regions = outputs.get("region_sizes")
        maps, masks, scores, labels = (
            value.to(self.device)
            for value in (outputs["anomaly_map"], outputs["mask"], outputs["pred_score"], outputs["label"])
        )
        metrics.update(
            maps,
            masks,
            scores,
            labels,
            outputs["has_mask"].to(self.device),
            None if regions is None else regions.to(self.device),
        )

    # ----------------------------------------------------------------- image scores final per category

    def _collect(self, category: str, outputs: dict[str, Any]) -> None:
        """One category's part of a batch: to the metrics (test), or held (on the CPU) until the category's
        image scores are final, for a model whose scores need the whole category."""
        if self._holding:
            self._held.setdefault(category, []).append(
                {
                    key: value.detach().cpu() if isinstance(value, torch.Tensor) else value
                    for key, value in outputs.items()
                }
            )
        elif self.trainer.testing:
            self._update_metrics(self._metrics[category], outputs)

    def _release(self, categories: list[str]) -> None:
        """Final image scores (:meth:`AnomalyModel.category_scores`) of the held outputs of ``categories``, each
        over every process's share (a collective under DDP: every process passes the same list); the outputs
        then go to the metrics (test) and to the callbacks (:meth:`_final_outputs`)."""
        for category in categories:
            held = self._held.pop(category, [])
            mine = (
                torch.cat([part["pred_score"] for part in held]).float() if held else torch.empty(0),
                torch.cat([part["anomaly_map"].flatten(1).amax(1) for part in held]).float()
                if held
                else torch.empty(0),
            )
            shares: list[Any] = [mine]  # all_gather_object fills in every process's (untyped)
            if self.trainer.world_size > 1:
                shares = [None] * self.trainer.world_size
                torch.distributed.all_gather_object(shares, mine)
            if not held:
                continue
            first = sum(len(share[0]) for share in shares[: self.trainer.global_rank])
            final = self.model.category_scores(
                torch.cat([share[0] for share in shares]), torch.cat([share[1] for share in shares])
            )
            final = final[first : first + len(mine[0])]
            for part in held:
                count = len(part["pred_score"])
                part["pred_score"], final = final[:count], final[count:]
                if self.trainer.testing:
                    self._update_metrics(self._metrics[category], part)
            self._released.extend(held)

    def _final_outputs(self, outputs: dict[str, Any] | None, batch_idx: int, batches: float) -> dict[str, Any] | None:
        """What the callbacks get from a step: its outputs, or, where image scores need the whole category,
        the held outputs of every category released in this step (a finished category in one process; under
        DDP, every category at the last batch, which all processes reach together)."""
        if not self._holding:
            return outputs
        if batch_idx == batches - 1:
            self._release(list(self._categories) if self.trainer.world_size > 1 else list(self._held))
        released, self._released = self._released, []
        return _concatenate(released) if released else None

    def _finish_category(self, category: str) -> None:
        assert self.results is not None, "on_test_start makes the table"
        if category in self.results.rows:
            return
        if self.trainer.world_size == 1:
            self._release([category])
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
        log_metrics(self.trainer, metrics)

    def on_test_epoch_end(self) -> None:
        for category in self._metrics:
            self._finish_category(category)
        assert self.results is not None, "on_test_start makes the table"
        self._log_metrics({f"mean/{name}": value for name, value in self.results.mean().items()})
        if self.trainer.is_global_zero:
            self.results.print()

    # ----------------------------------------------------------------- predict

    def on_predict_start(self) -> None:
        self._start_holding(self.trainer.predict_dataloaders, self.trainer.num_predict_batches)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any] | None:
        """Per real (not padded) image: ``anomaly_map`` (H×W) and ``pred_score`` (CPU float tensors), the
        ``image``, ``label``, ``image_path`` and ``category`` (see :meth:`_final_outputs`)."""
        outputs = self._outputs(batch)
        if outputs is not None:
            outputs = {
                "anomaly_map": outputs["anomaly_map"].detach().float().cpu(),
                "pred_score": outputs["pred_score"].detach().float().cpu(),
                **{key: outputs[key] for key in ("image", "label", "image_path", "category")},
            }
            for run in category_runs(list(outputs["category"])):
                category = outputs["category"][run.start]
                if self._open_category not in (None, category) and self.trainer.world_size == 1:
                    self._release([self._open_category])
                self._open_category = category
                self._collect(category, _select(outputs, run))
        return self._final_outputs(outputs, batch_idx, self.trainer.num_predict_batches[dataloader_idx])

    # ----------------------------------------------------------------- fit (methods trained on auxiliary data)

    def train_dataloader(self) -> DataLoader:
        """The datamodule's labelled images (its test split with masks), in :class:`TrainingSampler`'s order."""
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "dataset", None)
        if datamodule is None or dataset is None or not hasattr(dataset, "samples"):
            raise AnovlError(
                "fit needs one of anovl's datamodules (MVTec, VisA, Folder, synthetic), whose labelled "
                "images with masks are the training data"
            )
        if getattr(datamodule, "mode", "resize") != "resize":
            raise AnovlError("fit trains on square images: set the data's mode to 'resize' (tile mode is for test)")
        check_training_samples(dataset.samples, type(datamodule).__name__)
        seed = torch.initial_seed() % 2**31  # the run's seed_everything
        data = TrainingData(dataset, seed)
        sampler = TrainingSampler(data, self.trainer.world_size, self.trainer.global_rank, seed, self.mosaic_rate)
        workers = datamodule.loader_workers()
        return OneLineErrorsLoader(
            data,
            batch_size=datamodule.batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_batch,
            persistent_workers=workers > 0,
            pin_memory=self.trainer.strategy.root_device.type == "cuda",
        )

    def val_dataloader(self) -> Any:
        if self.validation is None:
            return []
        self.validation.image_size = self.model.preprocessing().image_size
        self.validation.prepare_data()
        self.validation.trainer = self.trainer
        return self.validation.test_dataloader()

    def on_validation_epoch_start(self) -> None:
        # Every process holds every category's metrics (computed together, in one order, at the epoch's end),
        # and leaves out the sampler's padding, as test does: N processes report the metrics of one.
        categories = self.validation.categories if self.validation is not None else []
        self._val_metrics = {category: AnomalyMetrics().to(self.device) for category in categories}
        self._current_category = None
        self._samples_seen = 0
        self._sampler = _distributed_sampler(self.trainer.val_dataloaders)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        outputs = self._outputs(batch)
        if outputs is None:
            return
        for run in category_runs(list(outputs["category"])):
            self._update_metrics(self._val_metrics[outputs["category"][run.start]], _select(outputs, run))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._val_metrics:
            return
        with warnings.catch_warnings():
            # compute() before any update on this process is expected under DDP (its share may be empty).
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
            per_category = [metrics.compute() for metrics in self._val_metrics.values()]
        for name in per_category[0]:
            values = [row[name] for row in per_category if row[name] == row[name]]  # NaN: undefined, left out
            if values:
                # The same value on every process (computed over all of them): sync_dist only quiets Lightning.
                self.log(f"val/{name}", 100 * sum(values) / len(values), on_epoch=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trained_prefix(self.model)  # a training-free method stops here with a clear error
        return self.model.configure_optimizer(trained_module(self.model).parameters())

    def configure_callbacks(self) -> list[Callback]:
        if self._trainer is None or self.trainer.state.fn != "fit":
            return []
        # Every epoch's end is a checkpoint (last.ckpt, and the latest epoch=N file, without which Lightning saves
        # no last.ckpt), so a killed run resumes from its last finished epoch.
        # Lightning puts them in the run's folder (RUN/checkpoints) once its logger has started (a W&B run's id).
        return [ModelCheckpoint(save_last=True, save_top_k=1), TrainingRun()]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.model.training_losses(
            batch["image"], batch["mask"], list(batch["category"]), list(batch["prompt_name"])
        )
        loss = sum(losses.values())
        assert isinstance(loss, torch.Tensor), "a method gives at least one loss term"
        size = len(batch["category"])
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=True, batch_size=size, sync_dist=True)
        self.log(
            "train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True
        )
        self.log("train/lr", learning_rate(self.trainer), on_step=True, on_epoch=True, batch_size=size)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only the trained part: the frozen CLIP is rebuilt from the settings recorded next to it.
        prefix = MODEL_PREFIX + trained_prefix(self.model)
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)
        }
        checkpoint[METADATA_KEY] = checkpoint_metadata(self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        source = "the checkpoint (ckpt_path)"
        check_compatible(checkpoint.get(METADATA_KEY), self.model, source)
        load_trained_state(self.model, lightning_trained_state(self.model, checkpoint.get("state_dict") or {}), source)
