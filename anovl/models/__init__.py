"""Methods: each implements :class:`~anovl.models.base.AnomalyModel`, runs under the generic module and is
registered by a short name (:mod:`anovl.models.registry`: ``create_method("anovl")``, ``--model anovl``)."""

from anovl.models.anomalyclip import AnomalyCLIP
from anovl.models.anovl import AnoVL
from anovl.models.aprilgan import AprilGAN
from anovl.models.base import AnomalyModel, ModelOutput, Preprocessing
from anovl.models.registry import create_method, list_methods, register_method
from anovl.models.winclip import WinCLIP

__all__ = [
    "AnoVL",
    "AnomalyCLIP",
    "AnomalyModel",
    "AprilGAN",
    "ModelOutput",
    "Preprocessing",
    "WinCLIP",
    "create_method",
    "list_methods",
    "register_method",
]
