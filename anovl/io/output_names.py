"""Output file names: every path component that comes from the data (category folders, image stems) is built
by :func:`output_component` (:func:`~anovl.io.safe_names.safe_component`), and the stems of one category are
made unique by :class:`OutputNames`."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from anovl.errors import AnovlError
from anovl.io.safe_names import safe_component


def output_component(name: str) -> str:
    """The one gate for path components built from data (category names, file stems): any name becomes one
    component that cannot leave its folder (docs/SECURITY.md), readable and unchanged for ordinary names."""
    return safe_component(name)


def output_stem(image_path: str, category: str) -> str:
    """A readable file-name stem for an image's outputs: ``<parent folder>_<stem>`` (MVTec's
    ``test/<defect>/000.png`` -> ``<defect>_000``), or ``<stem>`` when the parent folder is the category."""
    path = Path(image_path)
    return output_component(path.stem if path.parent.name == category else f"{path.parent.name}_{path.stem}")


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]


class OutputNames:
    """Unique output stems per category folder, decided from the whole list of images, so the name of an
    image does not depend on the order in which images come (nor on the process under DDP).

    Stems that would clash, compared case-insensitively as on macOS and Windows (``img.png``, ``img.jpg``,
    ``img.JPG``, or the same name in two folders), get the extension and a hash of the image's key added:
    ``img_png_<hash>``. An image that is not in the list (a data source without a listing) always gets the
    hash, so it can never take another image's name.

    Args:
        images: ``(image_path, key, category)`` of every image; ``key`` (the path relative to the dataset
            root) makes the hashes the same wherever the dataset lives.
    """

    def __init__(self, images: Iterable[tuple[str, str, str]] = ()):
        groups: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        for image_path, key, category in images:
            groups[(category, output_stem(image_path, category).casefold())].append((image_path, key))
        self._stems: dict[tuple[str, str], str] = {}
        for (category, _), members in groups.items():
            for image_path, key in dict.fromkeys(members):
                stem = output_stem(image_path, category)
                unique = len(set(members)) == 1
                self._stems[(category, image_path)] = stem if unique else _disambiguated(stem, image_path, key)
        taken: dict[tuple[str, str], str] = {}
        for (category, image_path), stem in self._stems.items():
            other = taken.setdefault((category, stem.casefold()), image_path)
            if other != image_path:  # a hash collision: practically never, but never overwrite
                raise AnovlError(f"{other} and {image_path} would both write outputs named {stem!r}; rename one")

    def stem(self, image_path: str, category: str) -> str:
        known = self._stems.get((category, image_path))
        return known if known is not None else _disambiguated(output_stem(image_path, category), image_path, image_path)

    @staticmethod
    def folder(category: str) -> str:
        return output_component(category)


def _disambiguated(stem: str, image_path: str, key: str) -> str:
    extension = Path(image_path).suffix.lstrip(".").lower()
    return output_component(f"{stem}_{extension}_{_short_hash(key)}" if extension else f"{stem}_{_short_hash(key)}")
