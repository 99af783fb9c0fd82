"""anovl: zero-shot anomaly localisation with vision-language models."""

from anovl.backbones import register_model_config
from anovl.errors import AnovlError
from anovl.models.anovl import AnoVL, AnoVLOutput, PromptSet, TTAConfig, register_adapter

__version__ = "0.1.0"
__all__ = ["AnoVL", "AnoVLOutput", "AnovlError", "PromptSet", "TTAConfig", "register_adapter",
           "register_model_config"]
