"""Plain folders of images: unlabelled (for ``predict``), or labelled by subfolder (also anomalib's Folder layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anovl.data.datamodule import AnomalyDataModule
from anovl.data.dataset import Sample
from anovl.data.image_io import IMAGE_EXTENSIONS, has_image_extension, is_image_file
from anovl.data.listing import find_mask, index_by_stem, require_dir, warn_skipped_files, warn_unused_images
from anovl.data.paths import check_inside, walk_files
from anovl.errors import AnovlError

NORMAL_FOLDERS = frozenset({"good", "ok", "normal"})
ANOMALOUS_FOLDERS = frozenset({"bad", "ng", "anomaly"})
MASK_FOLDERS = frozenset({"ground_truth", "mask", "masks"})
FOLDER_LAYOUT = (
    "images directly in the folder (unlabelled), or a good/ folder (also ok/, normal/) beside bad/ (ng/, anomaly/) "
    "or defect-named folders, with masks in ground_truth/ (or mask/, masks/), optionally one subfolder per defect"
)


class FolderDataModule(AnomalyDataModule):
    """Images from a folder (or a single image file).

    * Flat folder (or one file): the images directly in it, label -1 (unknown).
    * Labelled (a subfolder ``good``, ``ok``, ``normal``, ``bad``, ``ng`` or ``anomaly`` exists, any case):
      the normal folders give label 0; ``bad``/``ng``/``anomaly`` and every other subfolder give label 1, each
      other subfolder being a defect type (anomalib's Folder layout: ``good/`` beside ``crack/``, ``scratch/``).
      Images are searched recursively below each.

    Masks: ``mask_dir``, or else a ``ground_truth``/``mask``/``masks`` subfolder. The mask of an image in the
    top folder ``D`` is looked up below ``<mask_dir>/D`` when that folder exists (so file names may repeat across
    defects), else anywhere below ``mask_dir``, by stem: ``<stem>_mask.<ext>`` or ``<stem>.<ext>``. Normal
    images get all-zero masks; an anomalous image without one is an error (skip mode: kept for image
    metrics only). Without masks no image has pixel ground truth (``has_mask`` False).

    Images the layout does not use (subfolders of a flat folder) are named in a warning. Symlinks: see
    :mod:`anovl.data.paths` (an explicit ``mask_dir`` is its own root).

    Args:
        path: folder (or image file).
        mask_dir: folder of masks, or None (look for a mask subfolder).
        prompt_name: object name put into the prompts.
        Others: see :class:`~anovl.data.datamodule.AnomalyDataModule`. The category of every image is the folder's
        name (for a single file: its parent folder's name).
    """

    def __init__(
        self,
        path: str | Path,
        mask_dir: str | Path | None = None,
        prompt_name: str = "object",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.path = Path(path).expanduser()
        self.mask_dir = Path(mask_dir).expanduser() if mask_dir is not None else None
        self.prompt_name = prompt_name

    def default_prompt_name(self, category: str) -> str:
        return self.prompt_name

    def locations(self) -> dict[str, Path | None]:
        return {"path": self.path, "mask_dir": self._masks()}

    def _masks(self) -> Path | None:
        """The mask folder: the one given, or a mask subfolder of the image folder."""
        if self.mask_dir is not None or not self.path.is_dir():
            return self.mask_dir
        found = sorted(child for child in self.path.iterdir() if child.is_dir() and child.name.lower() in MASK_FOLDERS)
        if len(found) > 1:
            raise AnovlError(
                f"{self.path} has several mask folders ({', '.join(p.name for p in found)}); keep one, "
                "or choose with mask_dir"
            )
        return found[0] if found else None

    def _discover(self) -> list[Sample]:
        if self.path.is_file():
            if not is_image_file(self.path):
                raise AnovlError(
                    f"{self.path} is not a supported image file ({', '.join(sorted(IMAGE_EXTENSIONS))}); give an image or a folder"
                )
            base, labelled_images = self.path.parent, [(self.path, -1)]
        else:
            base = require_dir(self.path, "Image folder", FOLDER_LAYOUT)
            labelled_images = self._find_images(base)
        mask_dir = self._masks()
        if mask_dir is not None:
            require_dir(mask_dir, "Mask folder", "a folder of masks")
        mask_root = base if mask_dir is None or mask_dir.parent == base else mask_dir
        mask_indexes: dict[Path, dict[str, list[Path]]] = {}
        category = base.resolve().name
        prompt_name = self.prompt_name_for(category)
        samples = []
        for image_path, label in labelled_images:
            mask_path = None
            if mask_dir is not None and label != 0:  # normal images have all-zero masks
                top = image_path.relative_to(base).parts[0]
                folder = mask_dir / top if (mask_dir / top).is_dir() else mask_dir
                if folder not in mask_indexes:
                    mask_indexes[folder] = index_by_stem(folder, mask_root, self.allow_outside_root)
                mask_path = find_mask(mask_indexes[folder], image_path)
                if label == 1 and mask_path is None:
                    self._report_missing_mask(
                        image_path, f"{image_path.stem}_mask.png or {image_path.stem}.png below {folder}"
                    )
            has_mask = mask_path is not None or (mask_dir is not None and label == 0)
            key = image_path.relative_to(base).as_posix()
            samples.append(Sample(image_path, key, category, prompt_name, label, has_mask, mask_path))
        return samples

    def _find_images(self, folder: Path) -> list[tuple[Path, int]]:
        subfolders = sorted(
            child
            for child in folder.iterdir()
            if child.is_dir() and not child.name.startswith(".") and child.name.lower() not in MASK_FOLDERS
        )
        labels = {child: 0 if child.name.lower() in NORMAL_FOLDERS else 1 for child in subfolders}
        labelled = any(child.name.lower() in NORMAL_FOLDERS | ANOMALOUS_FOLDERS for child in subfolders)
        images_below = {
            child: [path for path in walk_files(child, folder, self.allow_outside_root) if has_image_extension(path)]
            for child in subfolders
        }
        loose = [
            (check_inside(path, folder, self.allow_outside_root, "Symlink"), -1)
            for path in sorted(folder.iterdir())
            if has_image_extension(path) and not path.is_dir()
        ]
        if labelled and loose:
            raise AnovlError(
                f"{folder} holds both images and labelled subfolders ({', '.join(child.name for child in subfolders)}); "
                f"move the loose images into a labelled subfolder or elsewhere"
            )
        if labelled:
            images = [(path, labels[child]) for child, paths in images_below.items() for path in paths]
        else:
            unused = [path for paths in images_below.values() for path in paths]
            if unused and not loose:
                raise AnovlError(
                    f"{folder} holds images only in subfolders ({', '.join(child.name for child in subfolders)}) "
                    "and none of them is named good/ok/normal or bad/ng/anomaly; for a labelled test set put the "
                    "normal images in good/, to predict on them give one subfolder as the path"
                )
            warn_unused_images(unused, f"a flat folder uses the images directly in {folder}")
            images = loose
        if not images:
            raise AnovlError(f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}; expected {FOLDER_LAYOUT}")
        warn_skipped_files(folder)
        return images
