"""WinCLIP's pieces against naive references, its behaviour on tiny random models, and bad input.
(Equality with anomalib's WinClipModel: tests/test_winclip_parity.py.)"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from anovl.errors import AnovlError
from anovl.models.winclip import WinCLIP, WinCLIPPrompts
from anovl.models.winclip.windows import check_scales, harmonic_aggregation, harmonic_mean, window_masks
from tests.conftest import TINY  # 64 px, patch 16: a 4×4 grid
from tests.reference.winclip import masked_window_embedding, naive_harmonic_aggregation, naive_window_masks


def make_winclip(**kwargs) -> WinCLIP:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WinCLIP(TINY, pretrained=None, **kwargs)


@pytest.fixture(scope="module")
def winclip():
    return make_winclip(use_text_cache=False)


@pytest.mark.parametrize("grid, scale", [(g, s) for g in (1, 4, 6) for s in range(1, g + 1)])
def test_window_masks_list_every_window_row_by_row(grid, scale):
    assert window_masks(grid, scale).tolist() == naive_window_masks(grid, scale)


def test_window_masks_equal_anomalibs_documented_example():
    # anomalib's make_masks((4, 4), 2) docstring, one column per window: here one row per window.
    expected = torch.tensor(
        [
            [0, 1, 2, 4, 5, 6, 8, 9, 10],
            [1, 2, 3, 5, 6, 7, 9, 10, 11],
            [4, 5, 6, 8, 9, 10, 12, 13, 14],
            [5, 6, 7, 9, 10, 11, 13, 14, 15],
        ]
    ).T
    assert torch.equal(window_masks(4, 2), expected)
    # ViT-B-16-plus-240's 15×15 grid: 196 windows of 2×2 and 169 of 3×3 (anomalib's encode_image docstring).
    assert window_masks(15, 2).shape == (196, 4) and window_masks(15, 3).shape == (169, 9)


@pytest.mark.parametrize("grid, scale", [(4, 2), (5, 3), (3, 1)])
def test_harmonic_aggregation_is_the_harmonic_mean_of_covering_windows(grid, scale):
    masks = window_masks(grid, scale)
    scores = torch.rand(2, masks.shape[0], generator=torch.Generator().manual_seed(grid)) + 0.01
    expected = naive_harmonic_aggregation(scores.double(), masks.tolist(), grid)
    assert torch.allclose(harmonic_aggregation(scores, masks, grid).double(), expected, atol=1e-6)


def test_harmonic_aggregation_equals_anomalibs_documented_example_and_zero_scores():
    masks = torch.tensor([[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]])
    result = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), masks, 3)
    expected = torch.tensor([[[1.0, 0.8571, 0.75], [0.6667, 0.48, 0.375], [0.5, 0.3333, 0.25]]])
    assert torch.allclose(result, expected, atol=1e-4)
    # A zero window score zeroes the patches it covers (1/0 = inf), and only those.
    zero = harmonic_aggregation(torch.tensor([[0.0, 0.5, 0.5, 0.5]]), masks, 3)[0]
    assert zero[0, 0] == 0 and zero[1, 1] == 0 and torch.allclose(zero[2, 2], torch.tensor(0.5))


def test_harmonic_mean_against_the_formula():
    maps = [torch.rand(2, 4, 4) + 0.1 for _ in range(3)]
    expected = 3 / sum(1 / m.double() for m in maps)
    assert torch.allclose(harmonic_mean(maps).double(), expected, atol=1e-6)


@pytest.mark.parametrize("scales", [(5,), (0,), (2, 2), "23", (2.0,), (True,), 2])
def test_bad_scales_are_refused(scales):
    with pytest.raises(AnovlError, match="scale"):
        make_winclip(scales=scales)


def test_without_windows_the_map_is_the_whole_image_score():
    # No scales is not an error in anomalib either.
    assert check_scales((), 4) == ()
    out = make_winclip(use_text_cache=False, scales=())(torch.randn(2, 3, 64, 64), ["bottle", "screw"])
    assert torch.allclose(out.anomaly_map, out.pred_score.view(-1, 1, 1).expand(-1, 64, 64))


def test_bad_settings_are_refused():
    with pytest.raises(AnovlError, match="multiple of the patch size"):
        make_winclip(image_size=70)
    with pytest.raises(AnovlError, match="temperature"):
        make_winclip(temperature=0)
    with pytest.raises(AnovlError, match=r"\{\}"):
        WinCLIPPrompts(templates=("a photo",))


def test_bad_inputs_are_refused(winclip):
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(AnovlError, match="expects 64×64"):
        winclip(torch.randn(2, 3, 96, 96), ["bottle", "bottle"])
    with pytest.raises(AnovlError, match="one category per image"):
        winclip(images, ["bottle"])
    with pytest.raises(AnovlError, match="not the string"):
        winclip(images, "bottle")
    with pytest.raises(AnovlError, match="B×3×S×S"):
        winclip(images[0], ["bottle"])
    with pytest.raises(AnovlError, match="non-empty"):
        winclip(images, ["bottle", "bottle"], prompt_names=["bottle", " "])


def test_sentences_are_anomalibs_ensemble():
    prompts = WinCLIPPrompts()
    normal, anomalous = prompts.normal_sentences("bottle"), prompts.abnormal_sentences("bottle")
    assert (len(normal), len(anomalous)) == (7 * 21, 4 * 21)
    assert normal[0] == "a cropped photo of the bottle." and anomalous[0] == "a cropped photo of the damaged bottle."
    assert normal[21] == "a cropped photo of the flawless bottle."


def test_text_states_are_the_normalised_mean_of_unnormalised_sentence_embeddings(winclip):
    tokenizer = winclip.text_cache.backbone.tokenizer
    with torch.no_grad():
        normal = winclip.clip.encode_text(tokenizer(winclip.prompts.normal_sentences("screw"))).mean(0)
        anomalous = winclip.clip.encode_text(tokenizer(winclip.prompts.abnormal_sentences("screw"))).mean(0)
    expected = F.normalize(torch.stack([normal, anomalous]), dim=-1)
    assert torch.allclose(winclip.text_states("screw").states, expected, atol=1e-6)


def test_window_embeddings_are_each_windows_own_and_differ(winclip):
    """The token-subset forward sees only the window (anomalib #2571 made every window's embedding the same)."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    _, window_embeddings = winclip.encode(images)
    for masks, embeddings in zip(winclip.masks, window_embeddings):
        for index, window in enumerate(masks.tolist()):
            assert torch.allclose(embeddings[:, index], masked_window_embedding(winclip, images, window), atol=1e-5)
        distances = torch.cdist(embeddings, embeddings)  # (B, W, W)
        off_diagonal = ~torch.eye(masks.shape[0], dtype=torch.bool)
        assert distances[:, off_diagonal].min() > 1e-3


def test_forward_composes_the_scales_and_keeps_images_independent(winclip):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    categories = ["bottle", "carpet", "bottle"]
    out = winclip(images, categories)
    assert out.anomaly_map.shape == (3, 64, 64) and out.pred_score.shape == (3,)
    whole = out.pred_score.view(-1, 1, 1).expand(-1, 4, 4)
    grid_map = 3 / (1 / whole + 1 / out.scale_maps[0] + 1 / out.scale_maps[1])
    assert torch.allclose(out.anomaly_map, F.interpolate(grid_map[:, None], size=(64, 64), mode="bilinear")[:, 0])
    # Each image alone gives what it gets in a mixed batch.
    for index in range(3):
        alone = winclip(images[index : index + 1], categories[index : index + 1])
        assert torch.allclose(alone.anomaly_map[0], out.anomaly_map[index], atol=1e-6)
        assert torch.allclose(alone.pred_score[0], out.pred_score[index], atol=1e-6)
    # The prompt name, not the category, goes into the prompts.
    renamed = winclip(images[:1], ["bottle"], prompt_names=["vase"])
    assert not torch.allclose(renamed.pred_score, out.pred_score[:1])


def test_new_weights_re_encode_the_text(winclip):
    other = make_winclip(use_text_cache=False, init_seed=1)
    before = winclip.text_states("bottle").states.clone()
    model = make_winclip(use_text_cache=False)
    assert torch.equal(model.text_states("bottle").states, before)
    model.load_state_dict(other.state_dict())
    assert torch.allclose(model.text_states("bottle").states, other.text_states("bottle").states)
    assert not torch.allclose(model.text_states("bottle").states, before)


def test_label_names_what_differs_from_anomalibs_settings(winclip):
    base = winclip.label
    assert base.startswith("WinCLIP[") and "backbone=anovl-tiny-vit" in base and "scales" not in base
    changed = make_winclip(use_text_cache=False, scales=(2,), temperature=0.1).label
    assert "scales=2" in changed and "temperature=0.1" in changed
    assert make_winclip(use_text_cache=False, prompts=WinCLIPPrompts(templates=("a photo of a {}.",))).label != base
