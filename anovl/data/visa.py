"""VisA layout: the split file ``split_csv/1cls.csv`` lists images and masks relative to the root."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

from anovl.data.datamodule import AnomalyDataModule
from anovl.data.dataset import ResizeMode, Sample
from anovl.data.listing import category_selection, require_dir, warn_skipped_files
from anovl.data.paths import relative_entry
from anovl.errors import AnovlError

VISA_SPLIT_FILE = Path("split_csv") / "1cls.csv"
VISA_LAYOUT = (
    "<root>/split_csv/1cls.csv with columns object,split,label,image,mask and the listed files under "
    "<root>/<object>/Data/Images and <root>/<object>/Data/Masks"
)
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": 0, "anomaly": 1}


class VisADataModule(AnomalyDataModule):
    """Test split of VisA.

    VisA masks store class indices (0 background, 1 defect) rather than 0/255, so any nonzero mask value is
    anomalous here. ``mode="tile"`` (the reference run) resizes the shorter side to ``image_size`` and keeps
    the aspect ratio: ``image`` is ``3×S×W`` and ``mask`` ``S×W``, to be cut with
    :func:`~anovl.data.transforms.split_tiles` and put back with :func:`~anovl.data.transforms.stitch_tiles`.
    Batches never mix categories and each VisA category has one image size, so they stack; mixed sizes within
    a category raise a clear error at collation (use ``batch_size=1`` or ``mode="resize"``).
    ``mode="resize"`` gives S×S like MVTec.

    The split file must be UTF-8 (a BOM is fine). Its paths must stay inside the root (no absolute paths, no
    ``..``, no symlink leading out) unless ``allow_outside_root=True``. A row repeated verbatim is dropped with a
    warning naming the lines; two different rows for one image are an error. Files beside the listed images that
    are not supported images (a .gif, notes) are named in an :class:`~anovl.data.listing.UnusedFilesWarning`.

    Args:
        root: dataset root (holding ``split_csv/``).
        categories: objects to use; None: every object of the test split.
        mode: ``"tile"`` or ``"resize"``.
        Others: see :class:`~anovl.data.datamodule.AnomalyDataModule`.
    """

    nonzero_masks = True

    def __init__(
        self,
        root: str | Path,
        categories: list[str] | None = None,
        mode: ResizeMode = "tile",
        **kwargs: Any,
    ) -> None:
        super().__init__(mode=mode, **kwargs)
        self.root = Path(root).expanduser()
        self.requested_categories = category_selection(categories)

    def locations(self) -> dict[str, Path | None]:
        return {"root": self.root}

    def _discover(self) -> list[Sample]:
        root = require_dir(self.root, "Dataset root", VISA_LAYOUT)
        split_file = root / VISA_SPLIT_FILE
        if not split_file.is_file():
            raise AnovlError(f"VisA split file {split_file} not found; expected {VISA_LAYOUT}")
        test_rows = _unique_rows(split_file, _read_test_rows(split_file))
        found = sorted({row["object"] for _, row in test_rows})
        if not found:
            raise AnovlError(f"{split_file} has no rows with split 'test'; expected {VISA_LAYOUT}")
        missing = [category for category in self.requested_categories or [] if category not in found]
        if missing:
            raise AnovlError(f"Categories {missing} have no test rows in {split_file}; found: {', '.join(found)}")
        selected = set(self.requested_categories or found)
        samples = [self._sample(root, split_file, line, row) for line, row in test_rows if row["object"] in selected]
        listed = {sample.image_path for sample in samples}
        for folder in sorted({path.parent for path in listed}):
            warn_skipped_files(folder, recursive=False, listed=listed)
        return samples

    def _sample(self, root: Path, split_file: Path, line: int, row: dict[str, str]) -> Sample:
        if row["label"] not in VISA_LABELS:
            raise AnovlError(f"{split_file} line {line}: label {row['label']!r} must be one of {sorted(VISA_LABELS)}")
        label = VISA_LABELS[row["label"]]
        where = f"{split_file} line {line}"
        if not row["object"] or not row["image"]:
            raise AnovlError(f"{where}: the object and image columns must not be empty")
        image_path = relative_entry(root, row["image"], self.allow_outside_root, where)
        mask_path = relative_entry(root, row["mask"], self.allow_outside_root, where) if row["mask"] else None
        if label == 1 and mask_path is None:
            self._report_missing_mask(image_path, f"a path in the mask column of {split_file} line {line}")
        category = row["object"]
        return Sample(
            image_path,
            Path(row["image"]).as_posix(),
            category,
            self.prompt_name_for(category),
            label,
            has_mask=label == 0 or mask_path is not None,
            mask_path=mask_path,
        )


def _read_test_rows(split_file: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of every test row, stripped; one clear error for a file that is not a UTF-8 CSV."""
    try:
        with split_file.open(newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: tolerate a BOM
            reader = csv.DictReader(handle)
            missing_columns = [column for column in VISA_COLUMNS if column not in (reader.fieldnames or [])]
            if missing_columns:
                raise AnovlError(
                    f"{split_file} lacks the columns {missing_columns}; expected {', '.join(VISA_COLUMNS)}"
                )
            rows = []
            for row in reader:
                if (row["split"] or "").strip() == "test":
                    rows.append((reader.line_num, {column: (row[column] or "").strip() for column in VISA_COLUMNS}))
            return rows
    except UnicodeDecodeError as error:
        raise AnovlError(
            f"{split_file} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start}; Latin-1 or another encoding?); re-save it as UTF-8"
        ) from None
    except csv.Error as error:
        raise AnovlError(
            f"{split_file} is not a readable CSV file near line {reader.line_num} ({error}); "
            "fix or replace the split file"
        ) from None
    except OSError as error:
        raise AnovlError(f"Cannot read {split_file} ({error.strerror or type(error).__name__})") from None


def _unique_rows(split_file: Path, rows: list[tuple[int, dict[str, str]]]) -> list[tuple[int, dict[str, str]]]:
    """Rows with each image once: verbatim repeats dropped with a warning, conflicting ones refused."""
    first_line: dict[str, tuple[int, dict[str, str]]] = {}
    repeated_lines = []
    for line, row in rows:
        if row["image"] not in first_line:
            first_line[row["image"]] = (line, row)
            continue
        earlier_line, earlier = first_line[row["image"]]
        if earlier != row:
            raise AnovlError(
                f"{split_file} lines {earlier_line} and {line} list the image {row['image']!r} with "
                "different objects, labels or masks; keep one of them"
            )
        repeated_lines.append(line)
    if repeated_lines:
        shown = ", ".join(map(str, repeated_lines[:10])) + (", ..." if len(repeated_lines) > 10 else "")
        warnings.warn(
            f"{split_file}: {len(repeated_lines)} test rows repeat an earlier row and are dropped "
            f"(lines {shown}), so no image counts twice",
            UserWarning,
            stacklevel=3,
        )
    return list(first_line.values())
