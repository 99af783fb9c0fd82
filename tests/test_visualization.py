"""Heatmaps on a fixed scale, outlines, panels, resizing maps back, the 16-bit map encoding, output names."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, PngImagePlugin

from anovl import AnovlError
from anovl.data.transforms import normalize
from anovl.io.output_names import OutputNames, output_component, output_stem
from anovl.visualization import (
    BAR_WIDTH,
    COLUMN_TITLES,
    LINE_HEIGHT,
    OVERLAY_ALPHA,
    PANEL_GAP,
    _font,
    _text_width,
    colour_bar,
    colour_bar_ticks,
    denormalize,
    jet,
    map_to_png16,
    overlay,
    panel,
    panel_lines,
    png16_to_map,
    write_map_png16,
    resize_map,
)
from tests.reference import visualization_range1 as range1

RANGE1_REFERENCE = Path(__file__).parent / "reference" / "data" / "visualization_range1.npz"


def test_jet_runs_from_blue_to_red():
    colours = jet(np.array([0.0, 0.5, 1.0]))
    assert colours[0].tolist() == [0, 0, 128]
    assert colours[1].tolist() == [128, 255, 128]
    assert colours[2].tolist() == [128, 0, 0]


def test_denormalize_inverts_clip_normalisation():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    assert np.array_equal(denormalize(normalize(rgb)), rgb)


def blend(rgb: np.ndarray, value: float) -> np.ndarray:
    """Naive reference: one pixel of the jet colour of ``value`` over ``rgb`` at OVERLAY_ALPHA."""
    return np.round((1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * jet(np.array(value)).astype(float)).astype(np.uint8)


def test_overlay_colours_use_the_fixed_probability_scale():
    rgb = np.full((6, 6, 3), 100, dtype=np.uint8)
    # A flat map with a spread of 0.002 stays one colour (per-image scaling would stretch it to blue..red) ...
    nearly_flat = np.full((6, 6), 0.500)
    nearly_flat[0, 0] = 0.502
    coloured = overlay(rgb, nearly_flat)
    assert np.abs(coloured.astype(int) - blend(rgb[0, 0], 0.5)).max() <= 2  # per-image scaling: over 60
    # ... and equal values give equal colours in any image; values outside [0, 1] are clipped.
    assert np.array_equal(overlay(rgb, np.full((6, 6), 0.9))[2, 2], blend(rgb[0, 0], 0.9))
    assert np.array_equal(overlay(rgb, np.full((6, 6), 1.7))[2, 2], blend(rgb[0, 0], 1.0))


def test_overlay_outlines_the_thresholded_region():
    rgb = np.zeros((12, 12, 3), dtype=np.uint8)
    anomaly_map = np.zeros((12, 12))
    anomaly_map[3:9, 2:7] = 0.8
    coloured = overlay(rgb, anomaly_map, pixel_threshold=0.8)  # >= threshold is inside
    region = anomaly_map >= 0.8
    padded = np.pad(region, 1)
    # Naive boundary: region pixels with a 4-neighbour outside the region.
    boundary = region & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    white = (coloured == 255).all(axis=2)
    assert np.array_equal(white, boundary)
    assert not (overlay(rgb, anomaly_map, pixel_threshold=0.81) == 255).all(axis=2).any()


def test_no_outline_is_claimed_where_the_whole_map_is_on_one_side_of_the_threshold():
    rgb = np.zeros((12, 12, 3), dtype=np.uint8)
    anomaly_map = np.full((12, 12), 0.6)
    anomaly_map[4:8, 4:8] = 0.9
    # All of the map is at or above 0.5: no outline (it would only frame the image), and the text says so.
    assert not (overlay(rgb, anomaly_map, pixel_threshold=0.5) == 255).all(axis=2).any()
    assert "all of it >= 0.5000: no outline" in panel_lines("b", "x", 1, 0.7, 0.5, 0.5, (0.6, 0.9))[2]
    assert "all of it < 0.9500: no outline" in panel_lines("b", "x", 1, 0.7, 0.5, 0.95, (0.6, 0.9))[2]
    lines = panel_lines("b", "x", 1, 0.7, 0.5, 0.7, (0.6, 0.9))
    assert "outline: map >= 0.7000" in lines[2] and (overlay(rgb, anomaly_map, 0.7) == 255).all(axis=2).any()


@pytest.mark.parametrize(("source", "target"), [((7, 9), (427, 640)), ((224, 224), (100, 61)), ((8, 8), (8, 8))])
def test_resize_map_equals_pillow_bilinear(source, target):
    anomaly_map = torch.rand(source, generator=torch.Generator().manual_seed(0))
    resized = resize_map(anomaly_map, target)
    # Pillow's float ("F") bilinear resize: pixel centres aligned, antialiased when shrinking.
    reference = np.asarray(Image.fromarray(anomaly_map.numpy()).resize(target[::-1], Image.Resampling.BILINEAR))
    assert resized.shape == target
    assert np.abs(resized.numpy() - reference).max() < 1e-5


def test_colour_bar_shows_the_scale_and_the_threshold():
    bar = np.asarray(colour_bar(101, pixel_threshold=0.25))
    assert bar[0, 0].tolist() == jet(np.array(1.0)).tolist()  # top: 1
    assert bar[100, 0].tolist() == jet(np.array(0.0)).tolist()  # bottom: 0
    assert bar[50, 0].tolist() == jet(np.array(0.5)).tolist()
    threshold_row = round(0.75 * 100)
    assert (bar[threshold_row, :BAR_WIDTH] == 0).all()  # the black threshold line


def test_panel_shows_columns_text_and_bar():
    rgb = np.full((64, 64, 3), 200, dtype=np.uint8)
    low, high = np.full((64, 64), 0.2), np.full((64, 64), 0.8)
    lines = panel_lines("bottle", "broken_000", 1, 0.734, 0.61, 0.5, (0.2, 0.8), "highest-scoring anomalous")
    assert lines[1] == "score 0.7340 >= threshold 0.6100: anomalous"
    assert "label: anomalous" in lines[0] and "fixed 0-1 scale" in lines[2] and lines[3].endswith("anomalous")
    picture_low, picture_high = panel(rgb, low, None, lines), panel(rgb, high, np.ones((64, 64), bool), lines)
    assert picture_low.size == picture_high.size and picture_low.width > 3 * 64 + BAR_WIDTH
    top = picture_low.height - 64
    third_tile = (2 * (64 + 4) + 32, top + 32)
    # Fixed scale: a flat 0.2 map and a flat 0.8 map get different colours (per-image scaling: the same).
    assert picture_low.getpixel(third_tile) == tuple(blend(rgb[0, 0], 0.2))
    assert picture_high.getpixel(third_tile) == tuple(blend(rgb[0, 0], 0.8))
    assert picture_high.getpixel((64 + 4 + 32, top + 32)) == (255, 255, 255)  # ground truth
    assert picture_low.getpixel((64 + 4 + 32, top + 32)) == (128, 128, 128)  # none
    unlabelled = panel_lines("parts", "a", -1, 0.4, None, None, (0.1, 0.9))
    assert "label: unlabelled" in unlabelled[0] and unlabelled[1] == "score 0.4000  (no threshold)"


def dark_pixels(image):
    return int((np.asarray(image.convert("L")) < 128).sum())


def alone(text):
    """The dark pixels of ``text`` drawn alone in the panels' font."""
    canvas = Image.new("RGB", (400, LINE_HEIGHT), "white")
    ImageDraw.Draw(canvas).text((10, 0), text, fill="black", font=_font())
    return dark_pixels(canvas)


def test_panel_titles_never_overlap_on_small_images():
    """At 64 px "ground truth" is wider than its tile: drawn together, the titles must cover as many pixels as
    each title drawn alone (overlapping or clipped text covers fewer)."""

    for size in (32, 64, 224):
        rgb = np.full((size, size, 3), 200, dtype=np.uint8)
        picture = panel(rgb, np.full((size, size), 0.5), None, ["x"])
        titles = picture.crop((0, picture.height - size - LINE_HEIGHT, picture.width, picture.height - size))
        assert dark_pixels(titles) == sum(alone(title) for title in (*COLUMN_TITLES, "P(anom.)")), size


def test_a_range_1_method_draws_what_it_drew_before_the_scale_followed_map_range():
    """Stored pictures of anovl before map_range (tests/reference/visualization_range1.py): the default and an
    explicit map_range of 1 draw them bit for bit."""
    old = np.load(RANGE1_REFERENCE)
    rgb, anomaly_map = range1.inputs()
    for scale in ({}, {"map_range": 1.0}):
        assert np.array_equal(overlay(rgb, anomaly_map, **scale), old["overlay"])
        assert np.array_equal(overlay(rgb, anomaly_map, range1.OUTLINE_THRESHOLD, **scale), old["overlay_outlined"])
        bar = np.asarray(colour_bar(range1.BAR_HEIGHT, range1.BAR_THRESHOLD, **scale))
        assert np.array_equal(bar[:, : BAR_WIDTH + 4], old["bar_colours"])
        assert panel_lines(*range1.CAPTION_ARGS, **scale) == old["caption"].tolist()
    assert (old["overlay_outlined"] == 255).all(axis=2).any()  # the reference has an outline to compare
    assert colour_bar_ticks() == [(1.0, "1.0"), (0.5, "0.5"), (0.0, "0.0")]  # the labels of before


def summed_map() -> np.ndarray:
    """An APRIL-GAN-like map: a sum over four blocks, a ramp over [0, 4] plus a patch above 1."""
    anomaly_map = np.tile(np.linspace(0.0, 4.0, 41), (20, 1))
    anomaly_map[5:15, 3:9] = 2.5
    return anomaly_map


def test_overlay_colours_a_summed_map_on_its_method_scale():
    rgb = np.random.default_rng(1).integers(0, 256, (20, 41, 3), dtype=np.uint8)
    anomaly_map = summed_map()
    coloured = overlay(rgb, anomaly_map, map_range=4.0)
    # Naive reference, as overlay's docs say: jet(value / map_range) blended half and half over the image.
    heat = jet(anomaly_map / 4.0).astype(float)
    expected = np.round((1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * heat).astype(np.uint8)
    assert np.array_equal(coloured, expected)
    # Not saturated: the ramp's values above 1 (columns 11-40) keep distinct colours, where a 0-1 scale paints
    # them all the same red.
    above_one = jet(anomaly_map[0, 11:] / 4.0)
    assert len({tuple(colour) for colour in above_one}) > 20
    assert len({tuple(colour) for colour in jet(anomaly_map[0, 11:])}) == 1
    # The outline in the map's own units: map >= 2.5 (naive 4-neighbour boundary), not map / 4 >= 2.5.
    outlined = overlay(rgb, anomaly_map, pixel_threshold=2.5, map_range=4.0)
    region = anomaly_map >= 2.5
    padded = np.pad(region, 1)
    boundary = region & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    white = (outlined == 255).all(axis=2)
    assert np.array_equal(white, boundary) and boundary.sum() > 20
    assert np.array_equal(outlined[~white], expected[~white])


def test_colour_bar_and_caption_state_the_scale_used():
    height = 101
    bar = np.asarray(colour_bar(height, pixel_threshold=1.0, map_range=4.0))
    assert bar[0, 0].tolist() == jet(np.array(1.0)).tolist() and bar[100, 0].tolist() == [0, 0, 128]
    assert (bar[75, :BAR_WIDTH] == 0).all()  # the threshold 1.0 is a quarter of the way up a 0-4 bar
    assert not (bar[25, :BAR_WIDTH] == 0).all()
    above_one = np.asarray(colour_bar(height, pixel_threshold=3.0, map_range=4.0))
    assert (above_one[25, :BAR_WIDTH] == 0).all()  # a threshold above 1 is on the bar too
    assert colour_bar_ticks(4.0) == [(1.0, "4.0"), (0.5, "2.0"), (0.0, "0.0")]
    assert colour_bar_ticks(3.0) == [(1.0, "3.0"), (0.5, "1.5"), (0.0, "0.0")]
    assert colour_bar_ticks(2.5) == [(1.0, "2.5"), (0.5, "1.25"), (0.0, "0.0")]
    # The labels drawn are those ticks: as many dark pixels right of the tick marks as "4.0", "2.0" and "0.0"
    # drawn alone ("1.0", "0.5", "0.0" on a 0-1 bar).
    for scale, labels in ((4.0, ("4.0", "2.0", "0.0")), (1.0, ("1.0", "0.5", "0.0"))):
        drawn = colour_bar(height, map_range=scale).crop((BAR_WIDTH + 5, 0, BAR_WIDTH + 40, height))
        assert dark_pixels(drawn) == sum(alone(label) for label in labels), scale
    lines = panel_lines("carpet", "cut_000", 1, 2.1, 1.8, 2.5, (0.3, 3.6), "", map_range=4.0)
    assert lines[2] == "map 0.300-3.600 on a fixed 0-4 scale  outline: map >= 2.5000"
    assert "on a fixed 0-2.5 scale" in panel_lines("c", "n", 0, 1.0, None, None, (0.1, 0.2), map_range=2.5)[2]


def test_panel_draws_a_summed_map_on_its_method_scale():
    rgb = np.full((64, 64, 3), 200, dtype=np.uint8)
    lines = ["x"]
    values = (0.4, 2.0, 3.6)
    pictures = [panel(rgb, np.full((64, 64), value), None, lines, map_range=4.0) for value in values]
    top = pictures[0].height - 64
    column = max(64, *(_text_width(title) for title in COLUMN_TITLES))  # "ground truth" is wider than 64 px
    third_tile = (2 * (column + PANEL_GAP) + (column - 64) // 2 + 32, top + 32)
    for picture, value in zip(pictures, values):
        assert picture.getpixel(third_tile) == tuple(blend(rgb[0, 0], value / 4.0))
    assert len({picture.getpixel(third_tile) for picture in pictures[1:]}) == 2  # 2 and 3.6 not the same red
    # The bar's title says "map", not a probability, and its colour strip is the one of a 0-1 bar.
    titles = pictures[0].crop((0, top - LINE_HEIGHT, pictures[0].width, top))
    assert dark_pixels(titles) == sum(alone(title) for title in (*COLUMN_TITLES, "map"))
    bar_left = 3 * column + 3 * PANEL_GAP
    strip = np.asarray(pictures[0])[top:, bar_left : bar_left + BAR_WIDTH]
    assert np.array_equal(strip, np.asarray(colour_bar(64))[:, :BAR_WIDTH])


def test_png16_round_trip(tmp_path):
    anomaly_map = torch.rand(17, 23)
    map_to_png16(anomaly_map).save(tmp_path / "map.png")
    decoded = png16_to_map(Image.open(tmp_path / "map.png"))
    assert decoded.dtype == np.float32 and decoded.shape == (17, 23)
    assert np.abs(decoded - anomaly_map.numpy()).max() <= 0.5 / 65535 + 1e-7


def test_png16_keeps_a_recorded_range_and_refuses_a_bad_one(tmp_path):
    anomaly_map = torch.rand(17, 23) * 4  # a sum over four blocks
    write_map_png16(tmp_path / "map.png", anomaly_map, map_range=4.0)
    decoded = png16_to_map(Image.open(tmp_path / "map.png"))
    assert np.abs(decoded - anomaly_map.numpy()).max() <= 0.5 * 4 / 65535 + 1e-6
    for recorded in ("nan", "-1", "x"):
        info = PngImagePlugin.PngInfo()
        info.add_text("anovl:map_range", recorded)
        Image.fromarray(np.zeros((2, 2), dtype=np.uint16)).save(tmp_path / "bad.png", pnginfo=info)
        with pytest.raises(AnovlError, match="not a positive number"):
            png16_to_map(Image.open(tmp_path / "bad.png"))


def test_readable_stems():
    assert output_stem("/d/bottle/test/broken_large/000.png", "bottle") == "broken_large_000"
    assert output_stem("/d/my_parts/a.png", "my_parts") == "a"


NAMES_FROM_DATA = ["..", ".", "a/b", "a\\b", "x\0y", "/etc/passwd", "../../evil", "ok_name"]


def test_output_components_cannot_leave_their_folder(tmp_path):
    components = [output_component(name) for name in NAMES_FROM_DATA]
    for component in components:
        assert component not in (".", "..") and not any(char in component for char in "/\\\0")
        assert (tmp_path / component).resolve().parent == tmp_path.resolve()
    assert len(set(components)) == len(components) and components[-1] == "ok_name"
    with pytest.raises(AnovlError, match="empty"):
        output_component("")


def test_output_names_never_clash_and_do_not_depend_on_order():
    images = [
        ("/d/parts/img.png", "img.png"),
        ("/d/parts/img.jpg", "img.jpg"),
        ("/d/parts/img.JPG", "img.JPG"),
        ("/d/parts/other.png", "other.png"),
        ("/d/parts/good/a/x.png", "good/a/x.png"),
        ("/d/parts/bad/a/x.png", "bad/a/x.png"),
    ]
    listing = [(path, key, "parts") for path, key in images]
    names = OutputNames(listing)
    stems = [names.stem(path, "parts") for path, _ in images]
    assert len({stem.casefold() for stem in stems}) == len(images)  # distinct even on case-insensitive disks
    assert stems[3] == "other"  # a stem without a clash stays readable
    assert stems[0].startswith("img_png_") and stems[1].startswith("img_jpg_") and stems[2].startswith("img_jpg_")
    shuffled = listing[:]
    random.Random(0).shuffle(shuffled)
    again = OutputNames(shuffled)
    assert [again.stem(path, "parts") for path, _ in images] == stems
    # The hash comes from the key (path in the dataset), so a dataset moved elsewhere keeps its names.
    moved = OutputNames([(path.replace("/d/", "/e/"), key, "parts") for path, key in images])
    assert [moved.stem(path.replace("/d/", "/e/"), "parts") for path, _ in images] == stems
    # An image outside the listing always gets a hash: it cannot take a listed image's name.
    assert names.stem("/elsewhere/parts/other.png", "parts").startswith("other_png_")
