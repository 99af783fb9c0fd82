"""The prompt base: one sentence API for every method's text prompts.

A method's prompts are data (a frozen dataclass recorded in its settings) that turn an object name and a
domain (``object`` or ``texture``, :mod:`anovl.categories`) into normal and abnormal sentences. Methods ask
only through :meth:`Prompts.sentences`; :class:`~anovl.models.components.text.TextStates` encodes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from anovl import categories
from anovl.errors import AnovlError


class Prompts:
    """Base of prompt sets: subclasses implement :meth:`normal_sentences`, :meth:`abnormal_sentences` and
    :meth:`to_dict` (what the method's settings record)."""

    def normal_sentences(self, prompt_name: str, domain: str = categories.OBJECT) -> list[str]:
        raise NotImplementedError

    def abnormal_sentences(self, prompt_name: str, domain: str = categories.OBJECT) -> list[str]:
        raise NotImplementedError

    def sentences(self, prompt_name: str, domain: str = categories.OBJECT) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(normal, abnormal) sentences naming ``prompt_name`` in ``domain``."""
        return tuple(self.normal_sentences(prompt_name, domain)), tuple(self.abnormal_sentences(prompt_name, domain))

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


def check_prompt_name(prompt_name: str) -> str:
    """The object name to put into the sentences, stripped; an empty one is an error."""
    name = prompt_name.strip()
    if not name:
        raise AnovlError("empty prompt name; give the object name to put into the prompts")
    return name


def check_texts(owner: str, name: str, value: Any, placeholder_for: str) -> tuple[str, ...]:
    """A non-empty list of strings, each with exactly one ``{}`` (for ``placeholder_for``), as a tuple."""
    if isinstance(value, str) or not value:
        raise AnovlError(f"{owner}: {name} must be a non-empty list of strings")
    for text in value:
        if not isinstance(text, str) or text.count("{}") != 1:
            raise AnovlError(f"{owner}: {name} entry {text!r} must contain exactly one '{{}}' for {placeholder_for}")
    return tuple(value)


@dataclass(frozen=True)
class EnsemblePrompts(Prompts):
    """A compositional prompt ensemble without domain phrases (WinCLIP's, APRIL-GAN's): every template around every
    state. Subclasses give the lists as defaults. The abnormal states keep anomalib's name, ``anomalous_states``,
    which configs and recorded settings use; the domain is unused."""

    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]

    def __post_init__(self) -> None:
        for name, placeholder_for in (
            ("normal_states", "the object name"),
            ("anomalous_states", "the object name"),
            ("templates", "the state"),
        ):
            object.__setattr__(self, name, check_texts(type(self).__name__, name, getattr(self, name), placeholder_for))

    def _sentences(self, prompt_name: str, states: tuple[str, ...]) -> list[str]:
        name = check_prompt_name(prompt_name)
        # State-major order, as anomalib and the APRIL-GAN authors build it, so that float means match to the last bit.
        return [template.format(state.format(name)) for state in states for template in self.templates]

    def normal_sentences(self, prompt_name: str, domain: str = categories.OBJECT) -> list[str]:
        return self._sentences(prompt_name, self.normal_states)

    def abnormal_sentences(self, prompt_name: str, domain: str = categories.OBJECT) -> list[str]:
        return self._sentences(prompt_name, self.anomalous_states)

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) for key, value in asdict(self).items()}
