"""The sidecar of an exported model (``<file>.json``): the preprocessing, the classes (in index order) with
their optional image / pixel thresholds, the number of views, the model's label and settings, and the range of
its maps (``map_range``; 1 when a sidecar has none, as those written before it was recorded)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from anovl import categories as category_registry
from anovl.data.transforms import CLIP_MEAN, CLIP_STD
from anovl.errors import AnovlError
from anovl.io import read_text, validate
from anovl.io.reading import parse_json
from anovl.io.schemas import SidecarRecord

FORMATS = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt"}
SIDECAR_VERSION = 1
MAX_SIDECAR_BYTES = 4 * 2**20
INPUT_NAMES = ("images", "class_index")
OUTPUT_NAMES = ("anomaly_map", "pred_score")


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (one sidecar per exported file, whatever its format)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


@dataclass(frozen=True)
class ExportClass:
    """One class of an exported model: the dataset category and the object name put into the prompts."""

    category: str
    prompt_name: str | None = None  # None: anovl.categories' name for the category (e.g. macaroni1 -> macaroni)
    image_threshold: float | None = None  # image score above which an image of this class is called anomalous
    pixel_threshold: float | None = None  # map value above which a pixel is called anomalous

    @classmethod
    def parse(cls, text: str) -> "ExportClass":
        """``category`` or ``category=prompt name`` (e.g. ``my_part=screw``)."""
        category, _, prompt_name = text.partition("=")
        category, prompt_name = category.strip(), prompt_name.strip()
        if not category:
            raise AnovlError(f"class {text!r} has no name; give 'category' or 'category=prompt name'")
        return cls(category, prompt_name or None)

    def resolved(self) -> "ExportClass":
        """This class with its prompt name filled in from :mod:`anovl.categories` where none was given."""
        return replace(self, prompt_name=self.prompt_name or category_registry.prompt_name(self.category))


@dataclass
class Sidecar:
    """What an exported model needs besides its graph (written as ``<file>.json``)."""

    format: str
    image_size: int
    classes: list[ExportClass]
    num_views: int
    label: str
    settings: dict[str, Any]
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    interpolation: str = "bilinear"
    map_range: float = 1.0  # the model's AnomalyModel.map_range: the largest value of its maps

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": SIDECAR_VERSION,
                "format": self.format,
                "preprocessing": {
                    "image_size": self.image_size,
                    "mean": list(self.mean),
                    "std": list(self.std),
                    "interpolation": self.interpolation,
                },
                "inputs": {
                    "images": "float32 B×3×S×S: resized, scaled to [0, 1], (x - mean) / std",
                    "class_index": "int64 B: index into classes",
                },
                "outputs": {
                    "anomaly_map": "float32 B×S×S: per pixel, in [0, map_range] (1: abnormal probability)",
                    "pred_score": "float32 B: image score",
                },
                "classes": [asdict(entry) for entry in self.classes],
                "num_views": self.num_views,
                "label": self.label,
                "settings": self.settings,
                "map_range": self.map_range,
            },
            indent=2,
            ensure_ascii=False,
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Sidecar":
        path = Path(path)
        if not path.is_file():
            raise AnovlError(
                f"the sidecar {path} of the exported model is missing; `anovl export` writes the "
                "model and its .json side by side: keep them together or export again"
            )
        document = parse_json(
            read_text(path, "sidecar", MAX_SIDECAR_BYTES),
            f"sidecar {path} (not an anovl export record: export the model again)",
        )
        if isinstance(document, dict) and document.get("version") != SIDECAR_VERSION:
            raise AnovlError(
                f"sidecar {path} has version {document.get('version')!r} but this anovl reads "
                f"version {SIDECAR_VERSION}; export the model again"
            )
        record = validate(
            document, SidecarRecord, f"sidecar {path} (not an anovl export record)", "export the model again"
        )
        if record.format not in FORMATS:
            raise AnovlError(
                f"sidecar {path}: format {record.format!r} is not one of {', '.join(FORMATS)}; export the model again"
            )
        preprocessing = record.preprocessing
        return cls(
            format=record.format,
            classes=[ExportClass(**entry.model_dump()) for entry in record.classes],
            num_views=record.num_views,
            label=record.label,
            settings=record.settings,
            image_size=preprocessing.image_size,
            mean=tuple(preprocessing.mean),
            std=tuple(preprocessing.std),
            interpolation=preprocessing.interpolation,
            map_range=record.map_range,
        )
