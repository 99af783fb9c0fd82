"""AnomalyCLIP on a tiny random model: settings and label, bad arguments, text towers it refuses, and the map
pipeline against a naive restatement (the authors' equality is tests/test_anomalyclip_parity.py)."""

import copy
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anovl.backbones import register_model_config
from anovl.errors import AnovlError
from anovl.models.anomalyclip import AnomalyCLIP

SIZE = 64
TINY = dict(
    pretrained=None, image_size=SIZE, layers=(1, 3), dpam_blocks=2, n_ctx=4, depth=2, t_n_ctx=2, use_text_cache=False
)


def tiny_backbone() -> str:
    config = copy.deepcopy(open_clip.get_model_config("anovl-tiny-vit"))
    config["vision_cfg"]["layers"], config["text_cfg"]["layers"] = 4, 3
    return register_model_config(config, name="anovl-tiny-vit-text3")


def make(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AnomalyCLIP(tiny_backbone(), **{**TINY, **kwargs})


@pytest.fixture(scope="module")
def model():
    return make()


def test_label_names_what_differs_from_the_published_settings(model):
    # A registered config is named with a hash of its content too (CLIPAnomalyModel.backbone_settings).
    config = f"backbone_config={model.backbone_config};"
    differences = (
        f"backbone=anovl-tiny-vit-text3;{config}depth=2;dpam_blocks=2;image_size=64;init_seed=0;"
        "layers=1,3;n_ctx=4;pretrained=None;t_n_ctx=2"
    )
    assert model.label == f"AnomalyCLIP[{differences}]"
    assert make(sigma=0.0, deep_tokens_float16=False).label == (
        f"AnomalyCLIP[backbone=anovl-tiny-vit-text3;{config}deep_tokens_float16=False;depth=2;dpam_blocks=2;"
        "image_size=64;init_seed=0;layers=1,3;n_ctx=4;pretrained=None;sigma=0;t_n_ctx=2]"
    )
    # Trained prompts (unlike the seeded initial ones) are named in the label by their fingerprint.
    before = model.settings()["prompt_weights"]
    trained = make()
    with torch.no_grad():
        trained.prompts.context.add_(1.0)
    fingerprint = trained.settings()["prompt_weights"]
    assert fingerprint != before and "prompt_weights" not in model.label
    assert f";prompt_weights={fingerprint};" in trained.label


def test_text_states_gives_the_learned_prompts_for_every_category(model):
    learned = model.learned_states()
    assert learned.requires_grad  # what training uses
    for category, prompt_name in (("bottle", None), ("carpet", "woven fabric")):
        embeddings = model.text_states(category, prompt_name, "cpu")
        assert not embeddings.states.requires_grad
        torch.testing.assert_close(embeddings.states, learned.detach())
        torch.testing.assert_close(embeddings.sentences, learned.detach())  # the two prompts, normal first


def test_maps_and_scores_against_a_naive_restatement(model):
    torch.manual_seed(0)
    images = torch.randn(2, 3, SIZE, SIZE)
    out = model(images, ["bottle", "screw"])
    states = model.learned_states().detach()
    encoded = model.encode_images(images)
    grid = SIZE // model.encoder.patch_size
    expected_maps = []
    for index in range(2):
        total = np.zeros((SIZE, SIZE), dtype=np.float32)
        for tokens in encoded.patch_tokens:
            cosines = F.normalize(tokens[index], dim=-1) @ states.t()
            abnormal = (cosines / 0.07).softmax(-1)[:, 1].reshape(1, 1, grid, grid)
            total += F.interpolate(abnormal, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()
        expected_maps.append(gaussian_filter(total, sigma=4))
    np.testing.assert_allclose(out.anomaly_map.numpy(), np.stack(expected_maps), atol=1e-5)
    image = F.normalize(encoded.global_tokens, dim=-1)
    torch.testing.assert_close(out.pred_score, (image @ states.t() / 0.07).softmax(-1)[:, 1])
    # Object-agnostic: the category does not change the prompts.
    torch.testing.assert_close(model(images, ["carpet", "carpet"]).anomaly_map, out.anomaly_map)
    # A probability per block, summed: the map's range is the number of blocks (predict's 16-bit PNG scale).
    assert model.map_range == len(encoded.patch_tokens) == 2 and 1 < out.anomaly_map.max() <= model.map_range


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(t_n_ctx=5), r"t_n_ctx \(5\) cannot exceed n_ctx \(4\)"),
        (dict(depth=4), "depth 4 exceeds the 3 text blocks"),
        (dict(layers=(5,)), r"layers must be distinct block numbers from 1 to 4 .* got \[5\]"),
        (dict(layers=(0, 2)), r"got \[0, 2\]"),
        (dict(dpam_blocks=5), "dpam_blocks 5 exceeds the 4 blocks"),
        (dict(n_ctx=0), "n_ctx must be an integer of at least 1"),
        (dict(temperature=0.0), "temperature must be positive"),
        (dict(betas=(0.5, 1.0)), r"betas two numbers in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(AnovlError, match=message):
        make(**kwargs)


def test_hugging_face_text_tower_refused_before_weights(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("weights were built")

    monkeypatch.setattr(open_clip, "create_model", no_build)
    with pytest.raises(
        AnovlError,
        match="open_clip's own text transformer, but the text tower of roberta-ViT-B-32 "
        "is the Hugging Face model 'roberta-base'",
    ):
        AnomalyCLIP("roberta-ViT-B-32", pretrained=None)


def test_config_gives_the_published_settings(capsys, monkeypatch):
    import sys

    import yaml

    from anovl.cli import main

    monkeypatch.setattr(sys, "argv", ["anovl"])
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", "configs/mvtec.yaml", "--config", "configs/anomalyclip.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "anovl.models.anomalyclip.torch_model.AnomalyCLIP"
    arguments = config["model"]["init_args"]
    assert (arguments["backbone"], arguments["pretrained"], arguments["image_size"], arguments["layers"]) == (
        "ViT-L-14-336",
        "openai",
        518,
        [6, 12, 18, 24],
    )
    assert (arguments["dpam_blocks"], arguments["n_ctx"], arguments["depth"], arguments["t_n_ctx"]) == (19, 12, 9, 4)
    assert config["data"]["init_args"]["batch_size"] == 8
    assert "num_views" not in arguments  # AnoVL's own argument from configs/mvtec.yaml does not carry over


def test_fit_then_test_on_demo_data(tmp_path):
    """`anovl fit` trains the prompts of a tiny AnomalyCLIP on generated data, `anovl test` runs the checkpoint."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from anovl.data.synthetic import generate_mvtec_like

    data_root = generate_mvtec_like(tmp_path / "data", ("widget",), n_good=2, n_defect=1, image_size=SIZE)
    backbone = tmp_path / "anovl-tiny-vit-text3.json"
    config = copy.deepcopy(open_clip.get_model_config("anovl-tiny-vit"))
    config["vision_cfg"]["layers"], config["text_cfg"]["layers"] = 4, 3
    backbone.write_text(json.dumps(config))
    model = [
        "--model",
        "anomalyclip",
        "--model.init_args.backbone",
        str(backbone),
        "--model.init_args.pretrained",
        "null",
        "--model.init_args.image_size",
        str(SIZE),
        "--model.init_args.layers",
        "[1, 3]",
        "--model.init_args.dpam_blocks",
        "2",
        "--model.init_args.n_ctx",
        "4",
        "--model.init_args.depth",
        "2",
        "--model.init_args.t_n_ctx",
        "2",
    ]
    data = [
        "--data",
        "anovl.data.SyntheticMVTecDataModule",
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.generate",
        "false",
        "--data.init_args.categories",
        "[widget]",
        "--data.init_args.batch_size",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "CSVLogger",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "ANOVL_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }

    def anovl(*args):
        result = subprocess.run(
            [sys.executable, "-m", "anovl.cli", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]

    anovl("fit", *model, *data, "--trainer.max_epochs", "4")
    (checkpoint,) = (tmp_path / "runs").glob("*/version_0/checkpoints/last.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    assert set(saved["state_dict"]) == {"model.prompts.context", "model.prompts.deep_tokens"}  # no CLIP weights
    assert saved["anovl"]["record"] == {"method": "anomalyclip"}
    # The loss terms were logged every epoch, and the sum fell.
    rows = [line.split(",") for line in (checkpoint.parent.parent / "metrics.csv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    assert {"train/focal_epoch", "train/dice_epoch", "train/image_epoch"} <= set(header)
    losses = [float(row[header.index("train/loss_epoch")]) for row in rows if row[header.index("train/loss_epoch")]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    anovl("test", *model, *data, "--ckpt_path", str(checkpoint))
    (results,) = [path for path in (tmp_path / "runs").glob("*/version_*/results.json")]
    recorded = json.loads(results.read_text())
    trained = make()
    trained.prompts.load_state_dict(
        {key.removeprefix("model.prompts."): value for key, value in saved["state_dict"].items()}
    )
    assert recorded["config"]["model"]["prompt_weights"] == trained.prompt_fingerprint() != make().prompt_fingerprint()
    assert recorded["complete"] and recorded["mean"]["pixel_auroc"] is not None
