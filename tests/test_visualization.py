"""Heatmaps, panels and the 16-bit map encoding."""

import numpy as np
import torch
from PIL import Image

from anovl.data.transforms import normalize
from anovl.visualization import (
    denormalize,
    jet,
    map_to_png16,
    overlay_image,
    panel,
    picture_name,
    png16_to_map,
    scale_to_unit,
)


def test_jet_runs_from_blue_to_red():
    colours = jet(np.array([0.0, 0.5, 1.0]))
    assert colours[0].tolist() == [0, 0, 128]
    assert colours[1].tolist() == [128, 255, 128]
    assert colours[2].tolist() == [128, 0, 0]


def test_denormalize_inverts_clip_normalisation():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    assert np.array_equal(denormalize(normalize(rgb)), rgb)


def test_constant_map_scales_to_zero():
    assert not scale_to_unit(np.full((4, 4), 0.7)).any()


def test_panel_and_overlay_sizes():
    image = torch.zeros(3, 32, 48)
    anomaly_map = torch.rand(32, 48)
    picture = panel(image, anomaly_map, torch.ones(32, 48), "bottle/000")
    assert picture.mode == "RGB" and picture.height > 32 and picture.width > 3 * 48
    without_mask = panel(image, anomaly_map, None, "bottle/000")
    assert without_mask.size == picture.size
    assert overlay_image(image, anomaly_map).size == (48, 32)


def test_png16_round_trip(tmp_path):
    anomaly_map = torch.rand(17, 23)
    map_to_png16(anomaly_map).save(tmp_path / "map.png")
    decoded = png16_to_map(Image.open(tmp_path / "map.png"))
    assert decoded.dtype == np.float32 and decoded.shape == (17, 23)
    assert np.abs(decoded - anomaly_map.numpy()).max() <= 0.5 / 65535 + 1e-7


def test_picture_names():
    assert picture_name("/d/bottle/test/broken_large/000.png", "bottle") == "broken_large_000"
    assert picture_name("/d/my_parts/a.png", "my_parts") == "a"
