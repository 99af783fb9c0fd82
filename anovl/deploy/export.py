"""Export a method (AnoVL, training-free) as one self-contained model: ONNX, OpenVINO IR or TorchScript.

The exported graph takes CLIP-normalised images ``(B, 3, S, S)`` and a class index per image ``(B,)`` and
returns the anomaly maps ``(B, S, S)`` and image scores ``(B,)``. The graph is the method's own export hook
(``model.export_module(classes, num_views)``; AnoVL's is :class:`~anovl.models.anovl.export.ExportableAnoVL`):
the chosen classes' normalised state text embeddings are baked in as one constant ``(C, 2, D)`` tensor, so
neither the text tower nor a tokenizer is needed at inference, and the maps and scores come from the same
step as the method's forward.

Next to the model file, ``<file>.json`` (the sidecar, :mod:`anovl.deploy.sidecar`) records the preprocessing,
the classes (in index order), the number of views, the model's label and settings, and optional image /
pixel thresholds.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from anovl.deploy.sidecar import FORMATS, INPUT_NAMES, OUTPUT_NAMES, ExportClass, Sidecar, sidecar_path
from anovl.errors import AnovlError
from anovl.io import make_folder, refuse_links, replace_together, write_error
from anovl.thresholds import check_threshold

if TYPE_CHECKING:  # the one method with an export hook so far, and its graph
    from anovl.models.anovl.export import ExportableAnoVL
    from anovl.models.anovl.torch_model import AnoVL

ONNX_OPSET = 18  # GridSample with reflection padding needs opset >= 16


@contextlib.contextmanager
def _views_set_to(model: AnoVL, num_views: int) -> Iterator[None]:
    before = model.num_views
    model.num_views = num_views
    try:
        yield
    finally:
        model.num_views = before


def build_exportable(model: AnoVL, classes: Sequence[ExportClass], num_views: int | None = None) -> ExportableAnoVL:
    """The export graph of ``model`` for ``classes`` (in this index order), from the method's export hook."""
    hook = getattr(model, "export_module", None)
    if hook is None:
        raise AnovlError(
            f"{type(model).__name__} has no export hook (export_module); only methods that define "
            "one can be exported (AnoVL)"
        )
    if not classes:
        raise AnovlError("give at least one class to export (--classes bottle cable ...)")
    categories = [entry.category for entry in classes]
    repeated = sorted({name for name in categories if categories.count(name) > 1})
    if repeated:
        raise AnovlError(f"classes repeated: {', '.join(repeated)}; give each category once")
    resolved = [entry.resolved() for entry in classes]
    return hook([(entry.category, entry.prompt_name) for entry in resolved], num_views)


def example_inputs(module: ExportableAnoVL, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, module.image_size, module.image_size, generator=generator)
    return images, torch.arange(batch) % module.states.shape[0]


def _write_onnx(module: ExportableAnoVL, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress notes and deprecations are not the user's business
        program = torch.onnx.export(
            module,
            example_inputs(module),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"images": {0: batch}, "class_index": {0: batch}},
            opset_version=ONNX_OPSET,
            dynamo=True,
            verbose=False,
        )
    assert program is not None, "dynamo=True returns the program"
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
    # Saved to memory first: TorchScript's C++ writer aborts the process (no exception) when a write fails
    # (a full disk, a file-size limit); Python's write reports it.
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    path.write_bytes(buffer.getvalue())


WRITERS = {"onnx": _write_onnx, "openvino": _write_openvino, "torchscript": _write_torchscript}


def export_model(
    model: AnoVL,
    classes: Sequence[ExportClass | str],
    output: str | os.PathLike,
    format: str = "onnx",
    num_views: int | None = None,
) -> Path:
    """Write ``model`` for ``classes`` as ``format`` to ``output`` plus its sidecar; returns the model file.

    ``classes`` are :class:`ExportClass` entries (with their thresholds, if known) or ``category[=prompt name]``
    strings. ``output`` gets the format's suffix (``.onnx``, ``.xml`` with its ``.bin``, ``.pt``) when it has none.
    """
    if format not in FORMATS:
        raise AnovlError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    entries = [(ExportClass.parse(entry) if isinstance(entry, str) else entry).resolved() for entry in classes]
    for entry in entries:
        check_threshold(f"the image threshold of {entry.category}", entry.image_threshold)
        check_threshold(f"the pixel threshold of {entry.category}", entry.pixel_threshold)
    module = build_exportable(model, entries, num_views)
    path = Path(output).expanduser()
    if not path.suffix:
        path = path.with_suffix(FORMATS[format])
    elif path.suffix != FORMATS[format]:
        raise AnovlError(f"a {format} export is written as *{FORMATS[format]}, not {path.name}")
    if path.is_dir():
        raise AnovlError(f"output {path} is a folder; give a file name such as {path / ('model' + FORMATS[format])}")
    with _views_set_to(model, module.num_views):
        label, settings = model.label, model.settings()
    sidecar = Sidecar(
        format=format,
        image_size=model.image_size,
        classes=entries,
        num_views=module.num_views,
        label=label,
        settings=settings,
        map_range=float(model.map_range),
    )
    files = [path, path.with_suffix(".bin")] if format == "openvino" else [path]
    for file in [*files, sidecar_path(path)]:
        refuse_links(file)
    make_folder(path.parent)
    # The exporter writes into a scratch folder beside the output; the model, its .bin and its sidecar then
    # replace the old ones together (an earlier good export stays whole if anything fails).
    try:
        scratch_folder = tempfile.TemporaryDirectory(
            dir=path.parent, prefix=f".{path.name}.", ignore_cleanup_errors=True
        )
    except OSError as error:
        raise write_error(path, error) from None
    with scratch_folder as scratch:
        try:
            with torch.no_grad():
                WRITERS[format](module, Path(scratch) / path.name)
        except AnovlError:
            raise
        except Exception as error:  # noqa: BLE001 - a full disk or a file-size limit surfaces as C++ errors too
            raise write_error(path, error) from None
        moves = {file: functools.partial(_move, Path(scratch) / file.name) for file in files}
        replace_together({**moves, sidecar_path(path): sidecar.to_json()})
    return path


def _move(source: Path, target: Path) -> None:
    os.replace(source, target)


# ----------------------------------------------------------------------------- building the model from a config
