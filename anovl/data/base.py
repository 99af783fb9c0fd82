"""What every dataset shares: the sample record, the dataset producing batch items, batching, the datamodule.

A concrete datamodule (mvtec.py, visa.py, folder.py) only says how to find its samples (:meth:`_discover`).

Bad data policy (``on_bad_image``):

* ``"error"`` (default): problems found while listing files (an anomalous image without a mask) raise
  :class:`~anovl.errors.AnovlError` at once; files are only decoded when a batch needs them, so an unreadable
  image or a mask of the wrong size raises :class:`~anovl.data.image_io.BadImageError` at that point.
* ``"skip"``: every image and mask is decoded once when the dataset is built (in threads; a plain header
  check would miss truncated JPEGs). An unusable image is left out; an unusable or missing mask (unreadable,
  wrong size) only removes the pixel ground truth: the image stays, with ``has_mask`` False, for the image
  metrics. Each case gives one :class:`SkippedFileWarning` naming the file, and the datamodule's
  :attr:`~AnomalyDataModule.skipped_files` keeps the messages (results.json lists them).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler, default_collate

from anovl.data.corruptions import CorruptionSpec, Corruptor, resolve_corruption
from anovl.data.image_io import BadImageError, check_mask_size, check_pixel_budget, has_image_extension, load_mask, load_rgb
from anovl.data.paths import walk_files
from anovl.data.transforms import normalize, resize_image, resize_mask, shorter_side_size
from anovl.categories import category_info
from anovl.errors import AnovlError

OnBadImage = Literal["error", "skip"]
ResizeMode = Literal["resize", "tile"]

_IMAGE_FALLBACK = "leave unreadable images out"
_MASK_FALLBACK = "use such images without pixel ground truth"

# Tile mode keeps the aspect ratio, so the input grows with it (a 20000×1 image would be 4.8 M pixels wide at
# S = 240); beyond this ratio an image is refused. VisA's are below 2:1.
MAX_TILE_ASPECT = 8


class SkippedFileWarning(UserWarning):
    """A file left out (or used without its mask) because ``on_bad_image='skip'``."""


class UnusedFilesWarning(UserWarning):
    """Image files in a dataset folder that its layout does not use (they are named, never dropped silently)."""


@dataclass(frozen=True)
class Sample:
    """One test image and what is known about it."""

    image_path: Path
    key: str  # path relative to the dataset root: sort key and corruption seed, independent of where the root lives
    category: str
    prompt_name: str
    label: int  # 0 normal, 1 anomalous, -1 unknown
    has_mask: bool  # pixel ground truth exists (all normal when mask_path is None)
    mask_path: Path | None = None


class AnomalyDataset(Dataset):
    """Turns samples into batch items with the keys of docs/ARCHITECTURE.md.

    ``mode="resize"`` gives S×S images; ``"tile"`` resizes the shorter side to S and keeps the aspect ratio
    (to be cut with :func:`~anovl.data.transforms.split_tiles`), up to :data:`MAX_TILE_ASPECT`. VisA-style masks
    storing class indices use ``nonzero_masks=True`` (see :func:`~anovl.data.image_io.load_mask`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        mode: ResizeMode = "resize",
        nonzero_masks: bool = False,
        on_bad_image: OnBadImage = "error",
        corruptor: Corruptor | None = None,
    ) -> None:
        self.image_size = image_size
        self.mode = mode
        self.nonzero_masks = nonzero_masks
        self.corruptor = corruptor
        self.samples, self.skipped = self._usable_samples(samples) if on_bad_image == "skip" else (list(samples), [])
        for problem in self.skipped:
            warnings.warn(problem, SkippedFileWarning, stacklevel=2)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            rgb = load_rgb(sample.image_path)
            out_hw = self.output_size(sample, *rgb.shape[:2])
        except BadImageError as error:
            raise BadImageError(f"{error}, or set on_bad_image='skip' to {_IMAGE_FALLBACK}") from error
        mask = np.zeros(out_hw, dtype=bool)
        if sample.mask_path is not None:
            try:
                mask = resize_mask(self.read_mask(sample, rgb.shape[:2]), out_hw)
            except BadImageError as error:
                raise BadImageError(f"{error}, or set on_bad_image='skip' to {_MASK_FALLBACK}") from error
        resized = resize_image(rgb, out_hw)
        item = {
            "image": normalize(resized),
            "mask": torch.from_numpy(mask).float(),
            "has_mask": torch.tensor(sample.has_mask),
            "label": torch.tensor(sample.label, dtype=torch.long),
            "category": sample.category,
            "prompt_name": sample.prompt_name,
            "image_path": str(sample.image_path),
        }
        if self.corruptor is not None:
            item["corrupted_image"] = normalize(self.corruptor(resized, sample.key))
        return item


    def output_size(self, sample: Sample, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the model input made from a ``height×width`` image; BadImageError if too large."""
        size = self.image_size
        if self.mode == "resize":
            out_hw = (size, size)
        else:
            aspect = max(height, width) / min(height, width)
            if aspect > MAX_TILE_ASPECT:
                raise BadImageError(
                    f"Image {sample.image_path} is {width}×{height}, an aspect ratio of {aspect:.3g}:1; tile mode keeps "
                    f"the aspect ratio and accepts at most {MAX_TILE_ASPECT}:1; crop the image or use mode='resize'"
                )
            out_hw = shorter_side_size(height, width, size)
        check_pixel_budget(sample.image_path, "image", *out_hw, "resized")
        return out_hw

    def read_mask(self, sample: Sample, image_hw: tuple[int, int]) -> np.ndarray:
        """The mask of a sample at its image's size; BadImageError if unusable or, for an anomalous image, empty."""
        mask = load_mask(sample.mask_path, self.nonzero_masks)
        check_mask_size(sample.image_path, image_hw, sample.mask_path, mask.shape)
        if sample.label == 1 and not mask.any():
            raise BadImageError(f"Mask {sample.mask_path} of anomalous image {sample.image_path} marks no pixel as "
                                "anomalous (see the mask rule in anovl.data.image_io); fix the mask")
        return mask

    def _usable_samples(self, samples: Sequence[Sample]) -> tuple[list[Sample], list[str]]:
        """Decode every file once; drop unusable images, strip unusable masks; one problem message per file."""

        def check(sample: Sample) -> tuple[Sample | None, str | None]:
            try:
                image_hw = load_rgb(sample.image_path).shape[:2]
                self.output_size(sample, *image_hw)
            except BadImageError as error:
                return None, f"{error} (on_bad_image='skip': image left out)"
            if sample.mask_path is None:
                return sample, None
            try:
                self.read_mask(sample, image_hw)
            except BadImageError as error:
                return (replace(sample, mask_path=None, has_mask=False),
                        f"{error} (on_bad_image='skip': image used without its mask)")
            return sample, None

        # Pillow releases the GIL while decoding, so threads give a real speed-up on large test sets.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(check, samples))
        usable = [sample for sample, _ in results if sample is not None]
        return usable, [problem for _, problem in results if problem is not None]


def collate_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, with a clear error where tile-mode images of different sizes meet in one batch."""
    shapes = sorted({tuple(item["image"].shape) for item in items})
    if len(shapes) > 1:
        raise AnovlError(
            f"Images of one batch have different sizes {shapes} (tile mode keeps each image's aspect ratio); "
            f"use batch_size=1 or mode='resize'"
        )
    return default_collate(items)


class CategoryBatchSampler(BatchSampler):
    """Batches of consecutive indices that never mix categories.

    Keeps images of one category (in tile mode: of one size) together, so batches stack. It follows
    ``BatchSampler``'s signature so that Lightning can swap in its own sampler (prediction, distributed runs).
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, groups: Sequence[str]) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.groups = list(groups)

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in self.sampler:
            if batch and (len(batch) == self.batch_size or self.groups[index] != self.groups[batch[-1]]):
                yield from self._emit(batch)
                batch = []
            batch.append(index)
        yield from self._emit(batch)

    def _emit(self, batch: list[int]) -> Iterator[list[int]]:
        if batch and not (self.drop_last and len(batch) < self.batch_size):
            yield batch

    def __len__(self) -> int:
        return sum(1 for _ in self)


def index_by_stem(directory: Path, root: Path, allow_outside_root: bool = False) -> dict[str, list[Path]]:
    """Image files below ``directory`` (recursively, inside ``root``: see :mod:`anovl.data.paths`), grouped by
    file stem; empty if it does not exist."""
    index: dict[str, list[Path]] = defaultdict(list)
    if directory.is_dir():
        for path in sorted(walk_files(directory, root, allow_outside_root)):
            if has_image_extension(path):
                index[path.stem].append(path)
    return index


def warn_unused_images(paths: Sequence[Path], layout: str) -> None:
    """Image files that a layout does not use are named in a warning: data is never dropped silently."""
    if paths:
        shown = ", ".join(map(str, paths[:3])) + (", ..." if len(paths) > 3 else "")
        warnings.warn(f"{len(paths)} image files are not part of the layout ({layout}) and are not used: {shown}",
                      UnusedFilesWarning, stacklevel=3)


def _refuse_repeated_files(samples: Sequence[Sample]) -> None:
    """One image file listed twice (through a symlink, or two names of one file) would count twice."""
    entries: dict[Path, list[str]] = defaultdict(list)
    for sample in samples:
        entries[Path(os.path.realpath(sample.image_path))].append(sample.key)  # realpath: no error on a loop
    repeated = {path: keys for path, keys in entries.items() if len(keys) > 1}
    if repeated:
        path, keys = next(iter(repeated.items()))
        raise AnovlError(f"{len(repeated)} image files are listed more than once, e.g. {path} as {', '.join(keys)}; "
                         "remove the duplicate links or entries so that no image counts twice")


def find_mask(index: dict[str, list[Path]], image_path: Path) -> Path | None:
    """The mask of an image: ``<stem>_mask.<ext>`` (MVTec) or else ``<stem>.<ext>`` (BTAD, MPDD-style folders)."""
    for stem in (f"{image_path.stem}_mask", image_path.stem):
        matches = index.get(stem, [])
        if len(matches) > 1:
            raise AnovlError(f"Several masks match image {image_path}: {', '.join(map(str, matches))}; keep only one")
        if matches:
            return matches[0]
    return None


def require_dir(path: Path, what: str, expected: str) -> Path:
    if not path.is_dir():
        raise AnovlError(f"{what} {path} is not a directory; expected {expected}")
    return path


def category_selection(categories: Sequence[str] | str | None) -> list[str] | None:
    """Sorted, de-duplicated category selection; None (or empty) means all."""
    if isinstance(categories, str):
        categories = [categories]
    return sorted(set(categories)) if categories else None


class AnomalyDataModule(LightningDataModule):
    """Test/predict datamodule base: a fixed, sorted list of samples served in category-pure batches.

    Args:
        image_size: model input side S.
        batch_size: images per batch (batches never mix categories, so some are smaller).
        num_workers: DataLoader worker processes.
        on_bad_image: ``"error"`` or ``"skip"``; see the module docstring.
        corruption: None (off), a preset name (``"default"``), a dict of
            :class:`~anovl.data.corruptions.CorruptionConfig` fields or a config; adds ``corrupted_image``.
        seed: seed of the corruptions.
        prompt_names: category -> object name for the prompts, overriding :mod:`anovl.categories` (by default the
            category itself; VisA macaroni1 -> macaroni). The category's domain stays as it is.
        mode: ``"resize"`` (S×S) or ``"tile"`` (shorter side S, aspect kept); exposed by the VisA module.
        allow_outside_root: follow symlinks and split-file paths that lead outside the dataset root (refused by
            default; see :mod:`anovl.data.paths`).
    """

    nonzero_masks = False  # masks storing class indices (VisA: 0 background, 1 defect) set it: nonzero is anomalous

    def __init__(
        self,
        image_size: int = 240,
        batch_size: int = 8,
        num_workers: int = 0,
        on_bad_image: OnBadImage = "error",
        corruption: CorruptionSpec = None,
        seed: int = 0,
        prompt_names: dict[str, str] | None = None,
        mode: ResizeMode = "resize",
        allow_outside_root: bool = False,
    ) -> None:
        super().__init__()
        for name, value, minimum in (("image_size", image_size, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < minimum:
                raise AnovlError(f"{name}={value!r} must be an integer >= {minimum}")
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
                raise AnovlError(f"prompt_names[{category!r}] is {name!r}; give the object name for the prompts "
                                 "(e.g. 'bottle'), or drop the entry to use the category name")
        self.mode = mode
        self.allow_outside_root = allow_outside_root
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
            _refuse_repeated_files(self._samples)
            unused = sorted(set(self.prompt_names) - {sample.category for sample in self._samples})
            if unused:
                warnings.warn(f"prompt_names entries {unused} match no category of this dataset and are ignored", stacklevel=2)
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
            "locations": {name: str(path.resolve()) if path is not None else None
                          for name, path in self.locations().items()},
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
        dataset = AnomalyDataset(self.samples, self.image_size, self.mode, self.nonzero_masks, self.on_bad_image, corruptor)
        if len(dataset) == 0:
            raise AnovlError(f"None of the {len(self.samples)} images could be read (see the warnings above); check the data")
        self._dataset = dataset

    @property
    def dataset(self) -> AnomalyDataset:
        self.setup()
        return self._dataset

    def test_dataloader(self) -> DataLoader:
        return self._dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self._dataloader()

    def _dataloader(self) -> DataLoader:
        dataset = self.dataset
        batches = CategoryBatchSampler(
            SequentialSampler(dataset), self.batch_size, drop_last=False, groups=[sample.category for sample in dataset.samples]
        )
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers, collate_fn=collate_batch)

    def _report_missing_mask(self, image_path: Path, expected: str) -> None:
        """An anomalous image without ground truth: raise (error mode) or warn (skip mode; it stays, without mask)."""
        problem = f"No mask for anomalous image {image_path} (expected {expected})"
        if self.on_bad_image == "error":
            raise AnovlError(f"{problem}; add the mask, or set on_bad_image='skip' to {_MASK_FALLBACK}")
        message = f"{problem} (on_bad_image='skip': image used without its mask)"
        self._listing_problems[image_path] = message
        warnings.warn(message, SkippedFileWarning, stacklevel=3)
