"""One bounded reader for untrusted JSON and YAML (results.json, grid state, thresholds, sidecars, cache
metadata, grid files): size and nesting depth are capped before parsing, repeated keys are refused, and the
document is validated against a pydantic schema (:mod:`anovl.io.schemas`), so that every problem is one
:class:`~anovl.errors.AnovlError` naming the file and the field, never a traceback."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml
from pydantic import BaseModel, ValidationError

from anovl.errors import AnovlError

MAX_BYTES = 16 * 2**20  # results.json of thousands of categories stays far below
MAX_DEPTH = 64
Model = TypeVar("Model", bound=BaseModel)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def read_text(path: Path | str, what: str, max_bytes: int = MAX_BYTES) -> str:
    """A UTF-8 file of at most ``max_bytes``, without reading more than that."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise AnovlError(
                    f"{what} {path} is {size / 2**20:.1f} MiB, more than the {max_bytes / 2**20:g} MiB "
                    "anovl reads; it is not a file anovl wrote"
                )
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise AnovlError(f"cannot read {what} {path} ({error.strerror or type(error).__name__})") from None
    if len(data) > max_bytes:  # a file that grew, or a device
        raise AnovlError(f"{what} {path} is larger than the {max_bytes / 2**20:g} MiB anovl reads")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise AnovlError(f"{what} {path} is not UTF-8 text") from None


def _json_depth(text: str) -> int:
    """The deepest nesting of ``[`` / ``{`` outside strings (checked before parsing, which would recurse)."""
    brackets = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "surrogatepass"), dtype=np.uint8)
    steps = np.isin(brackets, (ord("["), ord("{"))).astype(np.int64) - np.isin(brackets, (ord("]"), ord("}"))).astype(
        np.int64
    )
    return int(np.cumsum(steps).max(initial=0))


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise _RepeatedKey(repeated[0])
    return dict(pairs)


class _RepeatedKey(ValueError):
    pass


def parse_json(text: str, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """JSON text, depth-capped, repeated keys refused; ``where`` names it in errors."""
    if _json_depth(text) > max_depth:
        raise AnovlError(f"{where} is nested more than {max_depth} levels deep; it is not a file anovl wrote")

    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except _RepeatedKey as error:
        raise AnovlError(f"{where} has the key {error} twice; a repeated key would silently drop a value") from None
    except (ValueError, RecursionError) as error:
        raise AnovlError(f"{where} is not valid JSON ({str(error).splitlines()[0][:200]})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML says keys are unique; PyYAML
    keeps the last and drops the rest silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_depth(node: yaml.Node, limit: int) -> None:
    stack = [(node, 1)]
    seen = 0
    while stack:
        current, depth = stack.pop()
        seen += 1
        if depth > limit or seen > 1_000_000:
            raise ValueError(f"nested more than {limit} levels deep, or too many nodes")
        if isinstance(current, yaml.SequenceNode):
            stack += [(child, depth + 1) for child in current.value]
        elif isinstance(current, yaml.MappingNode):
            stack += [(child, depth + 1) for pair in current.value for child in pair]


def parse_yaml(text: str, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """YAML text (safe types only), depth-capped, repeated keys refused; ``where`` names it in errors."""
    try:
        loader = _UniqueKeyLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _yaml_depth(node, max_depth)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        mark = getattr(error, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise AnovlError(f"{where} is not valid YAML: {problem}{line}") from None
    except (ValueError, RecursionError) as error:
        raise AnovlError(f"{where}: {str(error)[:200]}") from None


def validate(document: Any, schema: type[Model], where: str, hint: str = "") -> Model:
    """``document`` checked against ``schema``: the first problem as one line naming the field."""
    try:
        return schema.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
        field = field or "the top level"
        if first["type"] == "value_error":  # a schema's own check: its message says what is wrong
            problem = str(first["ctx"]["error"])
        elif first["type"] == "extra_forbidden":
            problem = f"is not a field of this record (got {repr(first.get('input'))[:80]})"
        else:
            problem = f"{first['msg']} (got {repr(first.get('input'))[:80]})"
        raise AnovlError(f"{where}: {field}: {problem}{'; ' + hint if hint else ''}") from None


def read_json(path: Path | str, schema: type[Model], what: str, hint: str = "", max_bytes: int = MAX_BYTES) -> Model:
    """An untrusted JSON file, bounded and validated (see the module docstring)."""
    where = f"{what} {path}"
    return validate(parse_json(read_text(path, what, max_bytes), where), schema, where, hint)


def read_yaml(path: Path | str, what: str, max_bytes: int = MAX_BYTES) -> Any:
    """An untrusted YAML file, bounded, repeated keys refused (validation is the caller's: YAML files have
    free-form parts such as configs)."""
    return parse_yaml(read_text(path, what, max_bytes), f"{what} {path}")
