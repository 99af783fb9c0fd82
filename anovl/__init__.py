"""anovl: zero-shot anomaly localisation with vision-language models."""

from anovl.backbones import register_model_config
from anovl.categories import register_category
from anovl.errors import AnovlError
from anovl.models import AnomalyModel, WinCLIP
from anovl.models.anovl import AnoVL, AnoVLOutput, PromptSet, TTAConfig, register_adapter

__version__ = "0.1.0"
__all__ = ["AnoVL", "AnoVLOutput", "AnomalyModel", "AnovlError", "PromptSet", "TTAConfig", "WinCLIP",
           "register_adapter", "register_category", "register_model_config"]
