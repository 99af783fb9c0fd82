"""Methods: each implements :class:`~anovl.models.base.AnomalyModel` and runs under the generic module."""

from anovl.models.anomalyclip import AnomalyCLIP
from anovl.models.anovl import AnoVL
from anovl.models.aprilgan import AprilGAN
from anovl.models.base import AnomalyModel, ModelOutput, Preprocessing
from anovl.models.winclip import WinCLIP

__all__ = ["AnoVL", "AnomalyCLIP", "AnomalyModel", "AprilGAN", "ModelOutput", "Preprocessing", "WinCLIP"]
