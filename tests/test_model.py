"""The public AnoVL module: outputs from its parts, batching, input errors."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from anovl import AnoVL, AnovlError
from anovl.models.components.scoring import patch_map
from anovl.models.anovl.views import make_views
from tests.conftest import TINY


@torch.no_grad()
def test_output_matches_a_direct_computation(tiny_model):
    images = torch.randn(2, 3, 64, 64)
    out = tiny_model(images, ["bottle", "carpet"])
    assert out.anomaly_map.shape == (2, 64, 64) and out.pred_score.shape == (2,)
    clip = tiny_model.clip
    states = torch.stack([tiny_model.text_states(c).states for c in ("bottle", "carpet")])
    # Image score: CLIP's own image embedding of each of the 22 views.
    views = make_views(images).reshape(22, 2, 3, 64, 64)
    global_tokens = torch.stack([clip.encode_image(v, normalize=True) for v in views])  # (22, 2, D)
    probs = torch.softmax(torch.einsum("vbd,bkd->vbk", global_tokens, states), -1)[..., 1]
    torch.testing.assert_close(out.pred_score, probs.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.global_tokens, clip.encode_image(images), rtol=1e-5, atol=1e-5)
    patch = F.normalize(out.patch_tokens[0], dim=-1)
    patch_probs = torch.softmax(torch.einsum("bnd,bkd->bnk", patch, states), -1)[..., 1]
    torch.testing.assert_close(out.anomaly_map, patch_map(patch_probs, 64))
    assert out.tfa_map is None
    assert ((out.anomaly_map >= 0) & (out.anomaly_map <= 1)).all()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_give_the_float32_result(tiny_model, dtype):
    images = torch.randn(2, 3, 64, 64).to(dtype)
    expected = tiny_model(images.float(), ["bottle", "carpet"])
    got = tiny_model(images, ["bottle", "carpet"])
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(got.pred_score, expected.pred_score)


@torch.no_grad()
def test_batch_equals_single_images_with_mixed_categories(tiny_model):
    images = torch.randn(4, 3, 64, 64)
    names = ["bottle", "carpet", "macaroni1", "bottle"]
    batched = tiny_model(images, names)
    for i, name in enumerate(names):
        single = tiny_model(images[i : i + 1], [name])
        torch.testing.assert_close(single.anomaly_map[0], batched.anomaly_map[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single.pred_score[0], batched.pred_score[i], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_one_view_uses_identity_only(tiny_model):
    images = torch.randn(2, 3, 64, 64)
    one_view = AnoVL(TINY, pretrained=None, num_views=1)
    one_view.load_state_dict(tiny_model.state_dict())
    one_view.text_cache = tiny_model.text_cache
    states = torch.stack([tiny_model.text_states("bottle").states] * 2)
    expected = torch.softmax(
        torch.einsum("bd,bkd->bk", tiny_model.clip.encode_image(images, normalize=True), states), -1
    )[:, 1]
    torch.testing.assert_close(one_view(images, ["bottle"] * 2).pred_score, expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_multi_layer_map_is_the_mean_of_layer_maps():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AnoVL(TINY, pretrained=None, layers=(1, -1))
    images = torch.randn(1, 3, 64, 64)
    out = model(images, ["bottle"])
    states = model.text_states("bottle").states[None]
    maps = [
        patch_map(torch.softmax(F.normalize(t, dim=-1) @ states[0].T, -1)[None, :, :, 1][0], 64)
        for t in out.patch_tokens
    ]
    torch.testing.assert_close(out.anomaly_map, (maps[0] + maps[1]) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "images, names, message",
    [
        (torch.randn(2, 3, 32, 32), ["a", "b"], "expects 64×64"),
        (torch.randn(2, 1, 64, 64), ["a", "b"], "B×3×S×S"),
        (torch.randn(2, 3, 64, 64), ["a"], "one category per image"),
        (torch.randn(1, 3, 64, 64), "a", "a list of categories"),
        (torch.randn(1, 3, 64, 64), [""], "non-empty strings"),
        (torch.randn(1, 3, 64, 64), [None], "non-empty strings"),
    ],
)
def test_bad_inputs(tiny_model, images, names, message):
    with pytest.raises(AnovlError, match=message):
        tiny_model(images, names)


def test_bad_constructor_arguments():
    with pytest.raises(AnovlError, match="num_views"):
        AnoVL(TINY, pretrained=None, num_views=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AnovlError, match="layer 7 out of range"):
            AnoVL(TINY, pretrained=None, layers=(7,))


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="random weights"):
        AnoVL(TINY, pretrained=None)


def test_stays_frozen_in_eval_mode(tiny_model):
    tiny_model.train()
    assert not tiny_model.training and not tiny_model.clip.training
    assert not any(p.requires_grad for p in tiny_model.parameters())


@torch.no_grad()
@pytest.mark.parametrize("loader", ["model", "clip"])
def test_loading_other_weights_re_encodes_the_text(tiny_model, loader):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = AnoVL(TINY, pretrained=None, init_seed=1)
    images = torch.randn(2, 3, 64, 64)
    before = tiny_model(images, ["bottle", "bottle"])  # caches the old weights' text in memory and on disk
    sentences = [*tiny_model.prompts.normal_sentences("bottle"), *tiny_model.prompts.abnormal_sentences("bottle")]
    old_file = tiny_model.text_cache.path(sentences)

    if loader == "model":
        tiny_model.load_state_dict(other.state_dict())
    else:
        tiny_model.clip.load_state_dict(other.clip.state_dict())

    assert tiny_model.text_cache.path(sentences) != old_file
    torch.testing.assert_close(tiny_model.text_states("bottle").sentences, other.text_states("bottle").sentences)
    after, expected = tiny_model(images, ["bottle", "bottle"]), other(images, ["bottle", "bottle"])
    torch.testing.assert_close(after.text_states, expected.text_states)
    torch.testing.assert_close(after.anomaly_map, expected.anomaly_map)
    assert not torch.allclose(after.text_states, before.text_states)


@pytest.mark.slow
@torch.no_grad()
def test_full_size_reference_backbone():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AnoVL("ViT-B-16-plus-240", pretrained=None, image_size=240)
    images = torch.randn(2, 3, 240, 240)
    out = model(images, ["bottle", "bottle"])
    assert out.anomaly_map.shape == (2, 240, 240) and out.patch_tokens[0].shape == (2, 225, 640)
    torch.testing.assert_close(out.global_tokens, model.clip.encode_image(images), rtol=1e-4, atol=1e-4)
    assert model.text_states("bottle").sentences.shape == (924, 640)
