"""Helpers of the datamodules' file listing (``_discover``): mask lookup, unused and repeated files, selections."""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path

from anovl.data.dataset import Sample
from anovl.data.image_io import IMAGE_EXTENSIONS, has_image_extension
from anovl.data.paths import walk_files
from anovl.errors import AnovlError
from anovl.io.text import terminal


class UnusedFilesWarning(UserWarning):
    """Image files in a dataset folder that its layout does not use (they are named, never dropped silently)."""


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
        warnings.warn(
            f"{len(paths)} image files are not part of the layout ({layout}) and are not used: {shown}",
            UnusedFilesWarning,
            stacklevel=3,
        )


def warn_skipped_files(folder: Path, recursive: bool = True, listed: Collection[Path] = ()) -> None:
    """The visible files in ``folder`` (and below it, if ``recursive``) that are not supported images (a .gif, a
    .webp, notes) are named, every one, in a warning: no layout drops data silently. ``listed`` files (a split
    file names them) are used whatever their extension, so they are not named."""
    skipped = []
    for directory, folders, files in os.walk(folder):  # links to folders are not followed
        folders[:] = [name for name in folders if not name.startswith(".")] if recursive else []
        skipped += [
            Path(directory, name)
            for name in files
            if not name.startswith(".") and not has_image_extension(Path(name)) and Path(directory, name) not in listed
        ]
    skipped.sort()
    if skipped:
        warnings.warn(
            f"{len(skipped)} files in {terminal(folder)} are not supported images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) and are skipped: "
            f"{', '.join(terminal(path.relative_to(folder)) for path in skipped)}",
            UnusedFilesWarning,
            stacklevel=3,
        )


def refuse_repeated_files(samples: Sequence[Sample]) -> None:
    """One image file listed twice (through a symlink, or two names of one file) would count twice."""
    entries: dict[Path, list[str]] = defaultdict(list)
    for sample in samples:
        entries[Path(os.path.realpath(sample.image_path))].append(sample.key)  # realpath: no error on a loop
    repeated = {path: keys for path, keys in entries.items() if len(keys) > 1}
    if repeated:
        path, keys = next(iter(repeated.items()))
        raise AnovlError(
            f"{len(repeated)} image files are listed more than once, e.g. {path} as {', '.join(keys)}; "
            "remove the duplicate links or entries so that no image counts twice"
        )


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
