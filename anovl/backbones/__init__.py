"""Frozen CLIP backbones with AnoVL's value-wise attention path."""

from anovl.backbones.factory import Backbone, create_backbone, register_model_config
from anovl.backbones.value_wise import ValueWiseViT, VisualTokens, check_supported

__all__ = ["Backbone", "ValueWiseViT", "VisualTokens", "check_supported", "create_backbone", "register_model_config"]
