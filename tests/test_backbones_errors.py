"""Unsupported towers, missing packages and hub tokenizers: one clear error, before any weights exist."""

import builtins
import subprocess
import sys
import warnings
from pathlib import Path

import open_clip
import pytest
import torch

from anovl.backbones import create_backbone, register_model_config
from anovl.testing.tiny import register_tiny, tiny_config
from anovl.errors import AnovlError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_weights_built(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("weights were built")

    monkeypatch.setattr(open_clip, "create_model", forbidden)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("RN50", "ModifiedResNet"),
        ("convnext_base", r"TimmModel\(ConvNeXt\) is not a transformer with global self-attention"),
        ("MobileCLIP-S1", r"TimmModel\(FastVit\)"),
        ("swin_base_patch4_window7_224", r"TimmModel\(SwinTransformer\)"),
    ],
)
def test_non_vit_towers_stop_before_weights(no_weights_built, name, reason):
    with pytest.raises(AnovlError, match=rf"^{name} is not supported by the V-V path: .*{reason}.*ViT-B-16-plus-240"):
        create_backbone(name)


def test_cli_names_the_model_in_one_error_line(tmp_path):
    # configs/demo.yaml's model section: if its layout changes, only the flag below follows it
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "anovl.cli",
            "test",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--model.init_args.backbone",
            "RN50",
            "--data.init_args.root",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("anovl: error: RN50 is not supported by the V-V path"), lines


def test_hub_tokenizer_missing_names_it_and_the_way_out(no_weights_built):
    name = register_tiny("ViT-B-16-SigLIP")
    with pytest.raises(
        AnovlError,
        match=r"needs the Hugging Face tokenizer 'timm/ViT-B-16-SigLIP'.*"
        r"pass the local directory as tokenizer",
    ):
        create_backbone(name)


def test_local_tokenizer_directory_and_stand_in(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "a", "photo", "of", "damaged", "widget"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]").save_pretrained(tmp_path / "tok")
    name = register_tiny("ViT-B-16-SigLIP")
    vocab = tiny_config("ViT-B-16-SigLIP")["text_cfg"]["vocab_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fingerprints = set()
        for tokenizer in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
            backbone = create_backbone(name, image_size=64, tokenizer=str(tokenizer))
            ids = backbone.tokenizer(["a photo of a damaged widget"])
            assert ids[0, :6].tolist() == [2, 3, 4, 2, 5, 6] and int(ids.max()) < vocab
            assert backbone.clip.encode_text(ids).shape == (1, tiny_config("ViT-B-16-SigLIP")["embed_dim"])
            fingerprints.add(backbone.tokenizer.fingerprint)
        # the text cache keys on the directory's files: an edited tokenizer is another one
        assert len(fingerprints) == 1 and next(iter(fingerprints)).startswith("local:")
        config_file = tmp_path / "tok" / "tokenizer_config.json"
        config_file.write_text(config_file.read_text().replace("}", ', "model_max_length": 64}', 1))
        edited = create_backbone(name, image_size=64, tokenizer=str(tmp_path / "tok")).tokenizer.fingerprint
        assert edited not in fingerprints
        stand_in = create_backbone(name, image_size=64, tokenizer=lambda texts: torch.full((len(texts), 64), 7))
    assert stand_in.tokenizer(["x", "y"]).shape == (2, 64)
    with pytest.raises(AnovlError, match="tokenizer .*missing not found"):
        create_backbone(name, tokenizer=str(tmp_path / "missing"))


def test_hf_text_tower_offline_and_without_transformers(monkeypatch):
    config = tiny_config("roberta-ViT-B-32")
    name = register_model_config(config, name="anovl-tiny:roberta")
    with pytest.raises(
        AnovlError,
        match=r"text tower of anovl-tiny:roberta is the Hugging Face model 'roberta-base'.*"
        r"text_cfg.hf_model_name is that directory",
    ):
        create_backbone(name, tokenizer=lambda texts: torch.zeros(len(texts), 77, dtype=torch.long))
    real_import = builtins.__import__

    def without_transformers(module, *args, **kwargs):
        if module == "transformers" or module.startswith("transformers."):
            raise ImportError("no transformers")
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_transformers)
    with pytest.raises(AnovlError, match=r"needs the Hugging Face `transformers` package.*pip install anovl\[hf\]"):
        create_backbone(name)


@torch.no_grad()
def test_hf_text_tower_from_a_local_config(tmp_path):
    from transformers import RobertaConfig

    RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
    ).save_pretrained(tmp_path / "roberta")
    config = tiny_config("roberta-ViT-B-32")
    config["text_cfg"]["hf_model_name"] = str(tmp_path / "roberta")
    name = register_model_config(config, name="anovl-tiny:local-roberta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = create_backbone(name, image_size=64, tokenizer=lambda texts: torch.randint(3, 100, (len(texts), 77)))
    assert backbone.clip.encode_text(backbone.tokenizer(["a"])).shape == (1, config["embed_dim"])
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(backbone.visual(images).global_tokens, backbone.clip.encode_image(images))
