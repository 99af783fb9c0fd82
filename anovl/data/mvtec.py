"""MVTec AD layout (also MPDD, BTAD and any folder arranged the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anovl.data.datamodule import AnomalyDataModule
from anovl.data.dataset import Sample
from anovl.data.image_io import has_image_extension
from anovl.data.listing import (
    category_selection,
    find_mask,
    index_by_stem,
    require_dir,
    warn_skipped_files,
    warn_unused_images,
)
from anovl.data.paths import walk_files
from anovl.errors import AnovlError

MVTEC_LAYOUT = (
    "<root>/<category>/test/<good|defect>/*.png with masks in <root>/<category>/ground_truth/<defect>/<name>_mask.png"
)

# Folder names of defect-free test images: MVTec and MPDD use "good", BTAD uses "ok".
NORMAL_FOLDERS = frozenset({"good", "ok"})


class MVTecDataModule(AnomalyDataModule):
    """Test set of an MVTec-AD-like dataset.

    Layout: ``<root>/<category>/test/<good|defect>/<name>.<ext>`` (png, jpg, jpeg, bmp, tif, tiff, any case;
    ``ok`` counts as ``good``) with masks ``<root>/<category>/ground_truth/<defect>/<name>_mask.<ext>`` or
    ``.../<name>.<ext>``. Normal images get all-zero masks. An anomalous image without a mask is an error, or
    with ``on_bad_image='skip'`` a warning and the image kept for image metrics only (``has_mask`` False).
    Images elsewhere below ``test/`` (directly in it, or in deeper folders) are named in an
    :class:`~anovl.data.listing.UnusedFilesWarning`, and so are files below it that are not supported images
    (a .gif, notes). Symlinks: see :mod:`anovl.data.paths`.

    Args:
        root: dataset root.
        categories: category folders to use; None: every folder of ``root`` that has a ``test`` folder.
        Others: see :class:`~anovl.data.datamodule.AnomalyDataModule`.
    """

    def __init__(
        self,
        root: str | Path,
        categories: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.requested_categories = category_selection(categories)

    def locations(self) -> dict[str, Path | None]:
        return {"root": self.root}

    def _discover(self) -> list[Sample]:
        root = require_dir(self.root, "Dataset root", MVTEC_LAYOUT)
        found = sorted(
            path.name for path in root.iterdir() if not path.name.startswith(".") and (path / "test").is_dir()
        )
        if not found and (root / "test").is_dir():
            raise AnovlError(
                f"{root} looks like a single category; pass root={root.parent} and categories=[{root.name!r}]"
            )
        if not found:
            raise AnovlError(f"No category folders with a test/ folder in {root}; expected {MVTEC_LAYOUT}")
        missing = [category for category in self.requested_categories or [] if category not in found]
        if missing:
            raise AnovlError(
                f"Categories {missing} not found in {root} (no <category>/test folder); found: {', '.join(found)}"
            )
        return [
            sample
            for category in self.requested_categories or found
            for sample in self._category_samples(root, category)
        ]

    def _category_samples(self, root: Path, category: str) -> list[Sample]:
        test_dir = root / category / "test"
        found = [path for path in walk_files(test_dir, root, self.allow_outside_root) if has_image_extension(path)]
        images = [path for path in found if path.parent.parent == test_dir]
        warn_unused_images(
            [path for path in found if path.parent.parent != test_dir],
            f"images in {test_dir}/<good|defect>/, one folder deep",
        )
        warn_skipped_files(test_dir)
        if not images:
            raise AnovlError(
                f"No test images in {test_dir}; expected {test_dir}/good/*.png and {test_dir}/<defect>/*.png"
            )
        prompt_name = self.prompt_name_for(category)
        mask_indexes: dict[str, dict[str, list[Path]]] = {}
        samples = []
        for path in images:
            folder = path.parent.name
            key = path.relative_to(root).as_posix()
            if folder.lower() in NORMAL_FOLDERS:
                samples.append(Sample(path, key, category, prompt_name, label=0, has_mask=True))
                continue
            mask_dir = root / category / "ground_truth" / folder
            if folder not in mask_indexes:
                mask_indexes[folder] = index_by_stem(mask_dir, root, self.allow_outside_root)
            mask_path = find_mask(mask_indexes[folder], path)
            if mask_path is None:
                self._report_missing_mask(path, f"{mask_dir}/{path.stem}_mask.png or {path.stem}.png")
            samples.append(
                Sample(path, key, category, prompt_name, label=1, has_mask=mask_path is not None, mask_path=mask_path)
            )
        return samples
