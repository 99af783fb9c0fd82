"""Every ViT family open_clip ships, on tiny random-weight variants: the V-V path against a naive loop
written from each block's own weights (tests/reference/vv_attention.py), layer selection, the token-subset
forward, TTA, WinCLIP and AnomalyCLIP.

The default run covers one sample per block/attention type; ``pytest -m slow tests/test_backbones_families.py``
runs the remaining families (ViTamin, MobileCLIP-B, EVA01/EVA02-E, SigLIP2-gopt, the custom-block options).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from anovl import AnoVL
from anovl.backbones import create_backbone, register_model_config
from anovl.testing.tiny import tiny_timm_name, register_tiny, tiny_config
from anovl.errors import AnovlError
from anovl.models import WinCLIP
from anovl.models.anomalyclip import AnomalyCLIP
from anovl.models.anovl.tta import TTAConfig
from tests.reference.vv_attention import naive_local_tokens

FAST = [
    "ViT-L-14-CLIPA",
    "coca_ViT-B-32",
    "ViT-B-16-SigLIP",
    "PE-Core-T-16-384",
    "EVA02-B-16",
    "custom-qk-norm",
    "vit_relpos_medium_patch16_cls_224",
    "relpos-res-post-norm",
    "relpos-shared",
]
SLOW = [
    "ViTamin-S",
    "MobileCLIP-B",
    "EVA01-g-14",
    "EVA02-E-14",
    "ViT-gopt-16-SigLIP2-256",
    "vit_medium_patch16_gap_256",
]
FAMILIES = [*FAST, *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW)]
CUSTOM_BLOCKS = {  # variants of a config's vision tower that no open_clip config names
    # open_clip's custom block, switched on by these vision options
    "custom-qk-norm": (
        "ViT-B-16",
        dict(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True, ls_init_value=0.5),
    ),
    # timm's residual post-norm relative-position blocks, average pooled, no class token
    "relpos-res-post-norm": (
        "vit_relpos_medium_patch16_cls_224",
        dict(timm_model_name=tiny_timm_name("vit_relpos_medium_patch16_rpn_224"), timm_pool="avg"),
    ),
    # one relative-position bias shared by all blocks, held by the trunk
    "relpos-shared": (
        "vit_relpos_medium_patch16_cls_224",
        dict(timm_model_name=tiny_timm_name("vit_srelpos_medium_patch16_224"), timm_pool="avg"),
    ),
}
# Towers whose blocks apply the positions (not in the tokens): a token subset needs its patch positions.
POSITIONS_IN_BLOCKS = {
    "PE-Core-T-16-384": "rotary positions",
    "EVA02-B-16": "rotary positions",
    "vit_relpos_medium_patch16_cls_224": "a relative-position bias",
    "relpos-res-post-norm": "a relative-position bias",
    "relpos-shared": "a relative-position bias",
}


def tiny_name(family: str, simple_tokenizer: bool = True) -> str:
    if family in CUSTOM_BLOCKS:
        base, vision_options = CUSTOM_BLOCKS[family]
        config = tiny_config(base)
        config["vision_cfg"].update(vision_options)
        return register_model_config(config, name=f"anovl-tiny:{family}")
    return register_tiny(family, simple_tokenizer=simple_tokenizer)


def build(family: str, **kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = tiny_name(family)
        patch = create_backbone(name).visual.patch_size
        backbone = create_backbone(name, image_size=4 * patch, **kwargs)
    enlarge_tiny_scales(backbone.clip.visual)
    return backbone


@torch.no_grad()
def enlarge_tiny_scales(visual: torch.nn.Module) -> None:
    """timm starts layer scales (and residual post-norm weights) at 1e-6, which would shrink every residual
    branch below the tolerances: give such parameters O(1) values."""
    for parameter in visual.parameters():
        if 0 < parameter.abs().max() <= 1e-5:
            parameter.uniform_(0.5, 1.0)


# --- tests ---------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_dual_path_matches_naive_reference_at_every_layer(family):
    backbone = build(family)
    encoder = backbone.visual
    size = backbone.image_size
    images = torch.randn(2, 3, size, size)
    expected = naive_local_tokens(encoder.visual, images)
    out = encoder(images, layers=tuple(range(encoder.num_layers)))
    assert len(out.patch_tokens) == encoder.num_layers == len(expected)
    grid = encoder.grid_size(size)
    for got, want in zip(out.patch_tokens, expected):
        assert got.shape == (2, grid * grid, want.shape[-1])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the global token is the tower's own image embedding (CoCa's encode_image normalises)
    torch.testing.assert_close(
        F.normalize(out.global_tokens, dim=-1),
        F.normalize(backbone.clip.encode_image(images), dim=-1),
        rtol=1e-4,
        atol=1e-5,
    )
    # layer selection: only the chosen blocks, in block order, equal to the all-layer pass
    chosen = encoder(images, num_local=1, layers=(-1, 0))
    assert [t.shape[0] for t in chosen.patch_tokens] == [1, 1]
    torch.testing.assert_close(chosen.patch_tokens[0], out.patch_tokens[0][:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chosen.patch_tokens[1], out.patch_tokens[-1][:1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("family", FAST)
def test_token_subset_forward(family):
    backbone = build(family)
    encoder = backbone.visual
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    tokens = encoder.embed(images)
    torch.testing.assert_close(
        F.normalize(encoder.encode_tokens(tokens), dim=-1),
        F.normalize(backbone.clip.encode_image(images), dim=-1),
        rtol=1e-4,
        atol=1e-5,
    )
    prefix = encoder.num_prefix_tokens
    keep = torch.tensor([0, 5, 6, 9])
    subset = torch.cat([tokens[:, :prefix], tokens[:, prefix:][:, keep]], 1)
    if family in POSITIONS_IN_BLOCKS:
        with pytest.raises(
            AnovlError,
            match=rf"inside its blocks \({POSITIONS_IN_BLOCKS[family]}\): give the "
            r"patch_positions of the 4 patch tokens \(of 16\)",
        ):
            encoder.encode_tokens(subset)
        embedding = encoder.encode_tokens(subset, patch_positions=keep)
    else:
        embedding = encoder.encode_tokens(subset)
    assert embedding.shape == (2, backbone.clip.encode_image(images).shape[-1])
    assert not torch.allclose(
        F.normalize(embedding, dim=-1), F.normalize(encoder.encode_tokens(tokens), dim=-1), atol=1e-3
    )


@torch.no_grad()
@pytest.mark.parametrize("family", ["vit_relpos_medium_patch16_cls_224", "relpos-res-post-norm", "relpos-shared"])
def test_relative_position_window_is_the_tower_run_on_that_window(family):
    # timm's log-coordinate bias depends on token offsets alone, so the top-left 2×2 window of a 4×4 grid is
    # what timm's own forward gives for the 2×2 crop on the same weights built for a 2×2 grid.
    backbone = build(family)
    patch = backbone.visual.patch_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = create_backbone(tiny_name(family), image_size=2 * patch)
    small.clip.load_state_dict(backbone.clip.state_dict())
    images = torch.randn(2, 3, 4 * patch, 4 * patch)
    encoder = backbone.visual
    tokens, prefix, keep = encoder.embed(images), encoder.num_prefix_tokens, torch.tensor([0, 1, 4, 5])
    window = torch.cat([tokens[:, :prefix], tokens[:, prefix:][:, keep]], 1)
    torch.testing.assert_close(
        encoder.encode_tokens(window, patch_positions=keep),
        small.clip.encode_image(images[..., : 2 * patch, : 2 * patch]),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_tta_runs_on_the_family(family):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = tiny_name(family)
        size = 4 * create_backbone(name).visual.patch_size
        model = AnoVL(
            name,
            pretrained=None,
            image_size=size,
            num_views=2,
            tta=TTAConfig(adapter="linear", steps=1),
            use_text_cache=False,
        )
    out = model(torch.randn(2, 3, size, size), ["widget", "widget"])
    assert out.anomaly_map.shape == (2, size, size) and torch.isfinite(out.anomaly_map).all()
    assert out.tfa_map is not None and not torch.allclose(out.anomaly_map, out.tfa_map)
    assert out.pred_score.shape == (2,) and torch.isfinite(out.pred_score).all()


@torch.no_grad()
@pytest.mark.parametrize("family", FAST)
def test_winclip_runs_on_the_family(family):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = tiny_name(family)
        size = 4 * create_backbone(name).visual.patch_size
        model = WinCLIP(name, pretrained=None, image_size=size, use_text_cache=False)
    images = torch.randn(2, 3, size, size)
    out = model(images, ["widget", "widget"])
    assert out.anomaly_map.shape == (2, size, size) and torch.isfinite(out.anomaly_map).all()
    encoder = model.encoder
    assert encoder.positions_in_blocks == (family in POSITIONS_IN_BLOCKS)
    # Windows by hand: their prefix and patch tokens alone, with their positions where the blocks apply them.
    tokens, prefix = encoder.embed(images), encoder.num_prefix_tokens
    for scale, window in ((0, 0), (0, -1), (1, -1)):  # windows are batched: check the first and last ones
        mask = model.masks[scale][window]
        alone = torch.cat([tokens[:, :prefix], tokens[:, prefix:][:, mask]], 1)
        expected = encoder.encode_tokens(alone, patch_positions=mask if encoder.positions_in_blocks else None)
        torch.testing.assert_close(out.window_embeddings[scale][:, window], expected, rtol=1e-4, atol=1e-5)
    first, last = (
        F.normalize(out.window_embeddings[0][:, 0], dim=-1),
        F.normalize(out.window_embeddings[0][:, -1], dim=-1),
    )
    assert not torch.allclose(first, last, atol=1e-3)


def tiny_name_with_text_blocks(family: str, text_layers: int = 2) -> str:
    """The family's tiny config with ``text_layers`` text blocks (AnomalyCLIP's deep tokens need two or more)."""
    base, vision_options = CUSTOM_BLOCKS.get(family, (family, {}))
    config = tiny_config(base, simple_tokenizer=True)
    config["vision_cfg"].update(vision_options)
    config["text_cfg"]["layers"] = text_layers
    # open_clip picks SigLIP's hub tokenizer by the model name alone (anovl.testing.tiny.register_tiny)
    return register_model_config(config, name=f"anovl-tiny-text{text_layers}:{family.replace('SigLIP', 'Sig-LIP')}")


@pytest.mark.parametrize("family", FAST)
def test_anomalyclip_runs_on_the_family(family):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = tiny_name_with_text_blocks(family)
        size = 4 * create_backbone(name).visual.patch_size
        model = AnomalyCLIP(
            name,
            pretrained=None,
            image_size=size,
            layers=(1, 2),
            dpam_blocks=1,
            n_ctx=3,
            depth=2,
            t_n_ctx=2,
            sigma=1.0,
            use_text_cache=False,
        )
    enlarge_tiny_scales(model.clip.visual)
    images = torch.randn(2, 3, size, size)
    # DPAM: the local stream branches off at the last block; block 1's tokens are the original stream's.
    expected = naive_local_tokens(model.encoder.visual, images, start=1)
    with torch.no_grad():
        encoded = model.encode_images(images)
    for got, want in zip(encoded.patch_tokens, expected):  # relative to the scale (PE-Core's tokens are ~1e-5)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # The text tower run from its embeddings is its own encode_text (CoCa's normalises).
    tower, ids = model.text_tower, model.token_ids
    with torch.no_grad():
        torch.testing.assert_close(
            F.normalize(tower.encode(tower.token_embedding(ids), ids), dim=-1),
            F.normalize(model.clip.encode_text(ids), dim=-1),
            rtol=1e-5,
            atol=1e-5,
        )
    out = model(images, ["widget", "widget"])
    assert out.anomaly_map.shape == (2, size, size) and torch.isfinite(out.anomaly_map).all()
    assert out.pred_score.shape == (2,) and torch.isfinite(out.pred_score).all()
    # Gradients reach the learned context and the deep tokens, and nothing of the frozen CLIP.
    states = model.learned_states()
    (states[1] @ torch.randn(states.shape[1])).backward()
    assert model.prompts.context.grad.abs().sum() > 0 and model.prompts.deep_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.clip.parameters())
