"""Deployment: export (ONNX, OpenVINO IR, TorchScript), inference on the exported models, a browser demo."""

from anovl.deploy.export import build_exportable, export_model
from anovl.deploy.inferencer import ExportedModel, Prediction, load_exported, predict
from anovl.deploy.sidecar import ExportClass, Sidecar, sidecar_path
from anovl.models.anovl.export import ExportableAnoVL

__all__ = [
    "main",
    "ExportClass",
    "ExportableAnoVL",
    "ExportedModel",
    "Prediction",
    "Sidecar",
    "build_exportable",
    "export_model",
    "load_exported",
    "predict",
    "sidecar_path",
]


def main(command: str, argv: list[str]) -> None:
    """``anovl export ...`` and ``anovl app ...`` (dispatched by :func:`anovl.cli.main`)."""
    if command == "export":
        from anovl.deploy.export_cli import main as export_main

        export_main(argv)
    else:
        from anovl.deploy.app import main as app_main

        app_main(argv)
