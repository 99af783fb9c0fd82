"""``anovl export``: the command line, and the model of an anovl config it exports."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from anovl.configs import read_config, with_class_paths
from anovl.deploy.export import export_model
from anovl.deploy.sidecar import FORMATS, ExportClass, Sidecar, sidecar_path
from anovl.errors import AnovlError
from anovl.models.anovl.torch_model import AnoVL
from anovl.thresholds import RunThresholds, Thresholds

LEGACY_MODULE = "anovl.models.anovl.lightning_model.AnoVLModule"  # configs naming the Lightning wrapper
LEGACY_FRAMEWORK_OPTIONS = ("cflow_pro", "max_pictures", "picture_dir", "results_dir")  # its options beyond AnoVL's
MODEL_OVERRIDE_PREFIX = "--model.init_args."


def model_from_config(config: str | os.PathLike | dict, overrides: dict[str, Any] | None = None) -> AnoVL:
    """The AnoVL of an anovl config's ``model:`` section (``class_path`` AnoVL, or the Lightning module
    ``AnoVLModule`` whose framework-only options are left out), with ``overrides`` of its init_args.

    Random weights (``pretrained: null``) come from AnoVL's ``init_seed``, so the exported demo model is the
    one that ``anovl test --config`` runs.
    """
    from jsonargparse import ArgumentParser

    if isinstance(config, dict):
        document, source = with_class_paths(config), "the config"
    else:
        document, source = read_config(config), str(Path(config).expanduser())
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
        key, has_value, value = token[len(MODEL_OVERRIDE_PREFIX) :].partition("=")
        if not has_value:
            if not items:
                raise AnovlError(f"{token} needs a value")
            value = items.pop(0)
        overrides[key] = yaml.safe_load(value)
    return overrides


def export_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="anovl export",
        description="Export training-free AnoVL with the classes' text embeddings baked in.",
        epilog="Model settings of the config can be overridden, e.g. --model.init_args.pretrained weights.pt",
    )
    parser.add_argument("--config", required=True, help="an anovl config whose model: section is AnoVL")
    parser.add_argument(
        "--classes",
        nargs="+",
        required=True,
        metavar="CLASS",
        help="categories to bake in (index order); 'category=prompt name' sets the prompt name",
    )
    parser.add_argument("--format", choices=list(FORMATS), default="onnx")
    parser.add_argument(
        "--num-views",
        type=int,
        default=None,
        help="views averaged into the image score: 1 (fast) to 22 (reference); default: the config's",
    )
    parser.add_argument("--output", required=True, help="model file (.onnx, .xml or .pt); the sidecar is FILE.json")
    parser.add_argument("--image-threshold", type=float, default=None, help="image-score threshold of every class")
    parser.add_argument("--pixel-threshold", type=float, default=None, help="pixel threshold of every class")
    parser.add_argument(
        "--thresholds",
        default=None,
        metavar="RESULTS_JSON",
        help="per-category thresholds from a test run's results.json (or its folder)",
    )
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
    print(
        f"Exported {len(classes)} classes ({args.format}, {Sidecar.read(sidecar_path(path)).num_views} views) to "
        f"{path} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s; sidecar {sidecar_path(path)}"
    )
