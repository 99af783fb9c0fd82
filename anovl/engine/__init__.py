"""The generic Lightning layer: one module that runs any anomaly model for ``test`` and ``predict``."""

from anovl.engine.module import AnomalyModule, run_directory

__all__ = ["AnomalyModule", "run_directory"]
