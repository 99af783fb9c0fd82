"""Which encoder runs a model's vision tower, decided before any weights are built.

The tower is first built on the ``meta`` device (shapes only, no memory, no weights), so an unsupported
model stops with one clear error naming it and the reason, and the patch size of timm towers (which
their configs do not state) is known before the real model is made.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from open_clip.model import _build_vision_tower
from torch import nn

import anovl.backbones.open_clip_vit  # noqa: F401  (registers the open_clip tower encoder, tried first)
import anovl.backbones.timm_vit  # noqa: F401  (registers the timm tower encoder)
from anovl.backbones.value_wise import ENCODERS, TowerEncoder, block_ops_for
from anovl.errors import AnovlError


def describe_error(error: Exception) -> str:
    """``Type: first line of the message`` (messages of nested libraries can run to pages)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:160] if text else 'no details'}"


def describe_tower(tower: nn.Module) -> str:
    """The tower's class, with its trunk for timm towers (``TimmModel(ConvNeXt)``)."""
    trunk = getattr(tower, "trunk", None)
    return f"{type(tower).__name__}({type(trunk).__name__})" if trunk is not None else type(tower).__name__


def _blocks_of(tower: nn.Module):
    trunk = getattr(tower, "trunk", tower)
    if hasattr(trunk, "blocks"):
        return trunk.blocks
    return getattr(getattr(trunk, "transformer", None), "resblocks", None)


def unsupported_reasons(tower: nn.Module) -> tuple[TowerEncoder | None, list[str]]:
    """The encoder class for ``tower`` and why it cannot run (no reasons: it can)."""
    for encoder in ENCODERS.values():
        reasons = encoder.unsupported(tower)
        if reasons is not None:
            blocks = _blocks_of(tower)
            return encoder, [*reasons, *(block_ops_for(blocks)[1] if blocks is not None else [])]
    kind = describe_tower(tower)
    if _blocks_of(tower) is None:
        return None, [f"its vision tower {kind} is not a transformer with global self-attention"]
    return None, [
        f"its vision tower {kind} has blocks the V-V path does not know "
        f"({'; '.join(block_ops_for(_blocks_of(tower))[1]) or 'other attention'})"
    ]


def check_supported(visual: nn.Module, name: str = "backbone") -> TowerEncoder:
    """The encoder class for a built vision tower, or one clear error naming the model and the reason."""
    encoder, reasons = unsupported_reasons(visual)
    if reasons:
        raise AnovlError(
            f"{name} is not supported by the V-V path: {'; '.join(reasons)}; "
            "choose a ViT backbone such as ViT-B-16-plus-240 (docs/backbones.md lists them)"
        )
    assert encoder is not None  # no reasons: some encoder takes it
    return encoder


def meta_tower(config: dict[str, Any]) -> nn.Module:
    """The config's vision tower with shapes only (``meta`` tensors): nothing is allocated or loaded."""
    vision_cfg = dict(config["vision_cfg"])
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return _build_vision_tower(config["embed_dim"], vision_cfg, quick_gelu=config.get("quick_gelu", False))


def inspect_config(name: str, config: dict[str, Any]) -> int:
    """Check that ``name``'s vision tower runs the V-V path; return its patch size (pixels per token side)."""
    if isinstance(config["vision_cfg"].get("layers"), (list, tuple)):
        raise AnovlError(
            f"{name} is not supported by the V-V path: its vision tower is a ModifiedResNet "
            "(convolutional, no value projections per token); choose a ViT backbone such as "
            "ViT-B-16-plus-240 (docs/backbones.md lists them)"
        )
    try:
        tower = meta_tower(config)
    except Exception as error:  # timm/open_clip raise assorted types for configs they cannot build
        raise AnovlError(f"cannot build the vision tower of {name} ({describe_error(error)})") from None
    return check_supported(tower, name).patch_size_of(tower)
