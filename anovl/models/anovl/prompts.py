"""Domain-aware contrastive state prompts (docs/METHOD.md §3), as overridable data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from anovl import categories
from anovl.errors import AnovlError
from anovl.models.components.prompts import Prompts, check_prompt_name, check_texts

NORMAL_STATES = (
    "normal {}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = (
    "damaged {}",
    "abnormal {}",
    "imperfect {}",
    "blemished {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
# "{art}" is the article agreeing with the domain phrase ("an industrial photo", "a surface picture").
TEMPLATES = (
    "a cropped {domain} of the {}",
    "a cropped {domain} of a {}",
    "a close-up {domain} of a {}",
    "a close-up {domain} of the {}",
    "a bright {domain} of a {}",
    "a bright {domain} of the {}",
    "a dark {domain} of the {}",
    "a dark {domain} of a {}",
    "a jpeg corrupted {domain} of a {}",
    "a jpeg corrupted {domain} of the {}",
    "a blurry {domain} of the {}",
    "a blurry {domain} of a {}",
    "{art} {domain} of a {}",
    "{art} {domain} of the {}",
    "{art} {domain} of a small {}",
    "{art} {domain} of the small {}",
    "{art} {domain} of a large {}",
    "{art} {domain} of the large {}",
    "{art} {domain} of the {} for visual inspection",
    "{art} {domain} of a {} for visual inspection",
    "{art} {domain} of the {} for anomaly detection",
    "{art} {domain} of a {} for anomaly detection",
)
OBJECT_DOMAINS = ("industrial photo", "industrial image", "manufacturing image")
TEXTURE_DOMAINS = ("industrial photo", "textural photo", "surface picture")


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


@dataclass(frozen=True)
class PromptSet(Prompts):
    """Everything that decides the prompt sentences; the defaults are the reference set.

    ``domains`` maps a domain (``anovl.categories`` gives each category one: ``object`` or ``texture``) to
    its phrases; add a domain here and give categories that domain with
    :func:`anovl.categories.register_category`.
    """

    normal_states: tuple[str, ...] = NORMAL_STATES
    abnormal_states: tuple[str, ...] = ABNORMAL_STATES
    templates: tuple[str, ...] = TEMPLATES
    domains: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {categories.OBJECT: OBJECT_DOMAINS, categories.TEXTURE: TEXTURE_DOMAINS}
    )

    def __post_init__(self) -> None:
        for name, placeholder_for in (
            ("normal_states", "the object name"),
            ("abnormal_states", "the object name"),
            ("templates", "the state"),
        ):
            object.__setattr__(self, name, check_texts("prompt set", name, getattr(self, name), placeholder_for))
        for domain, phrases in self.domains.items():
            if isinstance(phrases, str) or not phrases:
                raise AnovlError(f"prompt set: domains[{domain!r}] must be a non-empty list of phrases")
        object.__setattr__(self, "domains", {key: tuple(value) for key, value in self.domains.items()})

    def domain_phrases(self, domain: str) -> tuple[str, ...]:
        if domain not in self.domains:
            raise AnovlError(
                f"no prompt phrases for the domain {domain!r}; the prompt set has "
                f"{', '.join(sorted(self.domains))} (add it to the prompt set's domains)"
            )
        return self.domains[domain]

    def _sentences(self, prompt_name: str, domain: str, states: tuple[str, ...]) -> list[str]:
        name = check_prompt_name(prompt_name)
        return [
            template.format(state.format(name), domain=phrase, art=_article(phrase))
            for phrase in self.domain_phrases(domain)
            for template in self.templates
            for state in states
        ]

    def normal_sentences(self, prompt_name: str, domain: str = categories.OBJECT) -> list[str]:
        return self._sentences(prompt_name, domain, self.normal_states)

    def abnormal_sentences(self, prompt_name: str, domain: str = categories.OBJECT) -> list[str]:
        return self._sentences(prompt_name, domain, self.abnormal_states)

    def to_dict(self) -> dict:
        return asdict(self)
