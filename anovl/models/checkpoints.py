"""Checkpoints of methods trained on auxiliary data (``anovl fit``): only the trained part, plus what it depends on.

``fit`` writes Lightning checkpoints whose ``state_dict`` holds only the trained module's tensors (the frozen
CLIP is rebuilt from its settings) and whose ``anovl`` entry records the method (its registered name), backbone and
settings. The same file loads into a plain model (a model argument such as ``AprilGAN(checkpoint=...)``) and into
``anovl test --ckpt_path``; a checkpoint of another method or backbone is refused, naming both. A method may
also read its authors' release format (:meth:`~anovl.models.base.AnomalyModel.foreign_trained_state`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anovl.errors import AnovlError
from anovl.models.base import AnomalyModel, json_data
from anovl.models.registry import method_record

METADATA_KEY = "anovl"
MODEL_PREFIX = "model."  # where AnomalyModule keeps the method: its state-dict keys start with it
MAX_CHECKPOINT_BYTES = 4 << 30  # heads and learned prompts are megabytes; a CLIP-sized file is not one of ours
# Settings that name what the trained weights fit: another value makes them meaningless.
COMPATIBILITY_KEYS = ("backbone", "image_size", "layers")


def trained_module(model: AnomalyModel) -> nn.Module:
    """The model's trained module; one clear error for a training-free method."""
    module = model.trained_module()
    if module is None:
        raise AnovlError(
            f"{model.method or type(model).__name__} is training-free (it declares no trained module); "
            "fit trains methods such as anovl.models.AprilGAN"
        )
    return module


def trained_prefix(model: AnomalyModel) -> str:
    """The state-dict prefix of the model's trained module inside the model (e.g. ``heads.``)."""
    module = trained_module(model)
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise AnovlError(f"{type(model).__name__}.trained_module() is not a submodule of the model")


def checkpoint_metadata(model: AnomalyModel) -> dict[str, Any]:
    settings = model.settings()
    # The registered name (or class path) identifies the method, so that moving its file keeps checkpoints valid.
    return json_data(
        {
            "method": model.method or type(model).__name__,
            "record": method_record(model),
            "settings": {key: settings.get(key) for key in COMPATIBILITY_KEYS if key in settings},
            "training": model.training_settings(),
            "trained_prefix": trained_prefix(model),
        }
    )


def _describe(method: str, settings: dict[str, Any]) -> str:
    return f"{method} on {settings.get('backbone')}" + "".join(
        f", {key} {settings[key]}" for key in COMPATIBILITY_KEYS[1:] if key in settings
    )


def check_compatible(metadata: Any, model: AnomalyModel, source: str) -> None:
    """Refuse, in one line naming both, a checkpoint of another method, backbone, size or block selection."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("settings"), dict):
        raise AnovlError(f"{source} is not a checkpoint written by anovl fit (no '{METADATA_KEY}' record)")
    ours = checkpoint_metadata(model)
    theirs_settings = {key: metadata["settings"].get(key) for key in ours["settings"]}
    if metadata.get("record") != ours["record"] or theirs_settings != ours["settings"]:
        raise AnovlError(
            f"{source} is a checkpoint of {_describe(str(metadata.get('method')), metadata['settings'])}; "
            f"it cannot be loaded into {_describe(ours['method'], ours['settings'])}"
        )


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint file's contents (tensors and plain data only), or one clear error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AnovlError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise AnovlError(f"{path} is {size >> 20} MiB, too large for a checkpoint of trained heads or prompts")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated zips, bad pickles and code-running pickles differ in type
        raise AnovlError(
            f"cannot read checkpoint {path}: it is corrupt, truncated or not a weights file ({type(error).__name__})"
        ) from None
    if not isinstance(data, dict):
        raise AnovlError(f"{path} holds a {type(data).__name__}, not a checkpoint")
    return data


def load_trained_state(model: AnomalyModel, state: dict[str, Any], source: str) -> None:
    """Load the trained module's tensors (keys relative to it); one error for missing, extra or misshapen ones."""
    module = trained_module(model)
    expected = module.state_dict()
    if set(state) != set(expected) or any(
        not isinstance(state[key], torch.Tensor) or state[key].shape != value.shape for key, value in expected.items()
    ):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = sorted(
            key
            for key in set(state) & set(expected)
            if not isinstance(state[key], torch.Tensor) or state[key].shape != expected[key].shape
        )
        raise AnovlError(
            f"{source} does not fit {model.method}'s trained part: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}, other shapes {wrong or 'none'}"
        )
    module.load_state_dict(state)


def lightning_trained_state(model: AnomalyModel, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The trained module's part of a checkpoint's ``state_dict`` (keys as AnomalyModule saves them)."""
    prefix = MODEL_PREFIX + trained_prefix(model)
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def load_trained_weights(model: AnomalyModel, path: str | os.PathLike) -> None:
    """Load an ``anovl fit`` checkpoint, or the method's authors' release format, into ``model``."""
    data = read_checkpoint(path)
    if METADATA_KEY in data:
        check_compatible(data[METADATA_KEY], model, str(path))
        state_dict = data.get("state_dict")
        if not isinstance(state_dict, dict):
            raise AnovlError(f"{path} has no state_dict; it is damaged")
        load_trained_state(model, lightning_trained_state(model, state_dict), str(path))
        return
    foreign = model.foreign_trained_state(data)
    if foreign is None:
        raise AnovlError(
            f"{path} is neither a checkpoint written by anovl fit nor a release of {model.method}'s authors"
        )
    load_trained_state(model, foreign, str(path))
