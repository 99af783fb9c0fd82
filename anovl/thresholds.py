"""Decision thresholds for ``anovl predict``: an image threshold (is the image anomalous?) and a pixel threshold
(which pixels are?), both applied as ``value >= threshold``. They come from one of:

* a labelled ``anovl test`` run: the F1-max thresholds saved in its results.json, those of the same category
  when the run has it, else the mean over the run's categories;
* values the user gives;
* a quantile of known-normal images: of their image scores, and of all pixels of their maps (at the model's
  resolution); quantile 0.99 flags about 1% of normal images and of normal pixels.

Values the user gives win over the other two sources, threshold by threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from anovl.errors import AnovlError
from anovl.io import read_text, validate
from anovl.io.reading import parse_json
from anovl.io.schemas import MAX_SCORE, ResultsThresholds


@dataclass(frozen=True)
class Thresholds:
    """The thresholds used for one category, and where they come from (a sentence for thresholds.json)."""

    image: float | None = None
    pixel: float | None = None
    source: str = "none"

    def with_given(self, image: float | None, pixel: float | None) -> Thresholds:
        """These thresholds with the user's values in place of theirs."""
        if image is None and pixel is None:
            return self
        given = ", ".join(
            f"{kind} {value}" for kind, value in (("image", image), ("pixel", pixel)) if value is not None
        )
        return replace(
            self,
            image=self.image if image is None else image,
            pixel=self.pixel if pixel is None else pixel,
            source=f"given ({given})" + ("" if self.source == "none" else f"; otherwise {self.source}"),
        )

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.image, "pixel": self.pixel, "source": self.source}


def check_threshold(name: str, value: float | None) -> float | None:
    """A threshold the user gave: None, or a number in [0, MAX_SCORE] (probabilities for most methods; sums over
    blocks, up to a few units, for APRIL-GAN and AnomalyCLIP)."""
    if value is not None and (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and 0.0 <= value <= MAX_SCORE)
    ):
        raise AnovlError(
            f"{name} must be a number in [0, {MAX_SCORE:g}] (a method's maps and scores: probabilities, "
            f"or sums over blocks), got {value!r}"
        )
    return None if value is None else float(value)


def check_quantile(quantile: float) -> float:
    if not (isinstance(quantile, (int, float)) and 0.0 < quantile < 1.0):
        raise AnovlError(f"predictions.quantile must be between 0 and 1 (e.g. 0.99), got {quantile!r}")
    return float(quantile)


class RunThresholds:
    """The F1-max thresholds that ``anovl test`` saved in a results.json: per category, and their mean."""

    def __init__(
        self, path: Path, categories: Mapping[str, Mapping[str, float | None]], mean: Mapping[str, float | None]
    ):
        self.path = path
        self.categories = {category: dict(values) for category, values in categories.items()}
        self.mean = dict(mean)

    @classmethod
    def read(cls, location: str | Path, option: str = "predictions.thresholds") -> RunThresholds:
        """From a results.json, or the run folder that holds it; ``option`` names where it was given, in errors."""
        path = Path(location).expanduser()
        if path.is_dir():
            path = path / "results.json"
        if not path.is_file():
            raise AnovlError(
                f"{option}: {path} not found; give the results.json of a labelled "
                "`anovl test` run (runs/<name>/version_N/results.json)"
            )
        document = parse_json(read_text(path, f"{option}:"), f"{option}: {path}")
        if not isinstance(document, dict) or "thresholds" not in document:
            raise AnovlError(
                f"{option}: {path} holds no F1-max thresholds (written by `anovl test` "
                "on labelled data since anovl saves them); run `anovl test` on labelled images first, "
                "or give --predictions.image_threshold / --predictions.pixel_threshold"
            )
        section = validate(document, ResultsThresholds, f"{option}: {path}").thresholds
        return cls(
            path,
            {category: pair.model_dump() for category, pair in section.categories.items()},
            section.mean.model_dump(),
        )

    def for_category(self, category: str) -> Thresholds:
        """The category's thresholds if the run has them (each one defined), else the run's mean."""
        own = self.categories.get(category, {})
        values, origins = {}, []
        for kind in ("image", "pixel"):
            if own.get(kind) is not None:
                values[kind] = own[kind]
                origins.append(f"{kind}: category {category}")
            else:
                values[kind] = self.mean.get(kind)
                origins.append(f"{kind}: mean over the run's categories")
        if values["image"] is None and values["pixel"] is None:
            raise AnovlError(
                f"predictions.thresholds: {self.path} has no defined threshold (its categories lack "
                "normal or anomalous images); give --predictions.image_threshold / pixel_threshold"
            )
        return Thresholds(values["image"], values["pixel"], f"F1-max of {self.path} ({'; '.join(origins)})")


def quantile_thresholds(image_scores: np.ndarray, pixel_values: np.ndarray, quantile: float, source: str) -> Thresholds:
    """Thresholds at a quantile of normal images' scores and of their map pixels (NumPy's linear method)."""
    if image_scores.size == 0:
        raise AnovlError(f"no normal images to compute thresholds from ({source})")
    return Thresholds(
        float(np.quantile(image_scores, quantile)),
        float(np.quantile(pixel_values, quantile)),
        f"quantile {quantile} of {image_scores.size} normal images ({source})",
    )
