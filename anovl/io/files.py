"""Every file anovl writes goes through here: whole files or none, never through a link.

* A file is written to a temporary file in its own folder, flushed to disk (fsync), then renamed over the
  old one, so readers see the old file or the new one, never a part. :func:`replace_together` does this for a
  group (an export, its ``.bin`` and its sidecar): the old files are kept aside until every new one is in
  place, and put back if any step fails.
* Nothing is written through a symbolic link inside a run or output folder (``root``): a link planted in a
  downloaded run folder (``hparams.yaml`` -> ``~/.bashrc``, ``pictures`` -> elsewhere) is refused in one line.
  Temporary files are opened with ``O_EXCL | O_NOFOLLOW``; the rename replaces a directory entry, never what a
  link points to.
* A failed write (``ENOSPC``, ``EFBIG`` under a file-size limit, ``EROFS``, ``EACCES``, or a writer's own
  error such as a C++ exception of an exporter) is one :class:`~anovl.errors.AnovlError` naming the path; no
  temporary or partial file stays, and the earlier files are unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from anovl.errors import AnovlError

Writer = Callable[[Path], None]  # writes one file at the path it is given (a temporary name with the same suffix)

_ADVICE = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free disk space",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
    errno.EROFS: "choose a writable folder",
    errno.EACCES: "choose a folder you may write to",
    errno.EPERM: "choose a folder you may write to",
}


def write_error(path: Path | str, error: BaseException, kept: str = "earlier files are unchanged") -> AnovlError:
    """One line for a failed write of ``path``, saying why and that nothing was half-written."""
    if isinstance(error, OSError):
        reason = error.strerror or os.strerror(error.errno or 0) or type(error).__name__
        reason += f" ({_ADVICE[error.errno]})" if error.errno in _ADVICE else ""
    else:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        reason = f"{type(error).__name__}: {lines[0][:200] if lines else 'no details'}"
    return AnovlError(f"cannot write {path}: {reason}; no partial file was left, {kept}")


def refuse_links(path: Path, root: Path | str | None = None) -> None:
    """Refuse ``path`` if it, or a folder between ``root`` and it, is a symbolic link (``root`` itself, chosen by
    the user, may be one). Without ``root`` only ``path`` itself is checked."""
    path = Path(path)
    checked = [path]
    if root is not None:
        root = Path(root)
        try:
            relative = path.relative_to(root)
        except ValueError:
            relative = None
        if relative is not None:
            checked += [root.joinpath(*relative.parts[:depth]) for depth in range(1, len(relative.parts))]
    for candidate in checked:
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except OSError:
            continue  # does not exist (yet): nothing to follow
        if is_link:
            raise AnovlError(
                f"refusing to write {path}: {candidate} is a symbolic link (anovl never writes through "
                "links in a run or output folder); remove the link or choose another folder"
            )


def make_folder(folder: Path | str, root: Path | str | None = None) -> Path:
    """Create ``folder`` (and its parents) for writing, refusing links below ``root``; one line on failure."""
    folder = Path(folder)
    refuse_links(folder, root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise AnovlError(f"cannot create the folder {folder}: a file of that name is in the way") from None
    except OSError as error:
        raise write_error(folder, error) from None
    return folder


def _temporary(path: Path) -> Path:
    # Same folder (so the rename is atomic), same suffix (writers such as Pillow pick the format by it).
    return path.with_name(f".{path.stem[:80]}.{secrets.token_hex(4)}.tmp{path.suffix}")


def _write_bytes(temporary: Path, data: bytes) -> None:
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        _write_all(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # a short write is followed by one that fails (a full disk) or finishes
        view = view[os.write(descriptor, view) :]


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_together(files: Mapping[Path, Writer | bytes | str], root: Path | str | None = None) -> None:
    """Write a group of files so that they replace the old ones together, or not at all.

    ``files`` maps each path to its content (text, bytes) or to a writer that writes it at a given path.
    Every file is written (and fsynced) under a temporary name first; then each old file gets a backup (a hard
    link, so the name never goes missing for readers), the new ones are renamed over the old ones, and the
    backups removed. A failure at any step restores the old files and removes the new ones.
    """
    paths = [Path(path) for path in files]
    for path in paths:
        refuse_links(path, root)
    staged: dict[Path, Path] = {}
    aside: dict[Path, Path] = {}
    placed: list[Path] = []  # new files already renamed in
    current = paths[0] if paths else Path(".")
    try:
        for path, content in zip(paths, files.values()):
            current = path
            staged[path] = temporary = _temporary(path)
            if callable(content):
                content(temporary)
                if not temporary.is_file() or temporary.is_symlink():
                    raise OSError(errno.EIO, "the writer wrote no file")
                _fsync(temporary)
            else:
                _write_bytes(temporary, content.encode("utf-8") if isinstance(content, str) else content)
        for path in paths:
            current = path
            if os.path.lexists(path):
                if Path(path).is_dir() and not Path(path).is_symlink():
                    raise AnovlError(f"cannot write {path}: a folder of that name is in the way")
                backup = _temporary(path).with_name(_temporary(path).name + ".old")
                try:
                    os.link(path, backup, follow_symlinks=False)
                except OSError:  # a file system without hard links
                    shutil.copy2(path, backup, follow_symlinks=False)
                aside[path] = backup
        for path in paths:
            current = path
            os.replace(staged[path], path)
            del staged[path]
            placed.append(path)
    except AnovlError:
        _restore(aside, staged, placed)
        raise
    except Exception as error:  # noqa: BLE001 - an exporter's C++ error is as much a failed write as an OSError
        _restore(aside, staged, placed)
        raise write_error(current, error) from None
    for old in aside.values():
        Path(old).unlink(missing_ok=True)


def _restore(aside: dict[Path, Path], staged: dict[Path, Path], placed: Sequence[Path]) -> None:
    """Undo a group write: temporary files removed, new files that got in taken out, old files put back (an old
    file that was not replaced yet is still in place: only its backup goes)."""
    for temporary in staged.values():
        with contextlib.suppress(OSError):  # best effort: the first error is the one to report
            Path(temporary).unlink(missing_ok=True)
    for path in placed:
        with contextlib.suppress(OSError):
            if path in aside:
                os.replace(aside[path], path)
            else:  # a new file where there was none
                os.unlink(path)
    for backup in aside.values():
        with contextlib.suppress(OSError):
            Path(backup).unlink(missing_ok=True)


def write_file(path: Path | str, content: Writer | bytes | str, root: Path | str | None = None) -> Path:
    """Write one file atomically (see :func:`replace_together`); ``content`` is text, bytes or a writer."""
    path = Path(path)
    replace_together({path: content}, root)
    return path


def write_texts(files: Mapping[Path, str], root: Path | str | None = None) -> None:
    """Write text files (UTF-8) that replace the old ones together (the results files of a run)."""
    replace_together(dict(files), root)


def create_new(path: Path | str, content: Writer | bytes | str, root: Path | str | None = None) -> bool:
    """Write ``path`` only if nothing is there yet (a user's own file is never replaced); False if something is."""
    path = Path(path)
    if os.path.lexists(path):
        return False
    write_file(path, content, root)
    return True


def append_text(path: Path | str, text: str, root: Path | str | None = None) -> None:
    """Append whole rows to a file this run created (scores.csv): written and fsynced, or cut back to where it
    was, so a failure leaves no half row. Undecodable bytes of file names (surrogate escapes) are written back
    as the bytes they stand for."""
    path = Path(path)
    refuse_links(path, root)
    data = text.encode("utf-8", "surrogateescape")
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))
    except OSError as error:
        raise write_error(path, error) from None
    try:
        size = os.fstat(descriptor).st_size
        try:
            _write_all(descriptor, data)
            os.fsync(descriptor)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(descriptor, size)
            raise write_error(path, error, "the rows written before are kept") from None
    finally:
        os.close(descriptor)
