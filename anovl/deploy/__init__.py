"""Deployment: export (ONNX, OpenVINO IR, TorchScript), inference on the exported models, a browser demo."""

from anovl.deploy.export import ExportableAnoVL, ExportClass, Sidecar, build_exportable, export_model, sidecar_path
from anovl.deploy.inferencer import ExportedModel, Prediction, load_exported, predict

__all__ = ["ExportClass", "ExportableAnoVL", "ExportedModel", "Prediction", "Sidecar", "build_exportable",
           "export_model", "load_exported", "predict", "sidecar_path"]
