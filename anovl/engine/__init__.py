"""Running methods: the :class:`Engine` (what ``anovl test`` / ``anovl predict`` do, from Python or the CLI) and the
generic Lightning module that runs any anomaly model (:class:`AnomalyModule`)."""

from anovl.engine.engine import Engine
from anovl.engine.module import AnomalyModule
from anovl.tracking import run_directory

__all__ = ["AnomalyModule", "Engine", "run_directory"]
