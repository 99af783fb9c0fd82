"""An optional on-disk cache of decoded images and masks, at the model's resolution.

A grid runs several variants over the same images; with this cache only the first decodes PNGs. An entry is
what the loader would compute (``uint8 H×W×3`` resized image, or ``H×W`` resized mask as 0/1) plus the size of
the file it came from, keyed by a SHA-256 of the file's content and every setting of the preprocessing, so a
changed file or setting is a miss, never a stale hit. Entries are read memory-mapped.

The folder is ``$ANOVL_CACHE_DIR/decoded`` (default ``~/.cache/anovl/decoded``). Writes are atomic (a
temporary file renamed into place), so loader workers and parallel runs may share it. When a datamodule is
set up the folder is pruned to its size limit, least recently used entries first (a run then adds at most
its own images). A damaged entry is a miss and is rewritten.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from anovl.cache import cache_root

MAGIC = b"ANOVLDC1"
_HEADER = np.dtype([("magic", "S8"), ("source_hw", "<u4", 2), ("shape", "<u4", 3)])
ENTRY_SUFFIX = ".u8"


class DecodedCache:
    """Decoded arrays by key (see :meth:`key`), in ``directory``, pruned to ``max_bytes``.

    ``hits`` and ``misses`` count this process's look-ups (each loader worker has its own).
    """

    def __init__(self, max_bytes: int, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else cache_root() / "decoded"
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(path: Path, *settings: object) -> str | None:
        """SHA-256 of the file's content and the settings; None if the file cannot be read (the loader then
        reports the problem as usual)."""
        digest = hashlib.sha256(repr(settings).encode())
        try:
            with open(path, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        except OSError:
            return None
        return digest.hexdigest()

    def get(self, key: str) -> tuple[np.ndarray, tuple[int, int]] | None:
        """(array, source height and width) of an entry, or None."""
        path = self.directory / f"{key}{ENTRY_SUFFIX}"
        try:
            header = np.fromfile(path, dtype=_HEADER, count=1)
            shape = tuple(int(side) for side in header["shape"][0]) if header.size else ()
            if not header.size or header["magic"][0] != MAGIC or path.stat().st_size != _HEADER.itemsize + int(np.prod(shape)):
                self.misses += 1
                return None
            array = np.array(np.memmap(path, dtype=np.uint8, mode="r", offset=_HEADER.itemsize, shape=shape))
            os.utime(path)  # the last use orders pruning
        except OSError:
            self.misses += 1
            return None
        self.hits += 1
        height, width = (int(side) for side in header["source_hw"][0])
        return (array[..., 0] if shape[2] == 1 else array), (height, width)

    def put(self, key: str, array: np.ndarray, source_hw: tuple[int, int]) -> None:
        """Store ``uint8`` ``H×W`` or ``H×W×C`` data; a failed write (a full disk) only loses the entry."""
        data = np.ascontiguousarray(array, dtype=np.uint8)
        data = data[..., None] if data.ndim == 2 else data
        header = np.array([(MAGIC, source_hw, data.shape)], dtype=_HEADER)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(header.tobytes())
                    file.write(data.tobytes())
                os.replace(temporary, self.directory / f"{key}{ENTRY_SUFFIX}")
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError:
            pass

    def prune(self) -> None:
        """Delete least recently used entries until the folder holds at most ``max_bytes``."""
        try:
            entries = [(entry.stat().st_mtime_ns, entry.stat().st_size, Path(entry.path))
                       for entry in os.scandir(self.directory)
                       if entry.name.endswith(ENTRY_SUFFIX) and entry.is_file(follow_symlinks=False)]
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
