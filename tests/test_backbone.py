"""The V-V backbone: CLIP's path unchanged, the local path against a naive loop, weights loading."""

import pickle
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from anovl.backbones import create_backbone, register_model_config
from anovl.errors import AnovlError
from tests.conftest import TINY
from tests.reference.vv_attention import naive_local_streams


def quiet_backbone(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_backbone(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return quiet_backbone(TINY)


@torch.no_grad()
def test_global_token_is_clips_image_embedding(tiny):
    images = torch.randn(3, 3, 64, 64)
    expected = tiny.clip.encode_image(images)
    for num_local in (0, 1, 3):
        out = tiny.visual(images, num_local=num_local)
        torch.testing.assert_close(out.global_tokens, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_local_path_matches_naive_loop_at_every_layer(tiny):
    images = torch.randn(2, 3, 64, 64)
    streams = naive_local_streams(tiny.visual.visual, images)
    out = tiny.visual(images, layers=(0, 1, 2))
    visual = tiny.visual.visual
    for layer, tokens in enumerate(out.patch_tokens):
        expected = visual.ln_post(streams[layer][:, 1:]) @ visual.proj
        torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-5)
    assert out.patch_tokens[0].shape == (2, 16, 32)


@torch.no_grad()
def test_local_tokens_only_for_the_first_images(tiny):
    images = torch.randn(4, 3, 64, 64)
    partial = tiny.visual(images, num_local=2)
    alone = tiny.visual(images[:2])
    assert partial.patch_tokens[0].shape[0] == 2
    torch.testing.assert_close(partial.patch_tokens[0], alone.patch_tokens[0], rtol=1e-5, atol=1e-6)


def test_backbone_is_frozen(tiny):
    assert not any(p.requires_grad for p in tiny.clip.parameters())
    assert not tiny.clip.training


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["pt", "safetensors", "checkpoint", "module_prefix"])
def test_local_weights_round_trip(tiny, tmp_path, fmt):
    state = tiny.clip.state_dict()
    path = tmp_path / f"weights.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "pt":
        torch.save(state, path)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "checkpoint":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    loaded = create_backbone(TINY, pretrained=str(path))
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.clip.encode_image(images), tiny.clip.encode_image(images))
    assert loaded.weights_fingerprint.startswith("file-")


@torch.no_grad()
def test_position_embedding_interpolated_to_new_image_size(tiny, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny.clip.state_dict(), path)
    big = create_backbone(TINY, pretrained=str(path), image_size=96)
    old = tiny.clip.visual.positional_embedding
    grid = old[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected_grid = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.cat([old[:1], expected_grid.permute(0, 2, 3, 1).reshape(36, -1)])
    torch.testing.assert_close(big.clip.visual.positional_embedding, expected)
    out = big.visual(torch.randn(1, 3, 96, 96))
    assert out.patch_tokens[0].shape == (1, 36, 32)
    assert big.visual.grid_size(96) == 6


def test_unknown_backbone_suggests_names():
    with pytest.raises(AnovlError, match=r"unknown backbone 'ViT-B-16-plus-24'.*did you mean.*ViT-B-16-plus-240"):
        create_backbone("ViT-B-16-plus-24")


def test_missing_weights_file(tmp_path):
    with pytest.raises(AnovlError, match="weights file not found"):
        create_backbone(TINY, pretrained=str(tmp_path / "nope.pt"))


def test_unknown_tag():
    with pytest.raises(AnovlError, match="unknown pretrained tag 'laion5b'.*laion400m_e32"):
        create_backbone("ViT-B-16-plus-240", pretrained="laion5b")


def test_weights_for_another_architecture(tmp_path):
    small = quiet_backbone("anovl-small-vit")
    path = tmp_path / "small.pt"
    torch.save(small.clip.state_dict(), path)
    with pytest.raises(AnovlError, match=r"does not fit backbone anovl-tiny-vit"):
        create_backbone(TINY, pretrained=str(path))


@pytest.mark.parametrize("payload", [b"", b"not a checkpoint at all" * 10])
def test_corrupt_weights_file(tmp_path, payload):
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(payload)
        with pytest.raises(AnovlError, match=f"cannot read weights file .*bad{suffix}"):
            create_backbone(TINY, pretrained=str(path))


class _RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_weights_file_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"visual.proj": _RunsCode()}, handle)
    with pytest.raises(AnovlError, match="cannot read weights file"):
        create_backbone(TINY, pretrained=str(path))
    assert not (tmp_path / "PWNED").exists()


def test_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(AnovlError, match="image_size 70 is not a multiple of the patch size 16.*use e.g. 64"):
        create_backbone(TINY, image_size=70)


def test_registered_config_by_dict_and_json(tmp_path):
    cfg = open_clip.get_model_config(TINY)
    cfg["vision_cfg"]["layers"] = 2
    assert register_model_config(cfg, name="test-two-block") == "test-two-block"
    assert quiet_backbone("test-two-block").visual.num_layers == 2
    path = tmp_path / "test-json-vit.json"
    path.write_text(__import__("json").dumps(cfg))
    assert quiet_backbone(str(path)).name == "test-json-vit"


def test_unsupported_block_option_gets_a_clear_error():
    cfg = open_clip.get_model_config(TINY)
    cfg["vision_cfg"]["scaled_cosine_attn"] = True
    register_model_config(cfg, name="test-cosine-block")
    with pytest.raises(AnovlError, match="test-cosine-block is not supported by the V-V path: scaled cosine attention"):
        quiet_backbone("test-cosine-block")


@pytest.mark.parametrize(
    "name, image_size, grid",
    [
        ("ViT-B-16", 224, 14),
        ("ViT-B-16-plus-240", 240, 15),
        ("ViT-L-14-336", 518, 37),
    ],
)
@torch.no_grad()
def test_builtin_families_at_two_blocks(name, image_size, grid):
    # The built-in configs with their depth cut to two blocks: same block types, widths, heads and patch
    # sizes as the full models, at a fraction of the build time.
    cfg = open_clip.get_model_config(name)
    cfg["vision_cfg"]["layers"], cfg["text_cfg"]["layers"] = 2, 1
    backbone = quiet_backbone(register_model_config(cfg, name=f"test-{name}-2blocks"), image_size=image_size)
    images = torch.randn(1, 3, image_size, image_size)
    out = backbone.visual(images)
    assert out.patch_tokens[0].shape == (1, grid * grid, cfg["embed_dim"])
    torch.testing.assert_close(out.global_tokens, backbone.clip.encode_image(images), rtol=1e-4, atol=1e-4)


def test_tag_download_failure_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(
        AnovlError, match=r"could not get ViT-B-16-plus-240 weights 'laion400m_e32' \(OSError\).*local file"
    ):
        create_backbone("ViT-B-16-plus-240", pretrained="laion400m_e32")


@torch.no_grad()
@pytest.mark.parametrize("num_local", [0, 2, 5, 7])
def test_chunked_passes_equal_one_pass(tiny, num_local):
    images = torch.randn(7, 3, 64, 64)
    whole = tiny.visual(images, num_local=num_local, layers=(0, -1))
    chunked = tiny.visual(images, num_local=num_local, layers=(0, -1), chunk_size=3)
    torch.testing.assert_close(chunked.global_tokens, whole.global_tokens, rtol=1e-5, atol=1e-6)
    assert len(chunked.patch_tokens) == len(whole.patch_tokens) == (2 if num_local else 0)
    for got, expected in zip(chunked.patch_tokens, whole.patch_tokens):
        assert got.shape[0] == num_local
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
