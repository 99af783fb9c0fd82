"""WinCLIP equals anomalib 2.7.0's WinClipModel (zero-shot) on identical random weights and images.

anomalib runs in a subprocess on the open_clip it pins (2.24.0), installed with --no-deps into
``<venv>/anomalib-ref`` by the README's set-up command (see tests/reference/requirements-anomalib.txt);
``ANOVL_ANOMALIB_REF`` names another directory. anovl runs on the venv's open_clip.
"""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from anovl.models.winclip import WinCLIP

REFERENCE_DIR = Path(os.environ.get("ANOVL_ANOMALIB_REF") or Path(sys.prefix) / "anomalib-ref")
RUNNER = Path(__file__).resolve().parent / "reference" / "anomalib_winclip.py"
TOLERANCE = 2e-6  # CPU float32; a harmonic mean swapped for an arithmetic one moves the maps by ~1e-4
# A small ViT that open_clip 2.24 and 3.x both build; 96 px / 16 px patches = a 6×6 grid, so windows of 2
# and 3 patches both slide.
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 96, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLASSES = ["bottle", "carpet", "bottle", "screw", "carpet"]  # mixed in one anovl batch
LOGIT_SCALE = 3.0  # exp(3) ≈ 20, far from anomalib's 1/0.07 ≈ 14.3: using logit_scale would be caught


@pytest.fixture(scope="module")
def parity_inputs(tmp_path_factory):
    if not (REFERENCE_DIR / "anomalib").is_dir():
        pytest.skip(
            f"anomalib reference install missing at {REFERENCE_DIR}; create it with: .venv/bin/pip install "
            "-q --no-deps --upgrade --target .venv/anomalib-ref -r tests/reference/requirements-anomalib.txt"
        )
    folder = tmp_path_factory.mktemp("winclip-parity")
    config = folder / "winclip-parity-vit.json"
    config.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = open_clip.create_model(config.stem)
    with torch.no_grad():
        clip.logit_scale.fill_(LOGIT_SCALE)
    weights = folder / "weights.safetensors"
    save_file({key: value.contiguous() for key, value in clip.state_dict().items()}, str(weights))
    inputs = folder / "inputs.safetensors"
    images = torch.randn(len(CLASSES), 3, 96, 96)
    save_file({"images": images}, str(inputs), metadata={"classes": json.dumps(CLASSES)})
    output = folder / "anomalib.safetensors"
    result = subprocess.run(
        [sys.executable, str(RUNNER), str(config), str(weights), str(inputs), str(output)],
        env={**os.environ, "PYTHONPATH": str(REFERENCE_DIR), "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"anomalib runner failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = WinCLIP(str(config), pretrained=str(weights))
    return model, images, load_file(str(output))


def test_maps_and_scores_equal_anomalib(parity_inputs):
    model, images, reference = parity_inputs
    out = model(images, CLASSES, prompt_names=CLASSES)
    assert torch.allclose(model.clip.logit_scale.exp(), torch.tensor(math.exp(LOGIT_SCALE)))
    assert (out.pred_score - reference["pred_score"]).abs().max() <= TOLERANCE
    assert (out.anomaly_map - reference["anomaly_map"]).abs().max() <= TOLERANCE
    # The maps are not flat (anomalib #2571 would flatten them) and the classes give different scores.
    assert reference["anomaly_map"].flatten(1).std(1).min() > 100 * TOLERANCE
    assert (reference["pred_score"][0] - reference["pred_score"][1]).abs() > 100 * TOLERANCE


def test_parity_is_sensitive_to_the_aggregation_and_temperature(parity_inputs):
    """The tolerance is tight enough to catch an arithmetic mean or CLIP's own logit scale."""
    model, images, reference = parity_inputs
    out = model(images, CLASSES, prompt_names=CLASSES)
    whole = out.pred_score.view(-1, 1, 1).expand_as(out.scale_maps[0])
    arithmetic = torch.stack([whole, *out.scale_maps]).mean(0)
    arithmetic = F.interpolate(arithmetic.unsqueeze(1), size=images.shape[-2:], mode="bilinear").squeeze(1)
    assert (arithmetic - reference["anomaly_map"]).abs().max() > 10 * TOLERANCE
    model.temperature = 1 / model.clip.logit_scale.exp().item()
    try:
        with_logit_scale = model(images, CLASSES, prompt_names=CLASSES)
    finally:
        model.temperature = 0.07
    assert (with_logit_scale.anomaly_map - reference["anomaly_map"]).abs().max() > 10 * TOLERANCE
