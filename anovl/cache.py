"""Where anovl keeps its caches (text embeddings, decoded images): ``$ANOVL_CACHE_DIR``, else
``$XDG_CACHE_HOME/anovl`` (default ``~/.cache/anovl``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(
        os.environ.get("ANOVL_CACHE_DIR")
        or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "anovl")
    )
