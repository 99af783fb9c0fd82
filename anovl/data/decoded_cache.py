"""An optional on-disk cache of decoded images and masks, at the model's resolution.

A grid runs several variants over the same images; with this cache only the first decodes PNGs. An entry is
what the loader would compute (``uint8 H×W×3`` resized image, or ``H×W`` resized mask as 0/1) plus the size of
the file it came from, keyed by a SHA-256 of the file's content and every setting of the preprocessing, so a
changed file or setting is a miss, never a stale hit. Entries are read memory-mapped. A file's digest is
remembered under its status (inode, size, modification and change times), so a second run does not read
the files it hits, only their status.

The folder is ``$ANOVL_CACHE_DIR/decoded`` (default ``~/.cache/anovl/decoded``). Writes go through
:mod:`anovl.io` (a temporary file renamed into place, never through a link), so loader workers and parallel
runs may share it. When a datamodule is
set up the folder is pruned to its size limit, least recently used entries (and digests) first (a run then adds at most
its own images). A damaged entry is a miss and is rewritten.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from anovl.cache import cache_root
from anovl.errors import AnovlError
from anovl.io import write_file

MAGIC = b"ANOVLDC1"
_HEADER = np.dtype([("magic", "S8"), ("source_hw", "<u4", 2), ("shape", "<u4", 3)])
ENTRY_SUFFIX = ".u8"
MEMO_SUFFIX = ".sha256"  # a file's content digest, named after its status (see DecodedCache._content_digest)


class DecodedCache:
    """Decoded arrays by key (see :meth:`key`), in ``directory``, pruned to ``max_bytes``.

    ``hits`` and ``misses`` count this process's look-ups (each loader worker has its own).
    """

    def __init__(self, max_bytes: int, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else cache_root() / "decoded"
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.write_failed = False

    def key(self, path: Path, *settings: object) -> str | None:
        """SHA-256 of the file's content and the settings; None if the file cannot be read (the loader then
        reports the problem as usual)."""
        content = self._content_digest(path)
        if content is None:
            return None
        return hashlib.sha256(repr(settings).encode() + bytes.fromhex(content)).hexdigest()

    def _content_digest(self, path: Path) -> str | None:
        """SHA-256 of a file's content, remembered under its status (device, inode, size, modification and
        change times in ns): an unchanged file is not read again. Any write changes the change time, which
        no user call can set back, so a stale digest is never used."""
        try:
            status = os.stat(path)
            signature = (
                os.path.realpath(path),
                status.st_dev,
                status.st_ino,
                status.st_size,
                status.st_mtime_ns,
                status.st_ctime_ns,
            )
        except (OSError, ValueError):
            return None
        memo = self.directory / f"{hashlib.sha256(repr(signature).encode()).hexdigest()}{MEMO_SUFFIX}"
        try:
            remembered = memo.read_text(encoding="ascii")
            if len(remembered) == 64 and all(character in "0123456789abcdef" for character in remembered):
                return remembered
        except (OSError, UnicodeDecodeError):
            pass
        try:
            hasher = hashlib.sha256()  # hashlib.file_digest needs Python 3.11; anovl supports 3.10
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(chunk)
            digest = hasher.hexdigest()
        except OSError:
            return None
        self._write(memo, digest.encode("ascii"))
        return digest

    def get(self, key: str) -> tuple[np.ndarray, tuple[int, int]] | None:
        """(array, source height and width) of an entry, or None."""
        path = self.directory / f"{key}{ENTRY_SUFFIX}"
        try:
            header = np.fromfile(path, dtype=_HEADER, count=1)
            shape = tuple(int(side) for side in header["shape"][0]) if header.size else ()
            if (
                not header.size
                or header["magic"][0] != MAGIC
                or path.stat().st_size != _HEADER.itemsize + int(np.prod(shape))
            ):
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
        self._write(self.directory / f"{key}{ENTRY_SUFFIX}", header.tobytes() + data.tobytes())

    def _write(self, path: Path, content: bytes) -> None:
        """Write through anovl.io (atomic, never through a link); a failed write (a full disk, a planted link)
        loses only this entry, and the first one per process is named in a warning."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # the user's own folder: it may be a link
            write_file(path, content, self.directory)
        except (OSError, AnovlError) as error:
            if not self.write_failed:
                self.write_failed = True
                warnings.warn(f"decoded cache: {error}; images are decoded without it", stacklevel=3)

    def prune(self) -> None:
        """Delete least recently used entries until the folder holds at most ``max_bytes``."""
        try:
            entries = [
                (entry.stat().st_mtime_ns, entry.stat().st_size, Path(entry.path))
                for entry in os.scandir(self.directory)
                if entry.name.endswith((ENTRY_SUFFIX, MEMO_SUFFIX))
                and not entry.name.startswith(".")  # another process's temporary file
                and entry.is_file(follow_symlinks=False)
            ]
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
