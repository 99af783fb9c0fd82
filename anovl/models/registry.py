"""The method registry, like timm's: a method is known by a short name, which the CLI (``--model anovl``),
results.json and ``--resume`` use, so moving a method's file never breaks resuming an old run.

    @register_method("patchnorm")
    class PatchNorm(CLIPAnomalyModel): ...

    list_methods()                              # ['anovl', 'patchnorm', 'winclip']
    create_method("winclip", scales=(2, 3))     # WinCLIP(scales=(2, 3))
"""

from __future__ import annotations

import re
from importlib import import_module
from typing import Any, Callable, TypeVar

from anovl.errors import AnovlError
from anovl.models.base import AnomalyModel
from anovl.registry import Registry

M = TypeVar("M", bound=type[AnomalyModel])
METHODS: Registry[str, type[AnomalyModel]] = Registry(
    "method", "a plugin registers its own with @anovl.register_method(name); a class path works too"
)
_NAME = re.compile(r"[a-z][a-z0-9_-]*")


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make an :class:`~anovl.models.base.AnomalyModel` known as ``name`` (lower case)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AnovlError(f"a method name must be lower case letters, digits, '-' or '_', got {name!r}")

    def register(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, AnomalyModel)):
            raise AnovlError(f"@register_method({name!r}) needs an AnomalyModel subclass, got {cls!r}")
        METHODS.register(name, cls, stacklevel=2)
        return cls

    return register


def _builtin_methods() -> Registry[str, type[AnomalyModel]]:
    import_module("anovl.models")  # registers anovl's own methods
    return METHODS


def list_methods() -> list[str]:
    """The registered method names (anovl's own and those of imported plugins)."""
    return _builtin_methods().names()


def method_class(name: str) -> type[AnomalyModel]:
    return _builtin_methods().lookup(name)


def create_method(name: str, **kwargs: Any) -> AnomalyModel:
    """The registered method ``name`` built with ``kwargs`` (its constructor's arguments)."""
    return method_class(name)(**kwargs)


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def method_name(model: AnomalyModel | type[AnomalyModel]) -> str | None:
    """The name ``model``'s class is registered under (None for an unregistered class, a subclass included).

    A plugin file imported again (a notebook cell run twice) registers a new class object of the same module and
    name while models of the old one live on: those are named by the class path of the registered entry."""
    cls = model if isinstance(model, type) else type(model)
    methods = _builtin_methods()
    path = class_path(cls)
    return next((name for name, entry in methods.items() if entry is cls), None) or next(
        (name for name, entry in methods.items() if class_path(entry) == path), None
    )


def method_record(model: AnomalyModel) -> dict[str, str]:
    """How results.json names the method: ``{"method": name}``, or ``{"class_path": ...}`` if it has no name."""
    name = method_name(model)
    return {"method": name} if name is not None else {"class_path": class_path(type(model))}


def normalised_record(record: dict[str, Any]) -> dict[str, Any]:
    """A model record of results.json with a registered class path (what older versions wrote) replaced by
    the method's name, so that a run written before the registry resumes."""
    path = record.get("class_path")
    name = next((name for name, entry in _builtin_methods().items() if class_path(entry) == path), None)
    if name is None:
        return record
    return {"method": name, **{key: value for key, value in record.items() if key != "class_path"}}
