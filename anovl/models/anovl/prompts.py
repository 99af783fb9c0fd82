"""Domain-aware contrastive state prompts (METHOD §3), as overridable data."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from anovl.errors import AnovlError

NORMAL_STATES = (
    "normal {}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
)
ABNORMAL_STATES = (
    "damaged {}", "abnormal {}", "imperfect {}", "blemished {}",
    "{} with flaw", "{} with defect", "{} with damage",
)
# "{art}" is the article agreeing with the domain phrase ("an industrial photo", "a surface picture").
TEMPLATES = (
    "a cropped {domain} of the {}", "a cropped {domain} of a {}",
    "a close-up {domain} of a {}", "a close-up {domain} of the {}",
    "a bright {domain} of a {}", "a bright {domain} of the {}",
    "a dark {domain} of the {}", "a dark {domain} of a {}",
    "a jpeg corrupted {domain} of a {}", "a jpeg corrupted {domain} of the {}",
    "a blurry {domain} of the {}", "a blurry {domain} of a {}",
    "{art} {domain} of a {}", "{art} {domain} of the {}",
    "{art} {domain} of a small {}", "{art} {domain} of the small {}",
    "{art} {domain} of a large {}", "{art} {domain} of the large {}",
    "{art} {domain} of the {} for visual inspection", "{art} {domain} of a {} for visual inspection",
    "{art} {domain} of the {} for anomaly detection", "{art} {domain} of a {} for anomaly detection",
)
OBJECT_DOMAINS = ("industrial photo", "industrial image", "manufacturing image")
TEXTURE_DOMAINS = ("industrial photo", "textural photo", "surface picture")
TEXTURE_CATEGORIES = ("carpet", "leather", "grid", "tile", "wood")
DISPLAY_NAMES = {"macaroni1": "macaroni", "macaroni2": "macaroni"}


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


@dataclass(frozen=True)
class PromptSet:
    """Everything that decides the prompt sentences; the defaults are the reference set.

    ``display_names`` maps a category to the object name put in the sentences, ``domains`` maps a
    category to its own domain phrases (otherwise texture categories get the texture phrases).
    """

    normal_states: tuple[str, ...] = NORMAL_STATES
    abnormal_states: tuple[str, ...] = ABNORMAL_STATES
    templates: tuple[str, ...] = TEMPLATES
    object_domains: tuple[str, ...] = OBJECT_DOMAINS
    texture_domains: tuple[str, ...] = TEXTURE_DOMAINS
    texture_categories: tuple[str, ...] = TEXTURE_CATEGORIES
    display_names: dict[str, str] = field(default_factory=lambda: dict(DISPLAY_NAMES))
    domains: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("normal_states", "abnormal_states", "templates", "object_domains", "texture_domains",
                     "texture_categories"):
            value = getattr(self, name)
            if isinstance(value, str) or not value:
                raise AnovlError(f"prompt set: {name} must be a non-empty list of strings")
            object.__setattr__(self, name, tuple(value))
        for state in self.normal_states + self.abnormal_states:
            if state.count("{}") != 1:
                raise AnovlError(f"prompt state {state!r} must contain exactly one '{{}}' for the object name")
        for template in self.templates:
            if template.count("{}") != 1:
                raise AnovlError(f"prompt template {template!r} must contain exactly one '{{}}' for the state")
        object.__setattr__(self, "domains", {key: tuple(value) for key, value in self.domains.items()})

    def display_name(self, category: str) -> str:
        name = self.display_names.get(category, category).strip()
        if not name:
            raise AnovlError(f"empty class name for category {category!r}; set a display name for it")
        return name

    def domain_phrases(self, category: str) -> tuple[str, ...]:
        if category in self.domains:
            return self.domains[category]
        return self.texture_domains if category in self.texture_categories else self.object_domains

    def _sentences(self, category: str, states: tuple[str, ...]) -> list[str]:
        name = self.display_name(category)
        return [
            template.format(state.format(name), domain=domain, art=_article(domain))
            for domain in self.domain_phrases(category)
            for template in self.templates
            for state in states
        ]

    def normal_sentences(self, category: str) -> list[str]:
        return self._sentences(category, self.normal_states)

    def abnormal_sentences(self, category: str) -> list[str]:
        return self._sentences(category, self.abnormal_states)

    def fingerprint(self, category: str) -> str:
        """Changes whenever the sentences for ``category`` change."""
        payload = json.dumps([self.normal_sentences(category), self.abnormal_sentences(category)])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)
