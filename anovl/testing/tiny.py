"""Tiny random-weight variants of any open_clip config: same tower and block types, a fraction of the size.

Used by the per-family tests and the support table (docs/backbones.md). open_clip towers shrink through
their config; timm trunks are named in the config and get a registered timm entrypoint that calls the
original one with a smaller width and depth.
"""

from __future__ import annotations

import re
import sys
from copy import deepcopy

import open_clip
import timm
from timm.models import register_model

from anovl.backbones.factory import register_model_config

TINY_WIDTH, TINY_LAYERS, TINY_HEADS, TINY_EMBED = 64, 2, 4, 32
# Trunks whose stem fixes the transformer width (MobileCLIP-B's and ViTamin's conv stems).
_FIXED_WIDTH_MODULES = ("timm.models.vision_transformer_hybrid", "timm.models.vitamin")


def tiny_timm_name(model_name: str) -> str:
    """A registered timm entrypoint for ``model_name`` at the tiny width and depth; returns its name."""
    tiny_name = f"anovl_tiny_{model_name}"
    if timm.is_model(tiny_name):
        return tiny_name
    original = (
        timm.models.get_model_entrypoint(model_name)
        if hasattr(timm.models, "get_model_entrypoint")
        else timm.models.model_entrypoint(model_name)
    )
    shrink = dict(depth=TINY_LAYERS)
    if original.__module__ not in _FIXED_WIDTH_MODULES:
        shrink.update(embed_dim=TINY_WIDTH, num_heads=TINY_HEADS)

    def entrypoint(pretrained: bool = False, **kwargs):
        return original(pretrained=pretrained, **{**shrink, **kwargs})

    entrypoint.__name__ = entrypoint.__qualname__ = tiny_name
    entrypoint.__module__ = __name__
    register_model(entrypoint)
    assert sys.modules[__name__]  # register_model lists the name in this module's __all__
    return tiny_name


def tiny_config(name: str, simple_tokenizer: bool = False) -> dict:
    """``name``'s config with a 2-block, 64-wide vision tower and a 1-block text tower.

    ``simple_tokenizer``: drop a Hugging Face hub tokenizer for open_clip's own (vocabulary 49408),
    enlarging the text vocabulary to fit (a stand-in for tests that run whole pipelines offline).
    """
    config = deepcopy(open_clip.get_model_config(name))
    vision, text = config["vision_cfg"], config["text_cfg"]
    config["embed_dim"] = TINY_EMBED
    if "timm_model_name" in vision:
        vision["timm_model_name"] = tiny_timm_name(vision["timm_model_name"])
        if vision.get("timm_proj") == "none" and vision["timm_model_name"] != "anovl_tiny_vit_base_mci_224":
            config["embed_dim"] = TINY_WIDTH  # no projection: the trunk's width is the joint space
    else:
        vision.update(width=TINY_WIDTH, layers=TINY_LAYERS, head_width=TINY_WIDTH // TINY_HEADS)
        vision.pop("heads", None)
    if "hf_model_name" not in text:
        text.update(width=TINY_EMBED, layers=1, heads=2)
    if "multimodal_cfg" in config:
        config["multimodal_cfg"].update(width=TINY_EMBED, layers=1, heads=2)
    if simple_tokenizer and "hf_tokenizer_name" in text:
        del text["hf_tokenizer_name"]
        text.pop("tokenizer_kwargs", None)
        text["vocab_size"] = max(text.get("vocab_size", 0), 49408)
    return config


def register_tiny(name: str, simple_tokenizer: bool = False) -> str:
    """Register :func:`tiny_config` of ``name`` as ``anovl-tiny:<name>`` and return that name.

    With ``simple_tokenizer`` the name is ``anovl-tiny-simple-tok:<name>`` with "siglip" spelt "sig-lip":
    open_clip picks SigLIP's hub tokenizer by the model name alone.
    """
    tiny_name = (
        f"anovl-tiny-simple-tok:{re.sub('siglip', 'sig-lip', name, flags=re.IGNORECASE)}"
        if simple_tokenizer
        else f"anovl-tiny:{name}"
    )
    return register_model_config(tiny_config(name, simple_tokenizer), name=tiny_name)
