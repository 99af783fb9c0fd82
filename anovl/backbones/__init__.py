"""Frozen CLIP backbones with AnoVL's value-wise attention path, one encoder per tower type."""

from anovl.backbones.factory import Backbone, create_backbone, register_model_config
from anovl.backbones.registry import ENCODERS, check_supported, inspect_config
from anovl.backbones.value_wise import BlockOps, ValueWiseViT, VisualTokens, register_block_ops, register_encoder

__all__ = [
    "ENCODERS",
    "Backbone",
    "BlockOps",
    "ValueWiseViT",
    "VisualTokens",
    "check_supported",
    "create_backbone",
    "inspect_config",
    "register_block_ops",
    "register_encoder",
    "register_model_config",
]
