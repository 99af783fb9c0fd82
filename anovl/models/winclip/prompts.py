"""WinCLIP's compositional prompt ensemble: the state and template lists anomalib 2.7.0 uses.

Unlike AnoVL's prompts (docs/METHOD.md §3) it has no domain phrases, and the state embedding is the mean of the
unnormalised sentence embeddings (normalised only when scored).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from anovl.errors import AnovlError

NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
# The repeated "jpeg corrupted" template is anomalib's: it counts twice in the mean.
TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.",
    "a photo of a small {}.", "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)


@dataclass(frozen=True)
class WinCLIPPrompts:
    """Everything that decides WinCLIP's sentences; the defaults are anomalib's ensemble."""

    normal_states: tuple[str, ...] = NORMAL_STATES
    anomalous_states: tuple[str, ...] = ANOMALOUS_STATES
    templates: tuple[str, ...] = TEMPLATES

    def __post_init__(self) -> None:
        for name in ("normal_states", "anomalous_states", "templates"):
            value = getattr(self, name)
            if isinstance(value, str) or not value:
                raise AnovlError(f"{type(self).__name__}: {name} must be a non-empty list of strings")
            for text in value:
                if not isinstance(text, str) or text.count("{}") != 1:
                    raise AnovlError(f"{type(self).__name__}: {name} entry {text!r} must contain exactly one '{{}}'")
            object.__setattr__(self, name, tuple(value))

    def _sentences(self, prompt_name: str, states: tuple[str, ...]) -> list[str]:
        name = prompt_name.strip()
        if not name:
            raise AnovlError("empty prompt name; give the object name to put into the prompts")
        # State-major order, as anomalib builds it, so that the float mean matches to the last bit.
        return [template.format(state.format(name)) for state in states for template in self.templates]

    def normal_sentences(self, prompt_name: str) -> list[str]:
        return self._sentences(prompt_name, self.normal_states)

    def anomalous_sentences(self, prompt_name: str) -> list[str]:
        return self._sentences(prompt_name, self.anomalous_states)

    def to_dict(self) -> dict:
        return {key: list(value) for key, value in asdict(self).items()}
