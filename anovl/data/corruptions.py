"""Synthetic corruptions of test images (the optional ``corrupted_image`` batch entry, a TTA corruption source).

Each image gets its own random stream, seeded from the datamodule seed and the image's path relative to the
dataset root, so a corrupted copy does not depend on data order, batch size or the number of workers.
The pipeline runs on the resized ``uint8 H×W×3`` image, before normalisation, in the order a camera would
degrade a picture: exposure (brightness/contrast), optics (blur), sensor (noise), storage (JPEG).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise checks PyPI for updates on import
import albumentations as A  # noqa: E402

from anovl.errors import AnovlError  # noqa: E402


@dataclass(frozen=True)
class CorruptionConfig:
    """Probability and strength of each corruption; ranges are sampled uniformly per image."""

    noise_p: float = 0.5
    noise_std_range: tuple[float, float] = (0.02, 0.08)  # Gaussian noise std as a fraction of 255
    blur_p: float = 0.5
    blur_sigma_range: tuple[float, float] = (0.5, 1.5)  # Gaussian blur sigma in pixels
    jpeg_p: float = 0.5
    jpeg_quality_range: tuple[int, int] = (30, 70)
    brightness_contrast_p: float = 0.5
    brightness_limit: float = 0.2  # brightness shift in [-limit, limit] of the full range
    contrast_limit: float = 0.2  # contrast factor in [1 - limit, 1 + limit]

    def __post_init__(self) -> None:
        for field in ("noise_p", "blur_p", "jpeg_p", "brightness_contrast_p"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise AnovlError(f"corruption {field}={getattr(self, field)} must be a probability in [0, 1]")
        for field, low_bound, high_bound in (
            ("noise_std_range", 0.0, 1.0),
            ("blur_sigma_range", 0.0, float("inf")),
            ("jpeg_quality_range", 1, 100),
        ):
            low, high = getattr(self, field)
            if not low_bound <= low <= high <= high_bound:
                raise AnovlError(
                    f"corruption {field}={(low, high)} must be (low, high) with {low_bound} <= low <= high <= {high_bound}"
                )
        for field in ("brightness_limit", "contrast_limit"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise AnovlError(f"corruption {field}={getattr(self, field)} must be in [0, 1]")


CORRUPTION_PRESETS: dict[str, CorruptionConfig] = {"default": CorruptionConfig()}

CorruptionSpec = str | dict[str, Any] | CorruptionConfig | None


def resolve_corruption(spec: CorruptionSpec) -> CorruptionConfig | None:
    """Turn a preset name, a dict of :class:`CorruptionConfig` fields or a config into a config (None: off)."""
    if spec is None or isinstance(spec, CorruptionConfig):
        return spec
    if isinstance(spec, str):
        if spec not in CORRUPTION_PRESETS:
            raise AnovlError(
                f"unknown corruption preset {spec!r}; choose one of {sorted(CORRUPTION_PRESETS)} or give a dict of settings"
            )
        return CORRUPTION_PRESETS[spec]
    if isinstance(spec, Mapping):
        known = {field.name for field in dataclasses.fields(CorruptionConfig)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise AnovlError(f"unknown corruption settings {unknown}; valid ones are {sorted(known)}")
        settings: dict[str, Any] = {
            name: tuple(value) if isinstance(value, list) else value for name, value in spec.items()
        }
        return CorruptionConfig(**settings)
    raise AnovlError(f"corruption must be a preset name, a dict of settings or None, not {type(spec).__name__}")


def image_seed(seed: int, key: str) -> int:
    """A 64-bit seed from the run seed and an image key, stable across processes (unlike ``hash``)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Corruptor:
    """Applies a :class:`CorruptionConfig` to ``uint8 H×W×3`` images, reproducibly per image key."""

    def __init__(self, config: CorruptionConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self._pipeline = A.Compose(
            [
                A.RandomBrightnessContrast(
                    brightness_limit=(-config.brightness_limit, config.brightness_limit),
                    contrast_limit=(-config.contrast_limit, config.contrast_limit),
                    p=config.brightness_contrast_p,
                ),
                A.GaussianBlur(blur_limit=0, sigma_limit=config.blur_sigma_range, p=config.blur_p),
                A.GaussNoise(std_range=config.noise_std_range, p=config.noise_p),
                A.ImageCompression(quality_range=config.jpeg_quality_range, p=config.jpeg_p),
            ]
        )

    def __call__(self, image: np.ndarray, key: str) -> np.ndarray:
        self._pipeline.set_random_seed(image_seed(self.seed, key))
        return self._pipeline(image=image)["image"]
