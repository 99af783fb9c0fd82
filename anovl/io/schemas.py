"""Schemas (pydantic) of the JSON records anovl reads back: what :func:`anovl.io.reading.read_json`
validates. Booleans must be booleans, counts non-negative integers, thresholds finite numbers in [0, 1e6],
metrics finite percentages, sizes within limits, names non-empty and unique."""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

MAX_IMAGE_SIZE = 4096  # the largest model input an export may declare (in pixels per side)
MAX_EXPORT_CLASSES = 10_000


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _no_control(text: str) -> str:
    if any(not char.isprintable() for char in text):
        raise ValueError("must not contain control characters")
    return text


def _refuse_repeated(names: list[str], problem: str) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{problem}: {', '.join(map(repr, repeated))}")


# A threshold on a method's maps or scores: probabilities for AnoVL and WinCLIP, sums over blocks for APRIL-GAN
# and AnomalyCLIP (up to a few units), so non-negative and finite, bounded far above any method's range.
MAX_SCORE = 1e6
Score = Annotated[StrictFloat, AfterValidator(_finite), Field(ge=0.0, le=MAX_SCORE)]
Name = Annotated[StrictStr, Field(min_length=1, max_length=1000), AfterValidator(_no_control)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ThresholdPair(_Record):
    """The F1-max thresholds of one category (null where undefined)."""

    image: Optional[Score] = None
    pixel: Optional[Score] = None


class ThresholdsSection(_Record):
    categories: dict[StrictStr, ThresholdPair]
    mean: ThresholdPair


class ResultsThresholds(_Record):
    """The part of a results.json that ``predict --predictions.thresholds`` and ``export --thresholds`` read."""

    thresholds: ThresholdsSection


# A metric in percent (metric × 100), null where undefined (e.g. image AUROC without anomalous images).
Percent = Optional[Annotated[StrictFloat, Field(ge=0.0, le=100.0, allow_inf_nan=False)]]


class ResultsRow(BaseModel):
    """One category's row of a results.json: its name, image count and metrics (the names of
    :data:`anovl.results.ALL_METRIC_TITLES`; another name is refused, not dropped)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    category: Annotated[StrictStr, Field(min_length=1)]
    images: Annotated[StrictInt, Field(ge=0)]
    pixel_auroc: Percent = None
    pixel_ap: Percent = None
    pixel_f1max: Percent = None
    pixel_aupro: Percent = None
    image_auroc: Percent = None
    image_ap: Percent = None
    image_f1max: Percent = None
    pixel_aupro_cflow: Percent = None


class ResultsRecord(_Record):
    """A results.json as ``anovl test`` writes it and ``--resume`` / ``compare`` read it: the rows (each
    category once), the config as sections of settings, the skipped files and the thresholds. Other fields
    (``units``, ``columns``, ``mean``) are written for readers and recomputed, so they are not read."""

    title: StrictStr
    label: StrictStr
    random_weights: StrictBool
    complete: StrictBool = False
    categories: list[ResultsRow]
    config: Optional[dict[StrictStr, dict[StrictStr, Any]]] = None
    skipped_files: Optional[list[StrictStr]] = None
    thresholds: Optional[ThresholdsSection] = None

    @field_validator("categories")
    @classmethod
    def _each_category_once(cls, rows: list[ResultsRow]) -> list[ResultsRow]:
        _refuse_repeated([row.category for row in rows], "categories listed more than once")
        return rows


class GridState(_Record):
    """A grid cell's results.json as far as the grid reads it: only the boolean ``true`` means finished."""

    complete: StrictBool = False


class SidecarClass(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    category: Name
    prompt_name: Optional[Name] = None
    image_threshold: Optional[Score] = None
    pixel_threshold: Optional[Score] = None


class SidecarPreprocessing(_Record):
    image_size: Annotated[StrictInt, Field(ge=16, le=MAX_IMAGE_SIZE)]
    mean: Annotated[list[Annotated[StrictFloat, AfterValidator(_finite)]], Field(min_length=3, max_length=3)]
    std: Annotated[
        list[Annotated[StrictFloat, AfterValidator(_finite), Field(gt=0)]], Field(min_length=3, max_length=3)
    ]
    interpolation: StrictStr


class SidecarRecord(_Record):
    version: StrictInt
    format: StrictStr
    preprocessing: SidecarPreprocessing
    classes: Annotated[list[SidecarClass], Field(min_length=1, max_length=MAX_EXPORT_CLASSES)]
    num_views: Annotated[StrictInt, Field(ge=1, le=64)]
    label: StrictStr
    settings: dict[StrictStr, Any]
    # The largest map value (AnomalyModel.map_range); sidecars written before it was recorded held AnoVL's 1.
    map_range: Annotated[StrictFloat, AfterValidator(_finite), Field(gt=0.0, le=MAX_SCORE)] = 1.0

    def model_post_init(self, context: Any) -> None:
        _refuse_repeated([entry.category for entry in self.classes], "classes repeated")
