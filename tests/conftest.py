"""Shared test set-up: offline, quiet, small models, no writes outside tmp dirs."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY = "anovl-tiny-vit"  # registered from anovl/model_configs: 64 px, patch 16, 3 blocks, random weights


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep text-embedding caches of every test in a private directory."""
    monkeypatch.setenv("ANOVL_CACHE_DIR", str(tmp_path_factory.mktemp("anovl-cache")))


@pytest.fixture
def tiny_model():
    """A random-weight tiny AnoVL (deterministic weights), 64×64 input."""
    from anovl import AnoVL

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AnoVL(TINY, pretrained=None)
