"""WinCLIP's compositional prompt ensemble: the state and template lists anomalib 2.7.0 uses.

Unlike AnoVL's prompts (docs/METHOD.md §3) it has no domain phrases, and the state embedding is the mean of the
unnormalised sentence embeddings (normalised only when scored).
"""

from __future__ import annotations

from dataclasses import dataclass

from anovl.models.components.prompts import EnsemblePrompts

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
# The repeated "jpeg corrupted" template is anomalib's: it counts twice in the mean.
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


@dataclass(frozen=True)
class WinCLIPPrompts(EnsemblePrompts):
    """Everything that decides WinCLIP's sentences; the defaults are anomalib's ensemble."""

    normal_states: tuple[str, ...] = NORMAL_STATES
    anomalous_states: tuple[str, ...] = ANOMALOUS_STATES
    templates: tuple[str, ...] = TEMPLATES
