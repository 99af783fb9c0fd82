"""AnomalyCLIP equals the authors' code (zqhang/AnomalyCLIP) on identical random weights.

The reference outputs (tests/reference/data/anomalyclip.npz) were written by
tests/reference/anomalyclip_reference.py running the authors' code; this test rebuilds the same open_clip
weights from the seed (a checksum proves it), loads the authors' initial prompt learner through the
converter, and compares.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from anovl.errors import AnovlError
from anovl.models.anomalyclip import AnomalyCLIP, convert_authors_state_dict
from anovl.models.checkpoints import load_trained_weights
from tests.reference.anomalyclip_reference import CONFIG, build_open_clip_model, weights_checksum

DATA = Path(__file__).resolve().parent / "reference" / "data" / "anomalyclip.npz"
MAP_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    with np.load(DATA) as data:
        return {key: data[key] for key in data.files}


def relative_error(got, expected, tolerance):
    """The largest difference, relative to the largest magnitude of ``expected``, is at most ``tolerance``."""
    error = float((got.detach() - expected).abs().max() / expected.abs().max())
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"


def authors_checkpoint(reference, prefix="initial/"):
    """The authors' checkpoint format: their prompt learner's state dict under "prompt_learner", with the
    unused per-layer projections their learner also holds."""
    state = {key[len(prefix) :]: torch.from_numpy(value) for key, value in reference.items() if key.startswith(prefix)}
    width = state["ctx_pos"].shape[-1]
    for index in range(8):
        state[f"compound_prompt_projections.{index}.weight"] = torch.randn(896, width)
        state[f"compound_prompt_projections.{index}.bias"] = torch.randn(896)
    state["token_prefix_pos"] = torch.zeros(1, 1, 1, width)
    return {"prompt_learner": state}


@pytest.fixture(scope="module")
def model(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("anomalyclip-parity")
    assert json.loads(str(reference["config"])) == CONFIG
    clip = build_open_clip_model()
    state = clip.state_dict()
    assert weights_checksum(state) == str(reference["weights_sha256"]), "open_clip no longer builds the same weights"
    config = folder / "anomalyclip-parity-vit.json"
    config.write_text(json.dumps(CONFIG))
    weights = folder / "weights.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(weights))
    checkpoint = folder / "prompt_learner.pth"
    torch.save(authors_checkpoint(reference), checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AnomalyCLIP(
            str(config),
            pretrained=str(weights),
            image_size=int(reference["image_size"]),
            checkpoint=str(checkpoint),
            use_text_cache=False,
        )


def test_defaults_are_the_published_ones(model):
    # The model above differs from the reference only in its backbone.
    assert (
        model.label == f"AnomalyCLIP[backbone=anomalyclip-parity-vit;backbone_config={model.backbone_config};"
        "image_size=64;pretrained=#" + model.label.split("pretrained=#")[1]
    )
    assert (model.layers, model.dpam_blocks, model.n_ctx, model.depth, model.t_n_ctx) == ((6, 12, 18, 24), 19, 12, 9, 4)
    # Built at its native 48 px and resized to 64 px bilinearly, as the authors' CLIP does.
    assert model.clip.visual.positional_embedding.shape == (1 + 8 * 8, 128)


def test_maps_and_scores_equal_the_authors(model, reference):
    images = torch.from_numpy(reference["images"])
    out = model(images, ["widget"] * len(images))
    assert (out.pred_score - torch.from_numpy(reference["pred_score"])).abs().max() <= MAP_TOLERANCE
    raw = torch.stack([(p[:, 1] + 1 - p[:, 0]) / 2 for p in out.layer_probabilities]).sum(0)
    assert (raw - torch.from_numpy(reference["anomaly_map_raw"])).abs().max() <= MAP_TOLERANCE
    assert (out.anomaly_map - torch.from_numpy(reference["anomaly_map"])).abs().max() <= MAP_TOLERANCE
    # The reference is not flat: maps vary in space and scores between images, far above the tolerance.
    assert reference["anomaly_map_raw"].reshape(4, -1).std(1).min() > 100 * MAP_TOLERANCE
    assert np.ptp(reference["pred_score"]) > 100 * MAP_TOLERANCE


def test_checkpoints_that_do_not_fit_are_refused(tmp_path, model):
    bad = tmp_path / "other.pth"
    torch.save({"prompt_learner": {"linear.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises(AnovlError, match="not an AnomalyCLIP prompt learner"):
        load_trained_weights(model, bad)
    heads = tmp_path / "heads.pth"
    torch.save({"trainable_linearlayer": {"fc.0.weight": torch.zeros(2, 2)}}, heads)
    with pytest.raises(AnovlError, match="neither a checkpoint written by anovl fit nor a release of AnomalyCLIP's"):
        load_trained_weights(model, heads)
    truncated = tmp_path / "truncated.pth"
    torch.save(authors_checkpoint({"initial/ctx_pos": np.zeros((1, 1, 12, 128), np.float32)}), truncated)
    truncated.write_bytes(truncated.read_bytes()[:50])
    with pytest.raises(AnovlError, match="cannot read checkpoint .*truncated.pth: it is corrupt, truncated"):
        load_trained_weights(model, truncated)
    small = tmp_path / "small.pth"
    torch.save({"prompt_learner": {"ctx_pos": torch.zeros(1, 1, 8, 128), "ctx_neg": torch.zeros(1, 1, 8, 128)}}, small)
    shapes = r"other shapes \['context', 'deep_tokens'\]"
    with pytest.raises(AnovlError, match=rf"does not fit AnomalyCLIP's trained part: .*{shapes}"):
        load_trained_weights(model, small)


def test_training_step_equals_the_authors(model, reference):
    images, masks = torch.from_numpy(reference["images"]), torch.from_numpy(reference["masks"])
    prompts = model.trained_module()
    try:
        losses = model.training_losses(images, masks, ["widget"] * len(images))
        map_loss, image_loss = losses["focal"] + losses["dice"], losses["image"]
        assert abs(map_loss.item() / float(reference["map_loss"]) - 1) <= 1e-5
        assert abs(image_loss.item() / float(reference["image_loss"]) - 1) <= 1e-5
        optimizer = model.configure_optimizer(prompts.parameters())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        expected_grads = authors_checkpoint(reference, "grad/")
        grads = convert_authors_state_dict(expected_grads)
        relative_error(prompts.context.grad, grads["context"], 2e-5)
        # Both cast the deep tokens to float16 and back (the authors inside their text blocks): their gradients
        # pass that cast, so they agree to a float16 step where float32 sums round differently.
        relative_error(prompts.deep_tokens.grad, grads["deep_tokens"], 2e-3)
        optimizer.step()
        updated = convert_authors_state_dict(authors_checkpoint(reference, "updated/"))
        for name in ("context", "deep_tokens"):
            # Adam's first step moves every element by ±lr whatever its gradient's size, so an element whose
            # gradient is at float noise level (their sum cancels to ~1e-5 of the largest) gets a step of either
            # sign; those few are left out.
            decided = grads[name].abs() > 1e-4 * grads[name].abs().max()
            assert decided.float().mean() > 0.99
            relative_error(getattr(prompts, name)[decided], updated[name][decided], 1e-5)
    finally:
        prompts.load_state_dict(convert_authors_state_dict(authors_checkpoint(reference)))


def test_the_comparison_sees_dpam_and_the_deep_tokens(model, reference, monkeypatch):
    """Without DPAM, or without the deep text tokens, the maps are far outside the tolerance."""
    images = torch.from_numpy(reference["images"])
    expected = torch.from_numpy(reference["anomaly_map"])
    monkeypatch.setattr(model, "dpam_blocks", 0)
    assert (model(images, ["widget"] * len(images)).anomaly_map - expected).abs().max() > 100 * MAP_TOLERANCE
    monkeypatch.undo()
    encode = model.text_tower.encode
    monkeypatch.setattr(
        model.text_tower, "encode", lambda embeddings, ids, deep, **kwargs: encode(embeddings, ids, [], **kwargs)
    )
    assert (model(images, ["widget"] * len(images)).anomaly_map - expected).abs().max() > 100 * MAP_TOLERANCE
