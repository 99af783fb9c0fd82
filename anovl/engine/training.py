"""What ``anovl fit`` adds to a datamodule's labelled images: the training order, APRIL-GAN's mosaic
augmentation, the check that every anomalous image has its mask, and the callbacks of a training run.

**Order.** :class:`TrainingSampler` draws one permutation per epoch from ``(seed, epoch)`` and gives process
``r`` of ``W`` the positions ``r, r + W, ...``; with a per-process batch ``b``, step ``k`` of the ``W`` processes
together sees the permutation's positions ``[kWb, (k+1)Wb)``, the same images as one process with batch
``Wb``. So ``W`` processes reach the weights of one (to float tolerance), and a run resumed at an epoch boundary
sees the same images as one that never stopped.

**Mosaic** (APRIL-GAN on MVTec, rate 0.2): with probability ``rate`` an image is replaced by a 2×2 mosaic of
four images of its category, each drawn as the authors draw it (a defect type, then an image of it), and the
mosaic and its mask are resized back to the input size. The draws come from ``(seed, epoch, position)``,
never from a global random state. The authors paste the original images and resize the mosaic once; here the
images are already at the input size, so the mosaic is resized from twice that (antialiased) — the same
picture up to resampling (docs/METHOD.md, APRIL-GAN, says exactly how they differ). The mosaic's region sizes
are its own mask's.
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence, Sized
from pathlib import Path, PurePosixPath
from typing import Any, cast

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import Dataset, DistributedSampler

from anovl import signals
from anovl.errors import AnovlError
from anovl.metrics.functional import region_size_map
from anovl.tracking import run_directory

# The frozen CLIP stays in eval mode on purpose (anovl.models.clip_model.CLIPAnomalyModel.train).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def check_training_samples(samples: Sequence[Any], data_name: str) -> None:
    """Training needs a label for every image and a mask for every anomalous one."""
    unlabelled = [sample for sample in samples if sample.label not in (0, 1)]
    unmasked = [sample for sample in samples if sample.label == 1 and not sample.has_mask]
    if unlabelled or unmasked or not any(sample.label == 1 for sample in samples):
        example = (unlabelled or unmasked or [None])[0]
        what = (
            f"{len(unlabelled)} of its {len(samples)} images have no label"
            if unlabelled
            else f"{len(unmasked)} of its {len(samples)} anomalous images have no mask"
            if unmasked
            else "it has no anomalous image"
        )
        raise AnovlError(
            f"fit trains on labelled images with pixel masks (a test split with its ground truth), "
            f"but {what}" + (f" (e.g. {example.image_path})" if example is not None else "") + f" in {data_name}"
        )


class TrainingSampler(DistributedSampler):
    """A seeded permutation per epoch, shared out among processes (see the module docstring). Each item is
    ``(index, position, epoch)``: the dataset index, and the position in the epoch if it becomes a mosaic
    (else -1); the epoch travels with it, so loader workers need no state of their own."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, mosaic_rate: float = 0.0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.mosaic_rate = mosaic_rate

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        # torch types the sampler's dataset as Dataset, which declares no __len__
        order = torch.randperm(len(cast(Sized, self.dataset)), generator=generator).tolist()
        order += order[: self.total_size - len(order)]  # padded as DistributedSampler pads
        mosaic = (torch.rand(len(order), generator=generator) < self.mosaic_rate).tolist()
        positions = range(self.rank, self.total_size, self.num_replicas)
        # The position in the epoch seeds the mosaic's draws: the same in any number of processes.
        return iter([(order[position], position if mosaic[position] else -1, self.epoch) for position in positions])


class TrainingData(Dataset):
    """A datamodule's labelled images for training: items as the datamodule gives them, or mosaics of four.
    Indexed by :class:`TrainingSampler`'s ``(index, mosaic position, epoch)``."""

    def __init__(self, dataset: Any, seed: int):
        self.dataset = dataset
        self.seed = seed
        # The authors draw a defect type (the image's folder), then an image of it, per category.
        groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for index, sample in enumerate(dataset.samples):
            groups[sample.category][str(PurePosixPath(sample.key).parent)].append(index)
        self.groups = {category: list(folders.values()) for category, folders in groups.items()}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, plan: tuple[int, int, int]) -> dict[str, Any]:
        index, position, epoch = plan
        item = self.dataset[index]
        if position < 0:
            return item
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + position)
        folders = self.groups[self.dataset.samples[index].category]
        parts = []
        for _ in range(4):
            folder = folders[int(torch.randint(len(folders), (1,), generator=generator))]
            parts.append(self.dataset[folder[int(torch.randint(len(folder), (1,), generator=generator))]])
        mask = _mosaic([part["mask"][None] for part in parts])[0] > 0.5
        return {
            **item,
            "image": _mosaic([part["image"] for part in parts]),
            "mask": mask.to(item["mask"].dtype),
            "region_sizes": torch.from_numpy(region_size_map(mask.numpy())),
            "label": torch.tensor(int(any(part["label"] == 1 for part in parts))),
            "has_mask": torch.tensor(True),
            "image_path": f"mosaic of {', '.join(p['image_path'] for p in parts)}",
        }


def _mosaic(tiles: list[torch.Tensor]) -> torch.Tensor:
    """Four C×S×S tensors as one 2×2 mosaic resized to C×S×S (antialiased bilinear), in the tiles' dtype."""
    grid = torch.cat([torch.cat(tiles[:2], dim=-1), torch.cat(tiles[2:], dim=-1)], dim=-2).float()
    resized = F.interpolate(grid[None], size=tiles[0].shape[-2:], mode="bilinear", antialias=True)[0]
    return resized.round().to(tiles[0].dtype) if not tiles[0].is_floating_point() else resized.to(tiles[0].dtype)


class TrainingRun(Callback):
    """Epoch time to the loggers, and a stop request (SIGTERM/SIGINT) honoured at the next batch boundary: a
    checkpoint of that consistent state is saved, then the run stops."""

    def __init__(self) -> None:
        self.checkpoint_path: str | None = None
        self._started = 0.0
        self._sigterm_handler: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._sigterm_handler = signal.getsignal(signal.SIGTERM)  # anovl's (cli), before Lightning adds its own

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Under DDP, Lightning's SIGTERM handler broadcasts from inside the handler, at whatever point each
        # process is, which can pair with another collective and hang the processes. anovl's handler only sets
        # the stop request, and the processes decide together at the batch's end (on_train_batch_end).
        if trainer.world_size > 1 and callable(self._sigterm_handler):
            signal.signal(signal.SIGTERM, self._sigterm_handler)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.log("train/epoch_time_s", time.perf_counter() - self._started, on_epoch=True, on_step=False)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        stop = signals.stop_requested.is_set()
        if trainer.world_size > 1:  # one process's request stops all at this same batch
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._save(trainer)
            raise KeyboardInterrupt("stop requested")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # A stop request that Lightning saw first (its own SIGTERM check at an epoch's end) also stops at a loop
        # boundary, so that state is consistent too.
        if signals.stop_requested.is_set() and self.checkpoint_path is None and isinstance(exception, SIGTERMException):
            self._save(trainer)

    def _save(self, trainer: Trainer) -> None:
        self.checkpoint_path = str(interrupted_checkpoint(trainer))
        trainer.save_checkpoint(self.checkpoint_path)


def interrupted_checkpoint(trainer: Trainer) -> Path:
    return run_directory(trainer) / "checkpoints" / "interrupted.ckpt"


def learning_rate(trainer: Trainer) -> float:
    return trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
