"""Keeping dataset discovery inside the dataset root.

Paths come from folder listings and split files of downloaded datasets, so they are untrusted. The rule,
the same for every datamodule: symlinks (to files or folders) are followed when they resolve inside the
dataset root, and refused with a clear error when they resolve outside it, unless the user passes
``allow_outside_root=True`` (trusted data assembled from several places). A walk never visits a folder twice,
so a symlink loop ends. Listing errors (permissions, vanished folders) are one clear error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from anovl.errors import AnovlError

ALLOW_HINT = "if the data is trusted, pass allow_outside_root=True (data.init_args.allow_outside_root: true)"


def check_inside(path: Path, root: Path, allow_outside_root: bool, what: str) -> Path:
    """``path`` unchanged if it resolves inside ``root`` (or outside is allowed); else an AnovlError."""
    if allow_outside_root:
        return path
    try:
        target = path.resolve()
        inside = target.is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte, a name too long
        raise AnovlError(f"Cannot resolve {what} {path} ({type(error).__name__}: {error}); fix or remove it") from None
    if not inside:
        raise AnovlError(
            f"{what} {path} resolves to {target}, outside the dataset root {root.resolve()}; "
            f"remove the link or the entry, or {ALLOW_HINT}"
        )
    return path


def relative_entry(root: Path, entry: str, allow_outside_root: bool, where: str) -> Path:
    """A path written in a split file, as a path below ``root``; absolute paths and ``..`` are refused unless
    allowed, and so are paths that resolve outside the root through a symlink."""
    if "\x00" in entry:
        raise AnovlError(f"{where}: the path {entry!r} contains a NUL character; fix the split file")
    relative = Path(entry)
    if not allow_outside_root and (relative.is_absolute() or ".." in relative.parts):
        raise AnovlError(
            f"{where}: the path {entry!r} points outside the dataset root {root} "
            f"(absolute or with '..'); give paths relative to the root, or {ALLOW_HINT}"
        )
    return check_inside(root / relative, root, allow_outside_root, f"{where}: path")


def walk_files(directory: Path, root: Path, allow_outside_root: bool) -> Iterator[Path]:
    """Every file below ``directory`` (recursively, hidden entries skipped), in sorted order per folder.

    Symlinks are followed under the rule of this module; ``directory`` itself is checked too, since a link
    at the top (``ground_truth/<defect>`` -> ``/``) would otherwise walk the whole filesystem.
    """
    check_inside(directory, root, allow_outside_root, "Folder")
    visited: set[Path] = set()
    pending = [directory]
    while pending:
        folder = pending.pop()
        real = folder.resolve()
        if real in visited:
            continue
        visited.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            raise AnovlError(
                f"Cannot list folder {folder} ({error.strerror or type(error).__name__}); "
                "check that it exists and is readable"
            ) from None
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                check_inside(path, root, allow_outside_root, "Symlink")
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(path)
            else:
                yield path
        pending.extend(reversed(subfolders))
