"""Reading anovl configs, one way for every command: ``anovl test`` / ``anovl predict`` (jsonargparse reads their
``--config`` files through :func:`with_class_paths`) and ``anovl export`` (:func:`read_config`).

A config is a YAML mapping. A registered method's name stands for its class wherever a config names the model:
``model: anovl``, ``model: {class_path: winclip, init_args: ...}`` (:mod:`anovl.models.registry`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anovl.errors import AnovlError
from anovl.io import parse_yaml, read_yaml

CONFIG_OPTIONS = ("-c", "--config")


def read_yaml_mapping(path: str | os.PathLike, what: str, holds: str) -> dict[str, Any]:
    """The YAML mapping in the file ``path``; one clear error, naming it as ``what`` (``config file``, ``grid
    file``) and saying what it ``holds``, for a missing file, YAML that does not parse, or another document."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AnovlError(f"{what} not found: {path}")
    document = read_yaml(path, what)  # bounded, repeated keys refused (anovl.io)
    if not isinstance(document, dict):
        raise AnovlError(f"{what} {path} must be a mapping with {holds}")
    return document


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config file at ``path`` as data, with method names resolved."""
    return with_class_paths(read_yaml_mapping(path, "config file", "sections such as model: and data:"))


def method_path(value: Any, strict: bool = True) -> Any:
    """The class path of a registered method name; with ``strict``, a lower-case word that names none is an unknown
    method (class paths have dots, class names capitals); anything else is left as it is."""
    from anovl.models.registry import METHODS, class_path  # torch: only where a config names a method

    if isinstance(value, str) and "." not in value and value.islower() and (strict or value in METHODS):
        return class_path(METHODS.lookup(value))
    return value


def with_class_paths(document: Any) -> Any:
    """A config document with method names (``model: anovl``, ``model: {class_path: winclip}``) replaced by their
    class paths, which is what jsonargparse resolves."""
    if not isinstance(document, dict):
        return document
    document = dict(document)
    model = document.get("model")
    if isinstance(model, dict) and "class_path" in model:
        document["model"] = {**model, "class_path": method_path(model["class_path"])}
    elif "model" in document:
        document["model"] = method_path(model)
    if "class_path" in document:  # a --model value given as a mapping (or another class's, left alone)
        document["class_path"] = method_path(document["class_path"], strict=False)
    return document


def option_values(command_line: list[str]) -> Iterator[tuple[str, str]]:
    """Each option of a command line with the value after it: ``--option value`` or ``--option=value``."""
    for index, argument in enumerate(command_line):
        option, equals, inline = argument.partition("=")
        if equals:
            yield option, inline
        elif index + 1 < len(command_line):
            yield option, command_line[index + 1]


def config_document(value: str) -> Any:
    """The YAML document a ``--config`` value gives: a file's content, read by anovl's bounded reader (a key
    given twice, which the parser would drop silently, is one error line), or the value itself (inline YAML, as
    ``anovl grid`` passes a variant's mapping; None where it is not YAML: the CLI's parser reports that)."""
    try:
        is_file = Path(value).is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        is_file = False
    if is_file:
        return read_yaml(value, "config file")
    try:
        return parse_yaml(value, "--config")
    except AnovlError:
        return None


@dataclass(frozen=True)
class ClassChosen:
    """An option chose the model's class: ``class_path`` as given (a method name or class path; whatever YAML
    gives, e.g. None for ``class_path: null``, which the parser then reports)."""

    class_path: Any


@dataclass(frozen=True)
class SettingGiven:
    """An option gave the model setting ``name`` (``--model.init_args.NAME``, ``--model.NAME``, ``init_args``)."""

    name: Any


@dataclass(frozen=True)
class OtherModelOption:
    """An option about the model that neither chooses a class nor names a setting (``--model.help``, ``model:``
    null or without class and settings, ``--model .init_args.NAME VALUE``): it still comes before any later
    choice, so a class chosen after it is not chosen first."""

    option: str


ModelEvent = ClassChosen | SettingGiven | OtherModelOption


def _model_value_events(model: Any) -> list[ModelEvent]:
    """What a ``--model`` value or a config's ``model:`` gives: a name or class path chooses a class (a value
    starting with ``.`` does not); a mapping its ``class_path``, then the keys of its ``init_args``."""
    if isinstance(model, str) and not model.startswith("."):
        return [ClassChosen(model)]
    if not isinstance(model, dict):
        return []
    events: list[ModelEvent] = [ClassChosen(model["class_path"])] if "class_path" in model else []
    settings = model.get("init_args")
    return events + [SettingGiven(name) for name in (settings if isinstance(settings, dict) else ())]


def model_events(command_line: list[str]) -> Iterator[ModelEvent]:
    """What a command line's options say about the model, in order: every option about it (``--config`` with a
    ``model:`` key, file or inline; ``--model``; ``--model.class_path``; ``--model.NAME``; ``--model.help``)
    gives one or more events, :class:`OtherModelOption` where it gives no other. Lazy: a ``--config`` file is
    read when the walk reaches it."""
    for option, value in option_values(command_line):
        if option in CONFIG_OPTIONS:
            document = config_document(value)
            if not (isinstance(document, dict) and "model" in document):
                continue
            events = _model_value_events(document["model"])
        elif option == "--model":
            events = _model_value_events(config_document(value))
        elif option == "--model.class_path":
            events = [ClassChosen(value)]
        elif option == "--model.help":
            events = []
        elif option.startswith("--model."):
            events = [SettingGiven(option.removeprefix("--model.").removeprefix("init_args.").split(".")[0])]
        else:
            continue
        yield from events or [OtherModelOption(option)]


def model_settings_by_class(command_line: list[str]) -> dict[str, str | None]:
    """Each model setting a command line gives (``--model.init_args.NAME``, a ``--config``'s or ``--model``'s
    ``init_args``), with the class chosen when it was last given (None before any). jsonargparse carries a given
    setting over to a class chosen later where that class takes it, and drops it where not: the CLI names both."""
    chosen: str | None = None
    given: dict[str, str | None] = {}
    for event in model_events(command_line):
        if isinstance(event, ClassChosen):
            chosen = event.class_path
        elif isinstance(event, SettingGiven):
            given[event.name] = chosen
    return given


def chooses_model_first(command_line: list[str]) -> bool:
    """Whether the first option of a command line about the model chooses its class: ``--model.class_path``,
    ``--model`` with a name, class path or mapping holding ``class_path`` (not ``--model .init_args.NAME VALUE``),
    or a ``--config`` (file or inline) whose ``model:`` is such a value. False where a setting comes first
    (``--model.init_args.NAME``, a ``model:`` without a class) or nothing is about the model."""
    return isinstance(next(model_events(command_line), None), ClassChosen)
