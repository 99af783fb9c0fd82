"""Plain folders of images: unlabelled (for ``predict``) or split into good/bad subfolders."""

from __future__ import annotations

from pathlib import Path

from anovl.data.base import AnomalyDataModule, OnBadImage, Sample, find_mask, index_by_stem, require_dir
from anovl.data.corruptions import CorruptionSpec
from anovl.data.image_io import IMAGE_EXTENSIONS, is_image_file
from anovl.errors import AnovlError

NORMAL_FOLDERS = frozenset({"good", "ok", "normal"})
ANOMALOUS_FOLDERS = frozenset({"bad", "ng", "anomaly"})
FOLDER_LAYOUT = "images directly in the folder (unlabelled), or in good/ and bad/ subfolders (also ok/ng, normal/anomaly)"


class FolderDataModule(AnomalyDataModule):
    """Images from a folder (or a single image file).

    * Flat folder (or one file): the images directly in it, label -1 (unknown). Subfolders are ignored.
    * Labelled: subfolders ``good``/``ok``/``normal`` (label 0) and ``bad``/``ng``/``anomaly`` (label 1), any
      case, searched recursively; other subfolders are ignored.

    Masks: with ``mask_dir``, the mask of an image is found anywhere below it by stem (``<stem>_mask.<ext>``
    or ``<stem>.<ext>``); normal images without one get all-zero masks, an anomalous image without one is an
    error (skip mode: kept for image metrics only). Without ``mask_dir`` no image has pixel ground truth
    (``has_mask`` False), so only image metrics are meaningful.

    Args:
        path: folder (or image file).
        mask_dir: folder of masks, or None.
        prompt_name: object name put into the prompts.
        Others: see :class:`~anovl.data.base.AnomalyDataModule`. The category of every image is the folder's
        name (for a single file: its parent folder's name).
    """

    def __init__(
        self,
        path: str | Path,
        mask_dir: str | Path | None = None,
        prompt_name: str = "object",
        image_size: int = 240,
        batch_size: int = 8,
        num_workers: int = 0,
        on_bad_image: OnBadImage = "error",
        corruption: CorruptionSpec = None,
        seed: int = 0,
        prompt_names: dict[str, str] | None = None,
    ) -> None:
        super().__init__(image_size, batch_size, num_workers, on_bad_image, corruption, seed, prompt_names)
        self.path = Path(path).expanduser()
        self.mask_dir = Path(mask_dir).expanduser() if mask_dir is not None else None
        self.prompt_name = prompt_name

    def default_prompt_name(self, category: str) -> str:
        return self.prompt_name

    def locations(self) -> dict[str, Path | None]:
        return {"path": self.path, "mask_dir": self.mask_dir}

    def _discover(self) -> list[Sample]:
        if self.path.is_file():
            if not is_image_file(self.path):
                raise AnovlError(f"{self.path} is not a supported image file ({', '.join(sorted(IMAGE_EXTENSIONS))}); give an image or a folder")
            base, labelled_images = self.path.parent, [(self.path, -1)]
        else:
            base = require_dir(self.path, "Image folder", FOLDER_LAYOUT)
            labelled_images = self._find_images(base)
        mask_index = index_by_stem(require_dir(self.mask_dir, "Mask folder", "a folder of masks")) if self.mask_dir else None
        category = base.resolve().name
        prompt_name = self.prompt_name_for(category)
        samples = []
        for image_path, label in labelled_images:
            mask_path = find_mask(mask_index, image_path) if mask_index is not None else None
            if mask_index is not None and label == 1 and mask_path is None:
                self._report_missing_mask(image_path, f"{image_path.stem}_mask.png or {image_path.stem}.png below {self.mask_dir}")
            has_mask = mask_path is not None or (mask_index is not None and label == 0)
            key = image_path.relative_to(base).as_posix()
            samples.append(Sample(image_path, key, category, prompt_name, label, has_mask, mask_path))
        return samples

    def _find_images(self, folder: Path) -> list[tuple[Path, int]]:
        subfolder_labels = {}
        for child in folder.iterdir():
            if child.is_dir() and child.name.lower() in NORMAL_FOLDERS | ANOMALOUS_FOLDERS:
                subfolder_labels[child] = 0 if child.name.lower() in NORMAL_FOLDERS else 1
        loose = [(path, -1) for path in folder.iterdir() if is_image_file(path)]
        if subfolder_labels and loose:
            raise AnovlError(
                f"{folder} holds both images and labelled subfolders ({', '.join(sorted(p.name for p in subfolder_labels))}); "
                f"move the loose images into a labelled subfolder or elsewhere"
            )
        labelled = [(path, label) for child, label in subfolder_labels.items() for path in child.rglob("*") if is_image_file(path)]
        images = labelled or loose
        if not images:
            raise AnovlError(f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}; expected {FOLDER_LAYOUT}")
        return images
