"""A small, deterministic synthetic dataset in the real MVTec (or VisA) layout, for tests and demos.

Normal images are either object-like (a shape on a plain background, with a little pose jitter) or textures
(weave, granite-like noise, stripes). Each defect is painted into a region whose exact binary mask is saved:
``scratch`` (a thin line), ``blob`` (an irregular dark patch), ``missing_piece`` (part of the object erased
to background; on textures a patch flattened to the mean colour) and ``colour_spot`` (a saturated disc).
Pure numpy + Pillow: four categories of ~20 images at 256 px take a second or two.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from anovl.data.dataset import Sample
from anovl.data.mvtec import MVTecDataModule
from anovl.errors import AnovlError

OBJECT_STYLES = ("widget", "washer")
TEXTURE_STYLES = ("fabric", "granite", "stripes")
DEFECT_TYPES = ("scratch", "blob", "missing_piece", "colour_spot")
SYNTHETIC_CATEGORIES = ("widget", "fabric")
SYNTHETIC_VISA_CATEGORIES = {"macaroni1": "widget", "macaroni2": "washer", "fabric": "fabric"}


def generate_mvtec_like(
    root: str | Path,
    categories: Sequence[str] | Mapping[str, str] = SYNTHETIC_CATEGORIES,
    n_good: int = 8,
    n_defect: int = 3,
    n_train: int = 2,
    image_size: int = 256,
    seed: int = 0,
) -> Path:
    """Write ``<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}``.

    Args:
        root: output folder (created; existing files of the same names are overwritten).
        categories: category names that are style names (``widget``, ``washer``, ``fabric``, ``granite``,
            ``stripes``), or a mapping category name -> style.
        n_good: normal test images per category.
        n_defect: test images per defect type per category (masks ``<stem>_mask.png``, 0/255).
        n_train: normal training images per category (only for layout completeness).
        image_size: side of the square images on disk.
        seed: the same seed (and arguments) gives the same files; each category has its own random stream.
    """
    root = Path(root)
    for category, style in _category_styles(categories).items():
        base = root / category
        for split, folder, count in (("train", "good", n_train), ("test", "good", n_good)):
            for index in range(count):
                rng = _rng(seed, category, split, folder, index)
                image, _ = _normal_image(style, (image_size, image_size), rng)
                _save(image, base / split / folder / f"{index:03d}.png")
        for defect in DEFECT_TYPES:
            for index in range(n_defect):
                rng = _rng(seed, category, "test", defect, index)
                image, mask = _defective_image(style, defect, (image_size, image_size), rng)
                _save(image, base / "test" / defect / f"{index:03d}.png")
                _save(mask.astype(np.uint8) * 255, base / "ground_truth" / defect / f"{index:03d}_mask.png")
    return root


def generate_visa_like(
    root: str | Path,
    categories: Sequence[str] | Mapping[str, str] | None = None,
    n_good: int = 6,
    n_defect: int = 2,
    n_train: int = 2,
    image_size: tuple[int, int] = (160, 240),
    seed: int = 0,
) -> Path:
    """Write the VisA layout: ``<object>/Data/Images/{Normal,Anomaly}/*.JPG``, masks
    ``<object>/Data/Masks/Anomaly/*.png`` holding 0/1, and ``split_csv/1cls.csv``.

    Args:
        categories: as for :func:`generate_mvtec_like`; default ``macaroni1`` (widget), ``macaroni2`` (washer),
            ``fabric``.
        n_defect: anomalous test images per defect type.
        image_size: (height, width); landscape by default so that tiling is exercised.
        Others: as for :func:`generate_mvtec_like`.
    """
    root = Path(root)
    rows = []
    for category, style in _category_styles(categories or SYNTHETIC_VISA_CATEGORIES).items():
        images = Path(category) / "Data" / "Images"
        normal_counts = (("train", n_train, 0), ("test", n_good, n_train))  # train files first, then test files
        for split, count, first in normal_counts:
            for index in range(first, first + count):
                image, _ = _normal_image(style, image_size, _rng(seed, category, split, "normal", index))
                relative = images / "Normal" / f"{index:04d}.JPG"
                _save(image, root / relative)
                rows.append((category, split, "normal", relative.as_posix(), ""))
        for defect_index, defect in enumerate(DEFECT_TYPES):
            for index in range(n_defect):
                image, mask = _defective_image(style, defect, image_size, _rng(seed, category, "test", defect, index))
                stem = f"{defect_index * n_defect + index:03d}"
                relative_image = images / "Anomaly" / f"{stem}.JPG"
                relative_mask = Path(category) / "Data" / "Masks" / "Anomaly" / f"{stem}.png"
                _save(image, root / relative_image)
                _save(mask.astype(np.uint8), root / relative_mask)
                rows.append((category, "test", "anomaly", relative_image.as_posix(), relative_mask.as_posix()))
    split_file = root / "split_csv" / "1cls.csv"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    with split_file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("object", "split", "label", "image", "mask"))
        writer.writerows(rows)
    return root


class SyntheticMVTecDataModule(MVTecDataModule):
    """:class:`MVTecDataModule` over a synthetic dataset, generated on first use (needs no download).

    With ``generate=True`` the categories missing under ``root`` are generated by :func:`generate_mvtec_like`
    in ``prepare_data`` (or, used without a Trainer, when the samples are first listed); existing ones are
    used as they are.

    Args:
        root: where the dataset lives or is generated.
        generate: generate missing categories; False: use ``root`` as an ordinary MVTec folder.
        categories: categories to generate and use (style names, see :func:`generate_mvtec_like`);
            default ``widget`` and ``fabric``.
        n_good, n_defect, image_size_on_disk, data_seed: generation settings.
        Others: see :class:`MVTecDataModule`.
    """

    def __init__(
        self,
        root: str | Path,
        generate: bool = True,
        categories: list[str] | None = None,
        n_good: int = 8,
        n_defect: int = 3,
        image_size_on_disk: int = 256,
        data_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, list(categories or SYNTHETIC_CATEGORIES), **kwargs)
        self.generate = generate
        self.generation = {"n_good": n_good, "n_defect": n_defect, "image_size": image_size_on_disk, "seed": data_seed}

    def prepare_data(self) -> None:
        missing = [category for category in self.requested_categories or [] if not (self.root / category).is_dir()]
        if self.generate and missing:
            generate_mvtec_like(self.root, missing, **self.generation)

    def _discover(self) -> list[Sample]:
        self.prepare_data()
        return super()._discover()


def _category_styles(categories: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    if isinstance(categories, str):
        categories = [categories]
    styles = dict(categories) if isinstance(categories, Mapping) else {name: name for name in categories}
    known = OBJECT_STYLES + TEXTURE_STYLES
    unknown = {name: style for name, style in styles.items() if style not in known}
    if unknown:
        raise AnovlError(f"Unknown synthetic styles {unknown}; use category names from {known} or map names to them")
    return styles


def _rng(seed: int, category: str, split: str, folder: str, index: int) -> np.random.Generator:
    """Independent stream per file, so adding categories or images leaves the others unchanged."""
    return np.random.default_rng([seed, zlib.crc32(f"{category}/{split}/{folder}".encode()), index])


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each format reads only its own option; fast PNG compression keeps generation quick (files stay small).
    Image.fromarray(array).save(path, quality=95, compress_level=1)


def _normal_image(style: str, size_hw: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A normal ``uint8 H×W×3`` image and its foreground (where defects may go: the object, or everything)."""
    height, width = size_hw
    if style in OBJECT_STYLES:
        background = np.array([58.0, 60.0, 68.0]) + rng.uniform(-4, 4, 3)
        foreground = _object_shape(style, size_hw, rng)
        yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
        shading = 0.85 + 0.3 * (xx + yy) / 2  # soft light from one corner, so the object is not flat
        colour = (
            np.array([196.0, 164.0, 92.0]) if style == "widget" else np.array([170.0, 174.0, 182.0])
        ) + rng.uniform(-6, 6, 3)
        image = np.where(foreground[..., None], colour * shading[..., None], background)
    else:
        foreground = np.ones(size_hw, dtype=bool)
        image = _texture(style, size_hw, rng)
    image = image + rng.normal(0.0, 3.0, image.shape)  # sensor noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), foreground


def _object_shape(style: str, size_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    height, width = size_hw
    side = min(height, width)
    centre = np.array([width / 2, height / 2]) + rng.uniform(-0.04, 0.04, 2) * side
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if style == "widget":
        # A rotated square with a round hole: a "part" with a pose.
        angle = rng.uniform(-0.2, 0.2)
        half = 0.28 * side
        corners = [(-half, -half), (half, -half), (half, half), (-half, half)]
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        draw.polygon([tuple(centre + rotation @ corner) for corner in corners], fill=255)
        hole = 0.08 * side
        draw.ellipse([*(centre - hole), *(centre + hole)], fill=0)
    else:
        outer, inner = 0.33 * side, 0.14 * side
        draw.ellipse([*(centre - outer), *(centre + outer)], fill=255)
        draw.ellipse([*(centre - inner), *(centre + inner)], fill=0)
    return np.asarray(canvas) > 0


def _texture(style: str, size_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    height, width = size_hw
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, 2)
    if style == "fabric":
        period = 8.0
        over = (np.floor(xx / period) + np.floor(yy / period)) % 2  # which thread lies on top
        thread = np.where(over > 0, np.sin(np.pi * xx / period + phase[0]), np.sin(np.pi * yy / period + phase[1]))
        intensity = 0.6 + 0.25 * np.abs(thread)
        colour = np.array([150.0, 60.0, 55.0])
    elif style == "granite":
        coarse = rng.normal(0, 1, (height // 8 + 1, width // 8 + 1)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BILINEAR))
        intensity = 0.55 + 0.12 * smooth + 0.05 * rng.normal(0, 1, size_hw)
        colour = np.array([170.0, 165.0, 160.0])
    else:
        intensity = 0.55 + 0.25 * np.sin(2 * np.pi * (xx + yy) / 14.0 + phase[0])
        colour = np.array([90.0, 130.0, 170.0])
    return np.clip(intensity, 0, 1.2)[..., None] * colour


def _defective_image(
    style: str, defect: str, size_hw: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A normal image with one defect painted in, and the exact mask of the changed region."""
    image, foreground = _normal_image(style, size_hw, rng)
    side = min(size_hw)
    rows, columns = np.nonzero(foreground)
    pick = rng.integers(len(rows))
    centre = np.array([columns[pick], rows[pick]], dtype=np.float64)  # (x, y), on the foreground
    canvas = Image.new("L", (size_hw[1], size_hw[0]), 0)
    draw = ImageDraw.Draw(canvas)
    result = image.astype(np.float64)
    if defect == "scratch":
        angle = rng.uniform(0, np.pi)
        reach = rng.uniform(0.15, 0.3) * side * np.array([np.cos(angle), np.sin(angle)])
        draw.line([tuple(centre - reach), tuple(centre + reach)], fill=255, width=max(2, side // 100))
    elif defect == "blob":
        angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        radii = rng.uniform(0.05, 0.09) * side * rng.uniform(0.7, 1.3, angles.size)
        draw.polygon(
            [tuple(centre + radius * np.array([np.cos(a), np.sin(a)])) for a, radius in zip(angles, radii)], fill=255
        )
    else:
        radius = (rng.uniform(0.1, 0.16) if defect == "missing_piece" else rng.uniform(0.03, 0.06)) * side
        draw.ellipse([*(centre - radius), *(centre + radius)], fill=255)
    mask = (np.asarray(canvas) > 0) & foreground
    if defect == "scratch":
        result[mask] = result[mask] * 0.35 + 150.0 * (rng.random() < 0.5)  # dark, or bright
    elif defect == "blob":
        result[mask] *= 0.45
    elif defect == "missing_piece":
        # Objects: show the background through the gap; textures: a flattened, smudged patch.
        fill = image[~foreground].mean(axis=0) if style in OBJECT_STYLES else image.reshape(-1, 3).mean(axis=0)
        result[mask] = fill + rng.normal(0.0, 3.0, (int(mask.sum()), 3))
    else:
        result[mask] = np.array([210.0, 35.0, 40.0]) if rng.random() < 0.5 else np.array([40.0, 90.0, 220.0])
    return np.clip(np.rint(result), 0, 255).astype(np.uint8), mask
