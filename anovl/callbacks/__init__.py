"""Callbacks of ``anovl test`` and ``anovl predict``, one job per module:

* :mod:`~anovl.callbacks.picks`: which test images get a panel (picture selection);
* :mod:`~anovl.callbacks.panels`: :class:`PanelWriter`, the panels of ``test``;
* :mod:`~anovl.callbacks.calibration`: thresholds from known-normal images (a post-processor of ``predict``);
* :mod:`~anovl.callbacks.predictions`: :class:`AnomalyMapWriter`, the outputs of ``predict``.
"""

from anovl.callbacks.panels import PanelWriter
from anovl.callbacks.predictions import SCORE_COLUMNS, AnomalyMapWriter

__all__ = ["AnomalyMapWriter", "PanelWriter", "SCORE_COLUMNS"]
