"""Plugins: a user's own methods, adapters, datasets or categories, in their own package or file.

A plugin is a Python module that registers things when imported (``@register_adapter``,
``register_category``) or defines classes that configs name by ``class_path``. anovl imports, before it
reads its configuration:

* every entry point of the group ``anovl.plugins`` (``[project.entry-points."anovl.plugins"]`` in the
  plugin package's pyproject.toml), so an installed plugin package needs nothing else;
* the modules or ``.py`` files named by ``--plugins`` on the command line or ``plugins:`` in any config,
  however it arrives: a file, inline YAML (``--config '{plugins: [my.py], ...}'``, a grid variant's mapping),
  or several ``--config``; all of them are recorded in the run's saved config.yaml, so the run can be
  repeated as it is;
* those named in the environment variable ``ANOVL_PLUGINS`` (separated by ``:``).

A ``.py`` file is imported as a module named after the file, so ``class_path: my_method.MyModel`` finds a
class in ``my_method.py``, where that name is free; where it is not (an installed module: a ``yaml.py``; or
another plugin file of the same stem) it gets a unique name, ``anovl_plugin_<stem>_<hash of its path>``, with
a warning, so it never replaces the other. A plugin whose own imports are missing is one error line naming
the missing module.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterable

from anovl.errors import AnovlError

ENTRY_POINT_GROUP = "anovl.plugins"
ENVIRONMENT_VARIABLE = "ANOVL_PLUGINS"


def load_plugin(spec: str) -> None:
    """Import a plugin given as a module name (``my_pkg.adapters``) or a path to a ``.py`` file."""
    spec = spec.strip()
    if not spec:
        raise AnovlError("empty plugin name; give a module name or a .py file")
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        _load_file(Path(spec).expanduser())
        return
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as error:
        if error.name and (spec == error.name or spec.startswith(error.name + ".")):
            raise AnovlError(
                f"plugin module {spec!r} not found; install its package or give the path to a .py file"
            ) from None
        raise _missing_dependency(spec, error) from None


def _missing_dependency(plugin: str, error: ModuleNotFoundError) -> AnovlError:
    missing = error.name or str(error)
    return AnovlError(
        f"plugin {plugin} needs the module {missing!r}, which is not installed; install it "
        f"(pip install {missing.split('.')[0]}) or leave the plugin out"
    )


def _load_file(path: Path) -> None:
    """A plugin file, imported as a module named after its stem (``class_path: my_method.MyModel``) where that
    name is free, else under a unique name (``anovl_plugin_<stem>_<hash>``, with a warning), so that it never
    replaces an installed module (a ``yaml.py``) or another plugin file of the same stem."""
    if not path.is_file():
        raise AnovlError(f"plugin file not found: {path}")
    resolved = path.resolve()
    stem = resolved.stem
    holder = sys.modules.get(stem)
    if stem.isidentifier() and (
        getattr(holder, "__file__", None) == str(resolved)  # loaded before: run again
        or holder is None
        and _free(stem, resolved)
    ):
        name = stem
    else:
        digest = hashlib.sha256(str(resolved).encode("utf-8", "surrogatepass")).hexdigest()[:10]
        identifier = re.sub(r"\W", "_", stem)
        name = f"anovl_plugin_{identifier}_{digest}"
        taken = (
            "not a module name"
            if not stem.isidentifier()
            else (
                "an installed module"
                if holder is None or not hasattr(holder, "__anovl_plugin__")
                else f"another plugin's ({holder.__file__})"
            )
        )
        warnings.warn(
            f"plugin {path} is imported as module {name}: its name {stem!r} is {taken}; name its "
            f"classes {name}.<Class> in configs",
            PluginNameWarning,
            stacklevel=3,
        )
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise AnovlError(f"cannot import plugin file {path}")
    module = importlib.util.module_from_spec(module_spec)
    module.__anovl_plugin__ = True  # type: ignore[attr-defined]
    previous = sys.modules.get(name)
    sys.modules[name] = module  # class_path: <name>.<Class> resolves to this module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as error:
        if previous is None:
            del sys.modules[name]
        else:
            sys.modules[name] = previous
        if isinstance(error, ModuleNotFoundError):
            raise _missing_dependency(str(path), error) from None
        raise


def _free(name: str, path: Path) -> bool:
    """No installed module of this name (other than the file itself, found on the path)."""
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return found is None or (found.origin is not None and Path(found.origin).resolve() == path)


class PluginNameWarning(UserWarning):
    """A plugin file whose stem is taken (an installed module, another plugin) is reachable by its unique name."""


# What the last load_plugins imported, for error messages about names a plugin should have registered.
_loaded: list[str] = []


def loaded_note() -> str:
    """`` (plugins loaded: a, b)`` after the last :func:`load_plugins` that imported any, else ``""``: added to
    "unknown class / backbone" errors, since a name a config expects from a plugin is missing when the plugin
    did not register it (or another file was imported)."""
    return f" (plugins loaded: {', '.join(_loaded)})" if _loaded else ""


def load_plugins(specs: Iterable[str] = ()) -> list[str]:
    """Import the entry-point plugins, those in ``$ANOVL_PLUGINS`` and ``specs``; returns what was imported."""
    loaded: list[str] = []
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()
        loaded.append(entry_point.value)
    from_environment = [spec for spec in os.environ.get(ENVIRONMENT_VARIABLE, "").split(":") if spec.strip()]
    for spec in [*from_environment, *specs]:
        load_plugin(spec)
        loaded.append(spec)
    _loaded[:] = loaded
    return loaded
