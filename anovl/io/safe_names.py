"""Untrusted names (categories, defect folders, file names from datasets) as safe single path components.

:func:`safe_component` is what every writer (pictures, predictions, caches) puts into a path. It is readable
(ordinary names come back unchanged) and injective (two different names never give the same component): any
character that could direct a write elsewhere, hide a file or break on some filesystem is percent-escaped
as the UTF-8 bytes of the character, and ``%`` itself is escaped, so ``urllib.parse.unquote(component,
errors="surrogatepass")`` gives the name back. Lone surrogates (how Python represents undecodable bytes of
file names) are escaped with ``surrogatepass``, which keeps the code prefix-free.

Escaped: path separators (``/``, ``\\``), the characters Windows forbids (``:*?"<>|``), control and other
non-printable characters, a leading ``.`` (so ``.``, ``..`` and hidden names cannot arise), a trailing ``.``
or space (Windows drops them), a leading ``-`` (read as an option by command-line tools) and the first
letter of Windows device names (``CON``, ``NUL``, ``COM1`` ...). A component longer than
:data:`MAX_COMPONENT_BYTES` keeps a readable prefix and ends in ``%~`` and a SHA-256 of the whole name; no
short component contains ``%~``. Case-insensitive filesystems (macOS, Windows) still fold ``A`` and ``a``
together: names that differ only in case collide there.
"""

from __future__ import annotations

import hashlib
import os

from anovl.errors import AnovlError

MAX_COMPONENT_BYTES = 200  # below every common NAME_MAX (255), leaving room for a writer's suffix
_FORBIDDEN = frozenset('/\\:*?"<>|%')
_WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{stem}{digit}" for stem in ("COM", "LPT") for digit in "0123456789¹²³"}
)


def _escape(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


def _is_literal(char: str) -> bool:
    return char not in _FORBIDDEN and char.isprintable() and not "\ud800" <= char <= "\udfff"


def safe_component(name: str | bytes) -> str:
    """``name`` as one path component that cannot leave its folder; unchanged for ordinary names.

    ``bytes`` (a raw file name) are decoded as the OS does (``os.fsdecode``). Raises :class:`AnovlError` for an
    empty name, which no component can stand for.
    """
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not isinstance(name, str):
        raise TypeError(f"a name must be str or bytes, got {type(name).__name__}")
    if not name:
        raise AnovlError("an empty name cannot be used as a file or folder name; give the category or file a name")
    pieces = [char if _is_literal(char) else _escape(char) for char in name]
    if name[0] in ".-":
        pieces[0] = _escape(name[0])
    if name[-1] in ". ":
        pieces[-1] = _escape(name[-1])
    if name.split(".")[0].upper() in _WINDOWS_DEVICES:
        pieces[0] = _escape(name[0])
    component = "".join(pieces)
    if len(component.encode("utf-8")) <= MAX_COMPONENT_BYTES:
        return component
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    suffix = f"%~{digest}"
    budget = MAX_COMPONENT_BYTES - len(suffix)
    prefix, used = [], 0
    for piece in pieces:  # whole pieces only, so an escape is never cut in half
        used += len(piece.encode("utf-8"))
        if used > budget:
            break
        prefix.append(piece)
    return "".join(prefix) + suffix
