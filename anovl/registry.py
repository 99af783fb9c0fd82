"""One registry behaviour for everything anovl looks up by name: methods, TTA adapters, vision-tower encoders,
BlockOps, backbone model configs and categories.

A :class:`Registry` is a dict (name → entry) with three rules: registering a name again replaces the entry with
a warning (a notebook cell or a plugin imported twice), :meth:`Registry.lookup` of an unknown name is one
:class:`~anovl.errors.AnovlError` that lists the registered names and the closest ones ("did you mean"), and
:meth:`Registry.names` lists them. It imports nothing heavy, so the light parts of the CLI can use it.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any, Callable, Generic, Hashable, TypeVar

from anovl.errors import AnovlError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _describe(entry: Any) -> str:
    return getattr(entry, "__qualname__", None) or type(entry).__qualname__


class Registry(dict[K, V], Generic[K, V]):  # a dict: tests and users may monkeypatch entries
    """Entries of one ``kind`` (a word for messages: ``"method"``, ``"TTA adapter"``) by name."""

    def __init__(self, kind: str, hint: str = ""):
        super().__init__()
        self.kind = kind
        self.hint = hint  # how to register one, appended to the unknown-name error

    def register(self, name: K, entry: V, *, stacklevel: int = 2) -> V:
        """Add ``entry`` as ``name``; an equal entry is kept silently, a different one replaces it with a warning."""
        if name in self and self[name] != entry:
            warnings.warn(
                f"{self.kind} {name!r} was registered before ({_describe(self[name])}); replacing it",
                stacklevel=stacklevel + 1,
            )
        self[name] = entry
        return entry

    def decorator(self, name: K) -> Callable[[V], V]:
        """``@registry.decorator(name)`` registers the decorated class (or function) as ``name``."""

        def register(entry: V) -> V:
            return self.register(name, entry, stacklevel=2)

        return register

    def names(self) -> list[str]:
        return sorted(str(name) for name in self)

    def lookup(self, name: K) -> V:
        """The entry of ``name``, or one error naming the registered entries and the closest matches."""
        if name in self:
            return self[name]
        close = difflib.get_close_matches(str(name), self.names(), n=3) if isinstance(name, str) else []
        hint = f"did you mean {', '.join(close)}? " if close else ""
        extra = f" ({self.hint})" if self.hint else ""
        raise AnovlError(f"unknown {self.kind} {name!r}; {hint}registered: {', '.join(self.names()) or 'none'}{extra}")
