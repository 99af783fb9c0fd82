"""Picture selection of ``anovl test``: which images of a category get a panel (:class:`CategoryPicks`)."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """One test image kept for a panel, on the CPU."""

    image_path: str
    key: str  # the sample's key: the "sample" roles rank by it
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


class CategoryPicks:
    """Bounded candidates of one category: for each role the ``count`` best images so far (min-heaps of
    ``(rank key, image path)``), so memory is at most ``len(PICK_ROLES) · count`` images per category."""

    def __init__(self, count: int):
        self.count = count
        self.heaps: list[list[tuple[tuple, int, Candidate]]] = [[] for _ in PICK_ROLES]
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

    def candidates(self) -> list[Candidate]:
        """The distinct images kept for any role: what the process that chooses needs from this one (under DDP,
        the union of every process's candidates holds the best ``count`` of each role over all images)."""
        return list({entry[2].image_path: entry[2] for heap in self.heaps for entry in heap}.values())

    def add(self, candidate: Candidate) -> None:
        """Offer a candidate another process kept."""
        self.offer(candidate.image_path, candidate.key, candidate.label, candidate.score, lambda: candidate)

    def choose(self) -> list[tuple[str, Candidate]]:
        """Up to ``count`` distinct images: the roles take turns, each its best image not yet taken."""
        queues = [sorted(heap, key=lambda entry: entry[0], reverse=True) for heap in self.heaps]
        chosen: list[tuple[str, Candidate]] = []
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
