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

A ``.py`` file is imported as a module named after the file, so ``class_path: my_method.MyModel``
finds a class in ``my_method.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
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
        path = Path(spec).expanduser()
        if not path.is_file():
            raise AnovlError(f"plugin file not found: {path}")
        name = path.stem
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise AnovlError(f"cannot import plugin file {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # class_path: <name>.<Class> resolves to this module
        try:
            module_spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
        return
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as error:
        if error.name and spec.startswith(error.name):
            raise AnovlError(f"plugin module {spec!r} not found; install its package or give the path to "
                             "a .py file") from None
        raise


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
