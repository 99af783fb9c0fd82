"""The interface between a zero-shot anomaly-localisation method and the framework.

Any method that implements :class:`AnomalyModel` runs under the generic Lightning module
(:class:`~anovl.engine.AnomalyModule`) for ``anovl test`` and ``anovl predict``, with the same metrics,
results files, pictures, ``--resume`` and loggers as every other method. A method is a plain
``nn.Module`` that knows nothing of Lightning:

* ``forward(images, categories, prompt_names, ...) -> ModelOutput`` gives per-pixel maps and image
  scores. ``categories`` are the dataset's category names (which the metrics group by), ``prompt_names``
  the object names to put into text prompts (``anovl.categories`` maps one to the other). Batch entries
  named in :attr:`AnomalyModel.batch_extras` (e.g. ``corrupted_image``) are passed as keyword arguments.
* :attr:`AnomalyModel.image_size` and :meth:`AnomalyModel.preprocessing` say what input it expects; the
  CLI links the data's image size to it, so the size is written once.
* :attr:`AnomalyModel.label` names the run: the method plus what differs from its reference settings.
* :meth:`AnomalyModel.settings` is everything its numbers depend on; results.json records it and
  ``anovl test --resume`` refuses to continue a run whose settings differ.

**Methods trained on auxiliary data** (``anovl fit``; APRIL-GAN, AnomalyCLIP) return the part they train from
:meth:`AnomalyModel.trained_module` (heads, learned prompts) and give :meth:`AnomalyModel.training_losses` and
:meth:`AnomalyModel.configure_optimizer`. Only that part gets gradients and optimiser state, and a checkpoint
holds only its state dict (:mod:`anovl.models.checkpoints`); the frozen CLIP is never trained.

**Wide images** (VisA's tile mode, ``S×W`` with ``W > S``): unless :attr:`AnomalyModel.handles_wide_images`
is set, the framework cuts them into square tiles, runs the tiles and stitches the maps back
(:func:`~anovl.data.transforms.stitch_tiles`); the image score is the tiles' mean.

**Methods that need a whole category at once** (transductive methods such as MuSc, which score each image
against the other test images of its category) plug in through the same ``forward``: set
:attr:`AnomalyModel.transductive` and the framework would hand the model all images of a category in one
call. None is built yet; the generic module refuses such a model with a clear error until one is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from anovl.categories import category_info
from anovl.data.transforms import CLIP_MEAN, CLIP_STD
from anovl.errors import AnovlError


@dataclass
class ModelOutput:
    """What every method returns; methods subclass it to add their own extras (tokens, intermediate maps)."""

    anomaly_map: torch.Tensor  # (B, H, W) per-pixel anomaly score at the input's resolution
    pred_score: torch.Tensor  # (B,) image score


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a model: bilinear resize to ``image_size`` and normalisation."""

    image_size: int
    mean: tuple[float, ...] = CLIP_MEAN  # an exported model's sidecar may say otherwise (then refused)
    std: tuple[float, ...] = CLIP_STD
    interpolation: str = "bilinear"


class AnomalyModel(nn.Module):
    """Base class of zero-shot anomaly-localisation methods (see the module docstring)."""

    method: ClassVar[str] = ""  # display name of the method, e.g. "AnoVL"
    batch_extras: ClassVar[tuple[str, ...]] = ()  # optional batch keys passed to forward as keyword arguments
    handles_wide_images: ClassVar[bool] = False  # forward takes S×W images itself (else the framework tiles)
    transductive: ClassVar[bool] = False  # needs every image of a category in one call

    image_size: int

    def forward(
        self, images: torch.Tensor, categories: Sequence[str], prompt_names: Sequence[str] | None = None
    ) -> ModelOutput:
        # Methods add the batch_extras they name as keyword arguments with defaults.
        raise NotImplementedError

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_size)

    def settings(self) -> dict[str, Any]:
        """JSON-like settings that the model's maps and scores depend on (not caching, chunking or devices)."""
        raise NotImplementedError

    def reference_settings(self) -> dict[str, Any]:
        """The method's reference settings, of the same shape as :meth:`settings`; the label names what differs."""
        return {}

    @property
    def variant(self) -> str:
        """A short name of the method's variant (e.g. ``tfa``, ``tta-text``); empty for a method without any."""
        return ""

    @property
    def map_range(self) -> float:
        """The largest value the anomaly map can take: 1 for a map of probabilities; a method whose map sums
        several maps says so. Pictures that store map values (predict's 16-bit PNG) scale by it."""
        return 1.0

    @property
    def label(self) -> str:
        """The method, its variant and every setting that differs from the reference, e.g.
        ``AnoVL-tta-lowrank[lr=0.01,rank=4]``; two runs with different settings get different labels."""
        return make_label(
            self.method or type(self).__name__,
            self.variant,
            setting_differences(self.settings(), self.reference_settings()),
        )

    @property
    def order_dependent(self) -> bool:
        """True where results depend on the images seen before (such runs refuse DDP and ``--resume``)."""
        return False

    def check_inputs(
        self, images: torch.Tensor, categories: Sequence[str], prompt_names: Sequence[str] | None
    ) -> tuple[torch.Tensor, list[str]]:
        """Validate a forward's inputs, with one clear error for each kind of mistake. Returns the images as
        float32 (half, bfloat16 and double images are accepted) and the prompt names (see :func:`prompt_names_for`)."""
        check_image_batch(images)
        if images.device != self.device:
            raise AnovlError(
                f"images are on {images.device} but the model is on {self.device}; "
                "move them with images.to(model.device)"
            )
        height, width = images.shape[-2:]
        size = self.image_size
        if min(height, width) != size or not (height == width or self.handles_wide_images):
            expected = f"{size}×{size}" + (
                f" or longer on one side ({size}×W, H×{size})" if self.handles_wide_images else ""
            )
            raise AnovlError(
                f"images are {height}×{width} but the model expects {expected}; resize them "
                "(anovl.data.transforms) or set image_size"
            )
        prompt_names = prompt_names_for(categories, prompt_names)
        for what, names in (("category", categories), ("prompt name", prompt_names)):
            if len(names) != images.shape[0]:
                raise AnovlError(f"give one {what} per image ({images.shape[0]}), got {list(names)!r}")
            for name in names:
                if not isinstance(name, str) or not name.strip():
                    raise AnovlError(f"{what}s must be non-empty strings, got {name!r}")
        return images.float(), prompt_names

    def start_category(self, category: str) -> None:
        """Called before the first images of each category (state carried within a category resets here)."""

    @property
    def scores_need_category(self) -> bool:
        """True where an image's final score depends on its whole category (:meth:`category_scores`)."""
        return False

    def category_scores(self, scores: torch.Tensor, map_maxima: torch.Tensor) -> torch.Tensor:
        """The final image scores of one whole category from its images' ``forward`` scores and anomaly-map
        maxima (both (N,), in any order: the result must not depend on it). Called only where
        :attr:`scores_need_category`; the framework holds a category's outputs until then."""
        return scores

    # ----------------------------------------------------------------- training (anovl fit)

    def trained_module(self) -> nn.Module | None:
        """The part that ``anovl fit`` trains (its parameters and its state dict); None: training-free."""
        return None

    def training_losses(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        categories: Sequence[str],
        prompt_names: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss terms of a batch of labelled images (``masks`` B×S×S in {0, 1}); ``fit`` minimises their
        sum and logs each term. Gradients must reach only :meth:`trained_module`'s parameters."""
        raise NotImplementedError(f"{type(self).__name__} declares a trained module but no training_losses")

    def configure_optimizer(self, parameters: Any) -> torch.optim.Optimizer:
        """The method's published optimiser over ``parameters`` (the trained module's)."""
        raise NotImplementedError(f"{type(self).__name__} declares a trained module but no configure_optimizer")

    def training_settings(self) -> dict[str, Any]:
        """JSON-like training settings (optimiser, learning rate) that checkpoints record."""
        return {}

    def foreign_trained_state(self, data: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The trained module's state dict from a checkpoint in the method's authors' format (None: not one)."""
        return None

    @property
    def device(self) -> torch.device:
        for tensor in [*self.parameters(), *self.buffers()]:
            return tensor.device
        return torch.device("cpu")


def prompt_names_for(categories: Sequence[str], prompt_names: Sequence[str] | None) -> list[str]:
    """The prompt names of a batch: as given, or :mod:`anovl.categories`' names for the categories."""
    if isinstance(categories, str):
        raise AnovlError(f"give a list of categories, one per image, not the string {categories!r}")
    if prompt_names is None:
        return [
            category_info(category).prompt_name if isinstance(category, str) else category for category in categories
        ]
    if isinstance(prompt_names, str):
        raise AnovlError(f"give a list of prompt names, one per image, not the string {prompt_names!r}")
    return list(prompt_names)


def json_data(value: Any) -> Any:
    """``value`` as its JSON round trip gives it back (tuples as lists), so that settings compare equal to what
    results.json and the run records hold."""
    return json.loads(json.dumps(value))


def _flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(settings, dict):
        flat: dict[str, Any] = {}
        for key, value in settings.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): settings}


def short_value(value: Any) -> str:
    """A setting's value as it appears in a label: lists joined by commas, long values as a short hash."""
    if isinstance(value, (list, tuple)):
        text = ",".join(short_value(item) for item in value)
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    if len(text) > 24 or any(char in text for char in "[]= "):
        return "#" + hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return text


def setting_differences(settings: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Flattened ``key: value`` of every setting that differs from the reference (keys as short as unique)."""
    flat, flat_reference = _flatten(json_data(settings)), _flatten(json_data(reference))
    changed = {key: value for key, value in flat.items() if key not in flat_reference or flat_reference[key] != value}
    for key in flat_reference:
        if key not in flat and not any(other.startswith(f"{key}.") or key.startswith(f"{other}.") for other in flat):
            changed[key] = None
    short: dict[str, Any] = {}
    for key, value in changed.items():
        parts = key.split(".")
        # The last part of the key, or more of it where two changed keys end alike.
        for size in range(1, len(parts) + 1):
            name = ".".join(parts[-size:])
            if sum(other.endswith(name) and (other == name or other.endswith("." + name)) for other in changed) == 1:
                break
        short[name] = value
    return dict(sorted(short.items()))


def make_label(method: str, variant: str, differences: dict[str, Any]) -> str:
    label = f"{method}-{variant}" if variant else method
    if differences:
        label += "[" + ";".join(f"{key}={short_value(value)}" for key, value in differences.items()) + "]"
    return label


def check_image_batch(images: Any) -> None:
    """What every model refuses in a batch of images (AnoVL, an exported model): not a B×3×H×W tensor, an empty
    batch, or images that are not normalised floats (uint8 pixels, say)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise AnovlError(f"images must be a B×3×S×S tensor, got {tuple(getattr(images, 'shape', ())) or type(images)}")
    if images.shape[0] == 0:
        raise AnovlError("the batch is empty; give at least one image")
    if not images.is_floating_point():
        raise AnovlError(
            f"images must be CLIP-normalised float tensors, got {images.dtype}; prepare them with "
            "anovl.data.transforms (resize_image, then normalize)"
        )


def check_label(label: str) -> str:
    """A user-given run label: non-empty, one line, no path separators or control characters (it names W&B
    runs, columns and folders, and is printed)."""
    if (
        not isinstance(label, str)
        or not label.strip()
        or any(char in label for char in "/\\")
        or not label.isprintable()
    ):
        raise AnovlError(f"label {label!r} must be a non-empty line without '/', '\\' or control characters")
    return label.strip()
