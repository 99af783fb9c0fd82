"""Anomaly models; each model is a folder with its pure-PyTorch core beside its Lightning wrapper."""
from anovl.models.winclip import WinCLIP  # noqa: F401  (the second method, beside anovl.models.anovl.AnoVL)
