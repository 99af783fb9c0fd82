"""Map pipeline and image-score views (docs/METHOD.md §4) against independent computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anovl.models.components.scoring import abnormal_probability, anomaly_map, image_score
from anovl.models.anovl.views import make_views
from tests.reference.maps_views import numpy_map, reference_views


def test_abnormal_probability_is_softmax_of_raw_cosines():
    states = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    tokens = torch.tensor([[[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]]])
    # cosines: (1, 0), (0, 1), (1/√2, 1/√2) — no temperature.
    expected = torch.tensor([[1 / (1 + math.e), math.e / (1 + math.e), 0.5]])
    torch.testing.assert_close(abnormal_probability(tokens, states), expected)


def test_map_pipeline_on_hand_made_grid():
    grid, size = 4, 13
    angles = torch.linspace(0, math.pi / 2, grid * grid)
    tokens = torch.stack([torch.cos(angles), torch.sin(angles), torch.zeros_like(angles)], -1)[None] * 3.0
    states = torch.eye(3)[None, :2]
    probabilities = 1 / (1 + torch.exp(torch.cos(angles) - torch.sin(angles)))
    expected = numpy_map(probabilities.reshape(grid, grid).double().numpy(), size)
    got = anomaly_map(tokens, states, size)
    assert got.shape == (1, size, size)
    np.testing.assert_allclose(got[0].double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_image_score_averages_views_per_image():
    states = torch.eye(2)[None].repeat(2, 1, 1)
    views = torch.randn(3 * 2, 2)  # 3 views of 2 images, view-major
    probabilities = torch.softmax(F.normalize(views, dim=-1), -1)[:, 1].reshape(3, 2)
    torch.testing.assert_close(image_score(views, states), probabilities.mean(0))


def test_reference_views():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16)
    views = make_views(images).reshape(22, 2, 3, 16, 16)
    expected = reference_views(images)
    torch.testing.assert_close(views[0], expected.identity)
    for index, rotated in enumerate(expected.rotations, start=1):
        torch.testing.assert_close(views[index], rotated, rtol=1e-5, atol=1e-5)
    translations = list(expected.translations)
    for view in views[9:17]:
        matches = [i for i, e in enumerate(translations) if torch.allclose(view, e, atol=1e-5)]
        assert len(matches) == 1
        translations.pop(matches[0])
    assert translations == []
    torch.testing.assert_close(views[17], expected.flip)
    torch.testing.assert_close(views[18], expected.grayscale)
    for k, turned in enumerate(expected.quarter_turns, start=1):
        torch.testing.assert_close(views[18 + k], turned)


def test_rotation_by_quarter_turn_matches_rot90():
    # The affine rotation path with align_corners=True is exact on the pixel grid at 90°.
    images = torch.randn(1, 3, 8, 8)
    grid = F.affine_grid(torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]]), [1, 3, 8, 8], align_corners=True)
    rotated = F.grid_sample(images, grid, padding_mode="reflection", align_corners=True)
    assert min((rotated - torch.rot90(images, k, (2, 3))).abs().max() for k in (1, 3)) < 1e-5


@pytest.mark.parametrize("count", [1, 9, 17, 18, 22])
def test_fewer_views_are_a_prefix(count):
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(make_views(images, count), make_views(images)[: 2 * count])


def test_view_count_bounds():
    with pytest.raises(ValueError):
        make_views(torch.randn(1, 3, 8, 8), 23)
