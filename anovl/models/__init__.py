"""Anomaly models; each model is a folder with its pure-PyTorch core beside its Lightning wrapper."""
