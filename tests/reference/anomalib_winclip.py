"""Run anomalib 2.7.0's WinClipModel zero-shot and save its maps and scores (tests/test_winclip_parity.py).

Runs in a subprocess whose PYTHONPATH starts with the directory of requirements-anomalib.txt's install, so
that anomalib runs on the open_clip it pins (2.24), not the venv's. It imports nothing from anovl.

    python anomalib_winclip.py CONFIG.json WEIGHTS.safetensors INPUTS.safetensors OUTPUT.safetensors

CONFIG.json is an open_clip model config (registered under its file name), WEIGHTS the CLIP state_dict,
INPUTS holds ``images`` (B, 3, S, S) and the metadata ``classes`` (JSON list, one class name per image).
OUTPUT gets ``anomaly_map`` (B, S, S) and ``pred_score`` (B,) in the input order.
"""

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

EXPECTED = {"anomalib": "2.7.0", "open_clip_torch": "2.24.0"}


def main(config: str, weights: str, inputs: str, output: str) -> None:
    found = {name: version(name) for name in EXPECTED}
    if found != EXPECTED:
        sys.exit(f"expected {EXPECTED} first on the path, found {found}")
    import open_clip
    from anomalib.models.image.winclip import torch_model

    open_clip.add_model_config(config)
    # anomalib hard-codes its backbone; point it at the test's config, build it randomly, load the weights.
    torch_model.BACKBONE = Path(config).stem
    torch_model.PRETRAINED = None
    model = torch_model.WinClipModel()
    model.clip.load_state_dict(load_file(weights))
    model.eval()

    images = load_file(inputs)["images"]
    with safe_open(inputs, framework="pt") as handle:
        classes = json.loads(handle.metadata()["classes"])
    maps = torch.zeros(images.shape[0], *images.shape[-2:])
    scores = torch.zeros(images.shape[0])
    for class_name in dict.fromkeys(classes):  # zero-shot: set up with the class name, no reference images
        model.setup(class_name)
        rows = torch.tensor([index for index, name in enumerate(classes) if name == class_name])
        result = model(images[rows])
        maps[rows], scores[rows] = result.anomaly_map, result.pred_score
    save_file({"anomaly_map": maps.contiguous(), "pred_score": scores.contiguous()}, output)


if __name__ == "__main__":
    main(*sys.argv[1:])
