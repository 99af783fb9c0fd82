"""AnoVL: training-free adaptation of a frozen CLIP (+ optional test-time adaptation)."""

from anovl.models.anovl.adapters import ADAPTERS, Adapter, create_adapter, register_adapter
from anovl.models.anovl.prompts import PromptSet
from anovl.models.anovl.torch_model import AnoVL, AnoVLOutput
from anovl.models.anovl.tta import TestTimeAdaptation, TTAConfig
from anovl.models.text_cache import TextEmbeddingCache, TextEmbeddings

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AnoVL",
    "AnoVLOutput",
    "PromptSet",
    "TTAConfig",
    "TestTimeAdaptation",
    "TextEmbeddingCache",
    "TextEmbeddings",
    "create_adapter",
    "register_adapter",
]
