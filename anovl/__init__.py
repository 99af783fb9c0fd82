"""anovl: zero-shot anomaly localisation with vision-language models."""

from importlib import import_module
from typing import Any

from anovl.errors import AnovlError

__version__ = "0.1.0"
__all__ = [
    "AnoVL",
    "AnoVLOutput",
    "AnomalyCLIP",
    "AnomalyModel",
    "AnovlError",
    "AprilGAN",
    "PromptSet",
    "TTAConfig",
    "WinCLIP",
    "create_method",
    "list_methods",
    "register_adapter",
    "register_category",
    "register_method",
    "register_model_config",
]

# The public API is imported on first use, so that `anovl --help` (and `anovl compare`) start without torch.
_LAZY = {
    "AnoVL": "anovl.models.anovl",
    "AnoVLOutput": "anovl.models.anovl",
    "PromptSet": "anovl.models.anovl",
    "TTAConfig": "anovl.models.anovl",
    "register_adapter": "anovl.models.anovl",
    "AnomalyCLIP": "anovl.models",
    "AnomalyModel": "anovl.models",
    "WinCLIP": "anovl.models",
    "AprilGAN": "anovl.models",
    "create_method": "anovl.models",
    "list_methods": "anovl.models",
    "register_method": "anovl.models",
    "register_category": "anovl.categories",
    "register_model_config": "anovl.backbones",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'anovl' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
