"""Build a frozen open_clip model by name, with weights by pretrained tag or local file."""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import warnings
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import open_clip
import torch
from open_clip import factory as open_clip_factory
from torch import nn

from anovl.backbones.registry import check_supported, describe_error, inspect_config
from anovl.backbones.tokenizers import Tokenizer, check_text_tower, resolve_tokenizer
from anovl.backbones.value_wise import ValueWiseViT
from anovl.errors import AnovlError
from anovl.registry import Registry

log = logging.getLogger(__name__)

_BUNDLED_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
open_clip.add_model_config(_BUNDLED_CONFIGS)


# The configs registered through anovl (open_clip's own and the bundled ones are in open_clip's table only).
MODEL_CONFIGS: Registry[str, dict[str, Any]] = Registry("model config", "anovl.register_model_config")


def register_model_config(config: dict[str, Any] | str | os.PathLike, name: str | None = None) -> str:
    """Make an open_clip model config available by name (a dict, or a JSON file named after the model).

    Returns the registered name, usable as ``AnoVL(backbone=name)``.
    """
    if isinstance(config, dict):
        if not name:
            raise ValueError("a name is needed to register a model config given as a dict")
        cfg = deepcopy(config)
    else:
        path = Path(config)
        if not path.is_file():
            raise AnovlError(f"model config file not found: {path}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise AnovlError(f"model config {path} is not valid JSON: {error}") from None
        name = name or path.stem
    if not all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise AnovlError(f"model config {name!r} needs the keys embed_dim, vision_cfg and text_cfg")
    MODEL_CONFIGS.register(name, cfg)
    # open_clip builds models only from its own table; its public add_model_config takes files, not dicts.
    open_clip_factory._MODEL_CONFIGS[name] = cfg
    return name


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or "/" in pretrained or pretrained.lower().endswith(WEIGHT_SUFFIXES)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _hash_parameters(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# What open_clip.create_model builds. open_clip ships no type information, so mypy sees these classes (and the
# attributes anovl uses, e.g. encode_text and visual) as Any.
OpenClipModel: TypeAlias = open_clip.CLIP | open_clip.CustomTextCLIP | open_clip.CoCa


@dataclass
class Backbone:
    """A frozen CLIP with its V-V visual encoder, tokenizer and a fingerprint of its weights."""

    clip: OpenClipModel
    visual: ValueWiseViT
    tokenizer: Tokenizer
    name: str
    image_size: int
    weights_fingerprint: str
    config_fingerprint: str | None = None  # of a config registered through anovl (a user's JSON), see below

    def refresh_fingerprint(self) -> None:
        """Fingerprint the weights the model holds now (after a ``load_state_dict``)."""
        self.weights_fingerprint = f"state-{_hash_parameters(self.clip)}"


def resolve_model_name(name: str) -> str:
    """An open_clip model name, a registered config's, or a model-config JSON path (registered on the way)."""
    if Path(name).suffix == ".json":
        return register_model_config(name)
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise AnovlError(f"unknown backbone {name!r}{hint}")
    return name


def _native_image_size(name: str) -> int:
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def create_backbone(
    name: str = "ViT-B-16-plus-240",
    pretrained: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    position_interpolation: str = "bicubic",
) -> Backbone:
    """Create a frozen, eval-mode CLIP with the V-V encoder of its vision tower (docs/backbones.md).

    ``pretrained``: an open_clip tag (downloaded by open_clip when online), a local weights file
    (state_dict ``.pt/.bin``, ``.safetensors`` or a checkpoint with a ``state_dict`` key), or None
    for random weights (only meaningful for tests). ``image_size`` may differ from the native size:
    positional embeddings are interpolated and the patch grid follows. ``tokenizer``: None for the
    model's own, or a local tokenizer directory / ``tokenizer.json`` (for towers whose tokenizer lives on
    the Hugging Face hub), or a callable texts → token ids. ``position_interpolation``: how loaded weights'
    positional embedding is resized to another ``image_size``: ``bicubic`` (open_clip's) or ``bilinear``
    (align_corners=False, as AnomalyCLIP's code does at its first forward; open_clip ViTs with a class token).

    Unsupported towers, missing packages and missing tokenizers stop here, before weights are built.
    """
    name = resolve_model_name(name)
    config = open_clip.get_model_config(name)
    patch_size = inspect_config(name, config)
    check_text_tower(name, config)
    image_size = image_size or _native_image_size(name)
    if image_size % patch_size:
        raise AnovlError(
            f"image_size {image_size} is not a multiple of the patch size {patch_size} of {name}; "
            f"use e.g. {max(patch_size, round(image_size / patch_size) * patch_size)}"
        )
    text_tokenizer = resolve_tokenizer(name, config, tokenizer)
    # pretrained_text=False: never fetch a Hugging Face text tower's own weights, the CLIP weights hold them
    if position_interpolation not in ("bicubic", "bilinear"):
        raise AnovlError(f"position_interpolation must be 'bicubic' or 'bilinear', got {position_interpolation!r}")
    native = _native_image_size(name)
    # Bilinear: load the weights at their own size, then resize the positions here.
    build_size = native if position_interpolation == "bilinear" and pretrained is not None else image_size
    kwargs = dict(force_image_size=build_size, device=device, weights_only=True, pretrained_text=False)
    if pretrained is None:
        warnings.warn(f"{name} has random weights: its anomaly scores mean nothing", stacklevel=2)
        clip = _build(name, kwargs)
        fingerprint = None
    elif _looks_like_path(pretrained) or Path(pretrained).exists():
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise AnovlError(f"weights file not found: {path}; give an existing file or an open_clip tag")
        clip = _load_local(name, path, kwargs)
        fingerprint = f"file-{_hash_file(path)}"
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise AnovlError(
                f"unknown pretrained tag {pretrained!r} for {name}; known tags: {', '.join(tags) or 'none'}, "
                "or give a local weights file"
            )
        try:
            clip = open_clip.create_model(name, pretrained=pretrained, **kwargs)
        except Exception as error:  # network / hub errors come in many types
            raise AnovlError(
                f"could not get {name} weights {pretrained!r} ({type(error).__name__}); when offline, "
                "download them elsewhere and pass the local file as pretrained"
            ) from error
        fingerprint = f"tag-{pretrained}"
    if build_size != image_size:
        _resize_positions_bilinear(clip.visual, image_size, name)
    clip.eval().requires_grad_(False)
    visual = check_supported(clip.visual, name)(clip.visual)
    if fingerprint is None:
        fingerprint = f"random-{_hash_parameters(clip)}"
    return Backbone(clip, visual, text_tokenizer, name, image_size, fingerprint, config_fingerprint(name))


def config_fingerprint(name: str) -> str | None:
    """A hash of the model config registered as ``name`` through :func:`register_model_config` (a user's JSON or
    dict), which a run records beside the name, so that another config under the same name is told apart; None
    for open_clip's and the bundled configs, which the name fixes."""
    if name not in MODEL_CONFIGS:
        return None
    return hashlib.sha256(json.dumps(MODEL_CONFIGS[name], sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def _resize_positions_bilinear(visual: nn.Module, image_size: int, name: str) -> None:
    """Resize an open_clip ViT's class-token positional embedding to ``image_size`` bilinearly (align_corners=False)."""
    positions = getattr(visual, "positional_embedding", None)
    if (
        not isinstance(visual, open_clip.transformer.VisionTransformer)
        or positions is None
        or positions.shape[0] != visual.grid_size[0] * visual.grid_size[1] + 1
    ):
        raise AnovlError(
            f"bilinear position interpolation needs an open_clip ViT with a class token; {name} "
            "has another vision tower (use position_interpolation='bicubic')"
        )
    grid = visual.grid_size
    side = image_size // visual.patch_size[0]
    width = positions.shape[1]
    patches = positions[1:].reshape(1, grid[0], grid[1], width).permute(0, 3, 1, 2)
    patches = nn.functional.interpolate(patches, (side, side), mode="bilinear")
    visual.positional_embedding = nn.Parameter(torch.cat([positions[:1], patches.reshape(width, -1).t()]))
    visual.grid_size, visual.image_size = (side, side), (image_size, image_size)


def _build(name: str, kwargs: dict, pretrained: str | None = None) -> OpenClipModel:
    """open_clip's model; a Hugging Face text tower whose config cannot be fetched gets one clear error."""
    hf_text = open_clip.get_model_config(name)["text_cfg"].get("hf_model_name")
    try:
        return open_clip.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as error:
        if not hf_text:
            raise
        raise AnovlError(
            f"the text tower of {name} is the Hugging Face model {hf_text!r}, whose config could not be loaded "
            f"({describe_error(error)}); when offline, save it to a directory and register a copy of the "
            "config whose text_cfg.hf_model_name is that directory (anovl.register_model_config)"
        ) from None


def _load_local(name: str, path: Path, kwargs: dict) -> OpenClipModel:
    # Read once on its own so a file that cannot be read and one that does not fit get different advice.
    try:
        open_clip_factory.load_state_dict(str(path), weights_only=True)
    except Exception as error:  # corrupt pickles, code-running pickles and bad safetensors raise assorted types
        raise AnovlError(
            f"cannot read weights file {path} ({describe_error(error)}); "
            "re-download it or save a plain state_dict with torch.save / safetensors"
        ) from None
    try:
        return _build(name, kwargs, str(path))
    except AnovlError:
        raise
    except Exception as error:
        raise AnovlError(
            f"weights file {path} does not fit backbone {name} ({describe_error(error)}); "
            "choose the backbone the weights were saved from"
        ) from None
