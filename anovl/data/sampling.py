"""Batching: category-pure batches of consecutive samples, and their collation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import BatchSampler, Sampler, default_collate

from anovl.errors import AnovlError


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
