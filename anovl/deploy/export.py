"""Export AnoVL (training-free) as one self-contained model: ONNX, OpenVINO IR or TorchScript.

The exported graph takes CLIP-normalised images ``(B, 3, S, S)`` and a class index per image ``(B,)`` and
returns the anomaly maps ``(B, S, S)`` and image scores ``(B,)``. The chosen classes' normalised state text
embeddings are baked in as one constant ``(C, 2, D)`` tensor, so neither the text tower nor a tokenizer is
needed at inference. The graph is built from the project's own pieces (:func:`make_views`, the V-V encoder,
:func:`anomaly_map`, :func:`image_score`), so it computes what :class:`AnoVL` computes.

Next to the model file, ``<file>.json`` (the sidecar) records the preprocessing, the classes (in index
order), the number of views, the model's label and settings, and optional image / pixel thresholds.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from anovl import categories as category_registry
from anovl.backbones.value_wise import ValueWiseViT
from anovl.data.transforms import CLIP_MEAN, CLIP_STD
from anovl.errors import AnovlError
from anovl.models.anovl.maps import anomaly_map, image_score
from anovl.models.anovl.torch_model import AnoVL
from anovl.models.anovl.views import NUM_REFERENCE_VIEWS, make_views
from anovl.thresholds import RunThresholds, Thresholds

FORMATS = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt"}
SIDECAR_VERSION = 1
ONNX_OPSET = 18  # GridSample with reflection padding needs opset >= 16
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

    def to_json(self) -> str:
        return json.dumps({
            "version": SIDECAR_VERSION,
            "format": self.format,
            "preprocessing": {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                              "interpolation": self.interpolation},
            "inputs": {"images": "float32 B×3×S×S: resized, scaled to [0, 1], (x - mean) / std",
                       "class_index": "int64 B: index into classes"},
            "outputs": {"anomaly_map": "float32 B×S×S: abnormal probability per pixel",
                        "pred_score": "float32 B: image score"},
            "classes": [asdict(entry) for entry in self.classes],
            "num_views": self.num_views,
            "label": self.label,
            "settings": self.settings,
        }, indent=2, ensure_ascii=False)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Sidecar":
        path = Path(path)
        if not path.is_file():
            raise AnovlError(f"the sidecar {path} of the exported model is missing; `anovl export` writes the "
                             "model and its .json side by side: keep them together or export again")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("version") != SIDECAR_VERSION:
                raise AnovlError(f"sidecar {path} has version {record.get('version')!r} but this anovl reads "
                                 f"version {SIDECAR_VERSION}; export the model again")
            preprocessing = record["preprocessing"]
            return cls(
                format=record["format"], classes=[ExportClass(**entry) for entry in record["classes"]],
                num_views=int(record["num_views"]), label=record["label"], settings=record["settings"],
                image_size=int(preprocessing["image_size"]), mean=tuple(preprocessing["mean"]),
                std=tuple(preprocessing["std"]), interpolation=preprocessing["interpolation"],
            )
        except AnovlError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise AnovlError(f"sidecar {path} is not an anovl export record ({type(error).__name__}: {error}); "
                             "export the model again") from None


class ExportableAnoVL(nn.Module):
    """Training-free AnoVL for a fixed set of classes: ``(images, class_index) -> (anomaly_map, pred_score)``.

    ``states`` (C, 2, D) are the classes' normalised [normal, abnormal] text embeddings, a constant buffer.
    """

    def __init__(self, encoder: ValueWiseViT, states: torch.Tensor, image_size: int, num_views: int,
                 layers: Sequence[int]):
        super().__init__()
        if not 1 <= num_views <= NUM_REFERENCE_VIEWS:
            raise AnovlError(f"num_views must be between 1 and {NUM_REFERENCE_VIEWS}, got {num_views}")
        self.encoder = encoder
        self.register_buffer("states", states.detach().float().clone())
        self.image_size = image_size
        self.num_views = num_views
        self.layers = tuple(layers)

    def forward(self, images: torch.Tensor, class_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.states[class_index]
        views = make_views(images, self.num_views)
        encoded = self.encoder(views, num_local=images.shape[0], layers=self.layers)
        maps = torch.stack([anomaly_map(tokens, states, self.image_size) for tokens in encoded.patch_tokens]).mean(0)
        return maps, image_score(encoded.global_tokens, states)


def state_embeddings(model: AnoVL, entry: ExportClass) -> torch.Tensor:
    """Normalised (2, D) state embeddings of a class, as the model's forward uses them."""
    return model.text_embeddings(entry.category, entry.prompt_name).states


@contextlib.contextmanager
def _views_set_to(model: AnoVL, num_views: int) -> Iterator[None]:
    before = model.num_views
    model.num_views = num_views
    try:
        yield
    finally:
        model.num_views = before


def build_exportable(model: AnoVL, classes: Sequence[ExportClass], num_views: int | None = None) -> ExportableAnoVL:
    """The exportable module of ``model`` for ``classes`` (in this index order)."""
    if getattr(model, "tta", None) is not None:
        raise AnovlError("test-time adaptation trains an adapter on every image and cannot be exported; export the "
                         "training-free model (remove model.init_args.tta from the config)")
    if not classes:
        raise AnovlError("give at least one class to export (--classes bottle cable ...)")
    categories = [entry.category for entry in classes]
    repeated = sorted({name for name in categories if categories.count(name) > 1})
    if repeated:
        raise AnovlError(f"classes repeated: {', '.join(repeated)}; give each category once")
    states = torch.stack([state_embeddings(model, entry.resolved()).float().cpu() for entry in classes])
    return ExportableAnoVL(model.encoder, states, model.image_size, num_views or model.num_views, model.layers).eval()


def example_inputs(module: ExportableAnoVL, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, module.image_size, module.image_size, generator=generator)
    return images, torch.arange(batch) % module.states.shape[0]


def _write_onnx(module: ExportableAnoVL, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress notes and deprecations are not the user's business
        program = torch.onnx.export(
            module, example_inputs(module), input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"images": {0: batch}, "class_index": {0: batch}}, opset_version=ONNX_OPSET,
            dynamo=True, verbose=False,
        )
    program.save(str(path), external_data=False)


def _write_openvino(module: ExportableAnoVL, path: Path) -> None:
    import openvino as ov

    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = Path(scratch) / "model.onnx"
        _write_onnx(module, onnx_path)
        converted = ov.convert_model(str(onnx_path))
    # fp16 weight compression (OpenVINO's default) would break parity with PyTorch.
    ov.save_model(converted, str(path), compress_to_fp16=False)


def _write_torchscript(module: ExportableAnoVL, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shapes read as Python numbers (they are fixed by S)
        traced = torch.jit.trace(module, example_inputs(module), check_trace=False)
    traced.save(str(path))


WRITERS = {"onnx": _write_onnx, "openvino": _write_openvino, "torchscript": _write_torchscript}


def check_threshold(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise AnovlError(f"the {name} threshold must be a probability in [0, 1], got {value!r}")


def export_model(model: AnoVL, classes: Sequence[ExportClass | str], output: str | os.PathLike,
                 format: str = "onnx", num_views: int | None = None) -> Path:
    """Write ``model`` for ``classes`` as ``format`` to ``output`` plus its sidecar; returns the model file.

    ``classes`` are :class:`ExportClass` entries (with their thresholds, if known) or ``category[=prompt name]``
    strings. ``output`` gets the format's suffix (``.onnx``, ``.xml`` with its ``.bin``, ``.pt``) when it has none.
    """
    if format not in FORMATS:
        raise AnovlError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    classes = [(ExportClass.parse(entry) if isinstance(entry, str) else entry).resolved() for entry in classes]
    for entry in classes:
        check_threshold("image", entry.image_threshold)
        check_threshold("pixel", entry.pixel_threshold)
    module = build_exportable(model, classes, num_views)
    path = Path(output).expanduser()
    if not path.suffix:
        path = path.with_suffix(FORMATS[format])
    elif path.suffix != FORMATS[format]:
        raise AnovlError(f"a {format} export is written as *{FORMATS[format]}, not {path.name}")
    if path.is_dir():
        raise AnovlError(f"output {path} is a folder; give a file name such as {path / ('model' + FORMATS[format])}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        WRITERS[format](module, path)
    with _views_set_to(model, module.num_views):
        label, settings = model.label, model.settings()
    sidecar = Sidecar(format=format, image_size=model.image_size, classes=list(classes), num_views=module.num_views,
                      label=label, settings=settings)
    sidecar_path(path).write_text(sidecar.to_json(), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- building the model from a config

LEGACY_MODULE = "anovl.models.anovl.lightning_model.AnoVLModule"  # configs naming the Lightning wrapper
LEGACY_FRAMEWORK_OPTIONS = ("cflow_pro", "max_pictures", "picture_dir", "results_dir")  # its options beyond AnoVL's
MODEL_OVERRIDE_PREFIX = "--model.init_args."


def model_from_config(config: str | os.PathLike | dict, overrides: dict[str, Any] | None = None) -> AnoVL:
    """The AnoVL of an anovl config's ``model:`` section (``class_path`` AnoVL, or the Lightning module
    ``AnoVLModule`` whose framework-only options are left out), with ``overrides`` of its init_args.

    Random weights (``pretrained: null``) come from AnoVL's ``init_seed``, so the exported demo model is the
    one that ``anovl test --config`` runs.
    """
    import yaml
    from jsonargparse import ArgumentParser

    if isinstance(config, dict):
        document, source = config, "the config"
    else:
        path = Path(config).expanduser()
        if not path.is_file():
            raise AnovlError(f"config file not found: {path}")
        try:
            document = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise AnovlError(f"config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        source = str(path)
    section = (document or {}).get("model") if isinstance(document, dict) else None
    if not isinstance(section, dict):
        raise AnovlError(f"{source} has no model: section with class_path and init_args")
    class_path = section.get("class_path", "anovl.models.AnoVL")
    init_args = dict(section.get("init_args") or {})
    init_args.update(overrides or {})
    if class_path == LEGACY_MODULE:
        init_args = {key: value for key, value in init_args.items() if key not in LEGACY_FRAMEWORK_OPTIONS}
    elif class_path.rsplit(".", 1)[-1] != "AnoVL" or not class_path.startswith("anovl."):
        raise AnovlError(f"{source}: only AnoVL models can be exported, not {class_path}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(AnoVL, "model")
    try:
        parsed = parser.parse_object({"model": init_args})
    except Exception as error:  # jsonargparse reports unknown keys and wrong types with its own error types
        raise AnovlError(f"{source}: bad model settings: {str(error).splitlines()[0]}") from None
    with warnings.catch_warnings():
        if init_args.get("pretrained", "x") is None:
            warnings.simplefilter("ignore")  # random weights are the point of the demo model
        return parser.instantiate_classes(parsed).model


def parse_model_overrides(extra: Sequence[str]) -> dict[str, Any]:
    """``--model.init_args.KEY VALUE`` / ``--model.init_args.KEY=VALUE`` pairs, values read as YAML."""
    import yaml

    overrides, items = {}, list(extra)
    while items:
        token = items.pop(0)
        if not token.startswith(MODEL_OVERRIDE_PREFIX):
            raise AnovlError(f"unknown argument {token!r}; see anovl export --help")
        key, has_value, value = token[len(MODEL_OVERRIDE_PREFIX):].partition("=")
        if not has_value:
            if not items:
                raise AnovlError(f"{token} needs a value")
            value = items.pop(0)
        overrides[key] = yaml.safe_load(value)
    return overrides


def export_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="anovl export", description="Export training-free AnoVL with the classes' text embeddings baked in.",
        epilog="Model settings of the config can be overridden, e.g. --model.init_args.pretrained weights.pt",
    )
    parser.add_argument("--config", required=True, help="an anovl config whose model: section is AnoVL")
    parser.add_argument("--classes", nargs="+", required=True, metavar="CLASS",
                        help="categories to bake in (index order); 'category=prompt name' sets the prompt name")
    parser.add_argument("--format", choices=list(FORMATS), default="onnx")
    parser.add_argument("--num-views", type=int, default=None,
                        help="views averaged into the image score: 1 (fast) to 22 (reference); default: the config's")
    parser.add_argument("--output", required=True, help="model file (.onnx, .xml or .pt); the sidecar is FILE.json")
    parser.add_argument("--image-threshold", type=float, default=None, help="image-score threshold of every class")
    parser.add_argument("--pixel-threshold", type=float, default=None, help="pixel threshold of every class")
    parser.add_argument("--thresholds", default=None, metavar="RESULTS_JSON",
                        help="per-category thresholds from a test run's results.json (or its folder)")
    return parser


def main(argv: Sequence[str]) -> None:
    """``anovl export``: see :func:`export_parser`."""
    import time

    args, extra = export_parser().parse_known_args(list(argv))
    model = model_from_config(args.config, parse_model_overrides(extra))
    # The same thresholds `anovl predict` would use: a run's F1-max (its mean for a class it lacks), given values first.
    recorded = RunThresholds.read(args.thresholds, "--thresholds") if args.thresholds else None
    classes = []
    for text in args.classes:
        entry = ExportClass.parse(text)
        found = recorded.for_category(entry.category) if recorded is not None else Thresholds()
        found = found.with_given(args.image_threshold, args.pixel_threshold)
        classes.append(ExportClass(entry.category, entry.prompt_name, found.image, found.pixel))
    start = time.perf_counter()
    path = export_model(model, classes, args.output, args.format, args.num_views)
    files = [path, path.with_suffix(".bin")] if args.format == "openvino" else [path]
    size = sum(file.stat().st_size for file in files)
    print(f"Exported {len(classes)} classes ({args.format}, {Sidecar.read(sidecar_path(path)).num_views} views) to "
          f"{path} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s; sidecar {sidecar_path(path)}")
