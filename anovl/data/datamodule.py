"""The test/predict datamodule base: listing, settings shared by every layout, dataloaders.

A concrete datamodule (mvtec.py, visa.py, folder.py) only says how to find its samples (:meth:`_discover`);
the bad data policy (``on_bad_image``) is described in :mod:`anovl.data.dataset`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, SequentialSampler

from anovl.categories import category_info
from anovl.data.corruptions import CorruptionSpec, Corruptor, resolve_corruption
from anovl.data.dataset import MASK_FALLBACK, AnomalyDataset, OnBadImage, ResizeMode, Sample, SkippedFileWarning
from anovl.data.decoded_cache import DecodedCache
from anovl.data.listing import refuse_repeated_files
from anovl.data.sampling import CategoryBatchSampler, collate_batch
from anovl.errors import AnovlError

# More workers than this rarely pay: a worker decodes and resizes ~30 MVTec-sized PNGs per second, and 16 of
# them feed a GPU faster than its model runs (docs/benchmarks.md).
MAX_AUTO_WORKERS = 16


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class OneLineErrorsLoader(DataLoader):
    """A DataLoader that passes on a worker's AnovlError (a bad file) as the one line it was, not as the worker
    traceback that PyTorch puts into the message."""

    # torch declares its own iterator class as the return type; a generator iterates the same batches
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        iterator = super().__iter__()
        while True:
            try:
                yield next(iterator)
            except StopIteration:
                return
            except AnovlError as error:
                raise type(error)(worker_error_line(str(error), type(error))) from None


def worker_error_line(message: str, kind: type[BaseException]) -> str:
    """The original message of an error re-raised from a loader worker ("Caught X in DataLoader worker process
    0. Original Traceback ... X: message"); another message is returned as it is."""
    if not message.startswith(f"Caught {kind.__name__} "):
        return message
    last = message.rstrip().rsplit("\n", 1)[-1]
    return last.split(f"{kind.__name__}: ", 1)[-1]


class AnomalyDataModule(LightningDataModule):
    """Test/predict datamodule base: a fixed, sorted list of samples served in category-pure batches.

    These keyword arguments are shared by every layout; a subclass takes its own (where the data is) and passes
    the rest on as ``**kwargs`` (jsonargparse, hence the CLI, follows them to this signature).

    Args:
        image_size: model input side S.
        batch_size: images per batch (batches never mix categories, so some are smaller).
        num_workers: DataLoader worker processes; ``"auto"``: one per CPU core this process may use, less one
            for the process running the model (shared out between the processes of a node), at most
            :data:`MAX_AUTO_WORKERS`. Workers stay up between loops and, for a CUDA model, fill pinned memory.
        on_bad_image: ``"error"`` or ``"skip"``; see the module docstring.
        corruption: None (off), a preset name (``"default"``), a dict of
            :class:`~anovl.data.corruptions.CorruptionConfig` fields or a config; adds ``corrupted_image``.
        seed: seed of the corruptions.
        prompt_names: category -> object name for the prompts, overriding :mod:`anovl.categories` (by default the
            category itself; VisA macaroni1 -> macaroni). The category's domain stays as it is.
        mode: ``"resize"`` (S×S) or ``"tile"`` (shorter side S, aspect kept; VisA's default).
        allow_outside_root: follow symlinks and split-file paths that lead outside the dataset root (refused by
            default; see :mod:`anovl.data.paths`).
        decoded_cache_gb: keep decoded, resized images and masks in the anovl cache folder, up to this many GB
            (0: off); a second run over the same files and settings reads no image file
            (:mod:`anovl.data.decoded_cache`).
    """

    nonzero_masks = False  # masks storing class indices (VisA: 0 background, 1 defect) set it: nonzero is anomalous

    def __init__(
        self,
        *,
        image_size: int = 240,
        batch_size: int = 8,
        num_workers: int | Literal["auto"] = "auto",
        on_bad_image: OnBadImage = "error",
        corruption: CorruptionSpec = None,
        seed: int = 0,
        prompt_names: dict[str, str] | None = None,
        mode: ResizeMode = "resize",
        allow_outside_root: bool = False,
        decoded_cache_gb: float = 0.0,
    ) -> None:
        super().__init__()
        checked = [("image_size", image_size, 1), ("batch_size", batch_size, 1)]
        if num_workers != "auto":
            checked.append(("num_workers", num_workers, 0))
        for name, value, minimum in checked:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise AnovlError(
                    f"{name}={value!r} must be an integer >= {minimum}"
                    + (" or 'auto'" if name == "num_workers" else "")
                )
        if on_bad_image not in ("error", "skip"):
            raise AnovlError(f"on_bad_image={on_bad_image!r} must be 'error' or 'skip'")
        if mode not in ("resize", "tile"):
            raise AnovlError(f"mode={mode!r} must be 'resize' or 'tile'")
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_image = on_bad_image
        self.corruption = resolve_corruption(corruption)
        self.seed = seed
        self.prompt_names = dict(prompt_names or {})
        for category, name in self.prompt_names.items():
            if not isinstance(name, str) or not name.strip():
                raise AnovlError(
                    f"prompt_names[{category!r}] is {name!r}; give the object name for the prompts "
                    "(e.g. 'bottle'), or drop the entry to use the category name"
                )
        self.mode = mode
        self.allow_outside_root = allow_outside_root
        if (
            not isinstance(decoded_cache_gb, (int, float))
            or isinstance(decoded_cache_gb, bool)
            or not decoded_cache_gb >= 0
        ):
            raise AnovlError(f"decoded_cache_gb={decoded_cache_gb!r} must be a number >= 0 (0: no cache)")
        self.decoded_cache_gb = decoded_cache_gb
        self._samples: list[Sample] | None = None
        self._dataset: AnomalyDataset | None = None
        self._listing_problems: dict[Path, str] = {}  # image -> message, for missing masks found while listing

    def _discover(self) -> list[Sample]:
        """All samples of the dataset (any order); raise AnovlError for a missing or malformed layout."""
        raise NotImplementedError

    def default_prompt_name(self, category: str) -> str:
        return category_info(category).prompt_name

    def prompt_name_for(self, category: str) -> str:
        return self.prompt_names.get(category, self.default_prompt_name(category))

    @property
    def samples(self) -> list[Sample]:
        """Samples sorted by category, then path (listing only; files are not decoded)."""
        if self._samples is None:
            self._samples = sorted(self._discover(), key=lambda sample: (sample.category, sample.key))
            refuse_repeated_files(self._samples)
            unused = sorted(set(self.prompt_names) - {sample.category for sample in self._samples})
            if unused:
                warnings.warn(
                    f"prompt_names entries {unused} match no category of this dataset and are ignored", stacklevel=2
                )
        return self._samples

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(sample.category for sample in self.samples))

    def exclude_categories(self, categories: Iterable[str]) -> None:
        """Leave these categories out (those that a resumed run has finished); call before the dataset is built."""
        excluded = set(categories)
        self._samples = [sample for sample in self.samples if sample.category not in excluded]
        self._dataset = None

    @property
    def skipped_files(self) -> list[str]:
        """One message per file of this datamodule's samples that ``on_bad_image='skip'`` left out or used
        without its mask."""
        listed = {sample.image_path for sample in self.samples}
        return [message for path, message in self._listing_problems.items() if path in listed] + self.dataset.skipped

    def locations(self) -> dict[str, Path | None]:
        """Where the dataset's files are, by argument name (for :meth:`fingerprint`); each layout names its own."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide which images a run sees and how they look; not batch size or workers."""
        return {
            "class": type(self).__name__,
            "locations": {
                name: str(path.resolve()) if path is not None else None for name, path in self.locations().items()
            },
            "categories": self.categories,
            "prompt_names": {category: self.prompt_name_for(category) for category in self.categories},
            "image_size": self.image_size,
            "mode": self.mode,
            "on_bad_image": self.on_bad_image,
            "corruption": asdict(self.corruption) if self.corruption is not None else None,
            "seed": self.seed,
        }

    def setup(self, stage: str | None = None) -> None:
        if self._dataset is not None:
            return
        corruptor = Corruptor(self.corruption, self.seed) if self.corruption is not None else None
        cache = None
        if self.decoded_cache_gb > 0:
            cache = DecodedCache(int(self.decoded_cache_gb * 1e9))
            cache.prune()
        dataset = AnomalyDataset(
            self.samples, self.image_size, self.mode, self.nonzero_masks, self.on_bad_image, corruptor, cache
        )
        if len(dataset) == 0:
            raise AnovlError(
                f"None of the {len(self.samples)} images could be read (see the warnings above); check the data"
            )
        self._dataset = dataset

    @property
    def dataset(self) -> AnomalyDataset:
        self.setup()
        assert self._dataset is not None, "setup() sets it"
        return self._dataset

    def test_dataloader(self) -> DataLoader:
        return self._dataloader()

    def train_dataloader(self) -> DataLoader:
        # `anovl fit` trains on these labelled images (the auxiliary-data protocol trains on a test split with
        # masks); the module orders and augments them (anovl.engine.AnomalyModule.train_dataloader).
        assert self.trainer is not None, "Lightning calls it during fit"
        return self.trainer.lightning_module.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        # fit's optional validation data is another datamodule (AnomalyModule's `validation`); none by default.
        assert self.trainer is not None, "Lightning calls it during fit"
        return self.trainer.lightning_module.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self._dataloader()

    def _dataloader(self) -> DataLoader:
        dataset = self.dataset
        batches = CategoryBatchSampler(
            SequentialSampler(dataset),
            self.batch_size,
            drop_last=False,
            groups=[sample.category for sample in dataset.samples],
        )
        workers = self.loader_workers()
        return OneLineErrorsLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=collate_batch,
            persistent_workers=workers > 0,
            pin_memory=self._model_on_cuda(),
        )

    def loader_workers(self) -> int:
        """The number of loader worker processes (``num_workers``, with ``"auto"`` resolved)."""
        if self.num_workers != "auto":
            return self.num_workers
        processes = max(1, getattr(self.trainer, "num_devices", 1)) if self.trainer is not None else 1
        return max(0, min(available_cores() // processes - 1, MAX_AUTO_WORKERS))

    def _model_on_cuda(self) -> bool:
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def _report_missing_mask(self, image_path: Path, expected: str) -> None:
        """An anomalous image without ground truth: raise (error mode) or warn (skip mode; it stays, without mask)."""
        problem = f"No mask for anomalous image {image_path} (expected {expected})"
        if self.on_bad_image == "error":
            raise AnovlError(f"{problem}; add the mask, or set on_bad_image='skip' to {MASK_FALLBACK}")
        message = f"{problem} (on_bad_image='skip': image used without its mask)"
        self._listing_problems[image_path] = message
        warnings.warn(message, SkippedFileWarning, stacklevel=3)
