"""Pictures of anomaly maps (test panels, prediction overlays) and the 16-bit map encoding.

Colour scale: every map is coloured on its method's fixed range [0, ``map_range``] (jet: 0 blue, half the
range green, ``map_range`` red), :attr:`~anovl.models.base.AnomalyModel.map_range`: 1 for the probabilities of
AnoVL and WinCLIP, the number of summed blocks for APRIL-GAN and AnomalyCLIP. It is never rescaled per image,
so equal colours mean equal values across images, categories and runs of a method, and a map spread over
0.500-0.502 looks flat, as it is. Panels carry a colour bar and a caption saying which scale; values outside
it are clipped to its ends (the panel's text gives the map's actual range).

Output file names are made in :mod:`anovl.io.output_names`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from scipy import ndimage

from anovl.data.transforms import CLIP_MEAN, CLIP_STD
from anovl.errors import AnovlError

OVERLAY_ALPHA = 0.5
FONT_SIZE = 12
LINE_HEIGHT = FONT_SIZE + 4
PANEL_GAP = 4
BAR_WIDTH = 14
BAR_LABEL_WIDTH = 40
CONTOUR_COLOUR = (255, 255, 255)
THRESHOLD_COLOUR = (0, 0, 0)
NO_TRUTH_GREY = 128
COLUMN_TITLES = ("input", "ground truth", "anomaly map")
LABEL_NAMES = {0: "normal", 1: "anomalous", -1: "unlabelled"}


# ----------------------------------------------------------------------------- colours and maps


def denormalize(image: torch.Tensor) -> np.ndarray:
    """CLIP-normalised ``3×H×W`` tensor -> ``uint8 H×W×3`` RGB."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(-1, 1, 1)
    rgb = image.detach().float().cpu() * std + mean
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colormap (blue -> cyan -> yellow -> red) of values in [0, 1] -> ``uint8 …×3``."""
    values = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks at 3/4, 1/2, 1/4
    rgb = np.clip(1.5 - np.abs(4.0 * values - centres), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def resize_map(anomaly_map: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """A map resized to (height, width) bilinearly (pixel centres aligned, antialiased when shrinking, as
    Pillow's bilinear resize): how a model-resolution map is brought back to its image's original size."""
    values = anomaly_map.detach().float().cpu()[None, None]
    if tuple(values.shape[-2:]) == tuple(size_hw):
        return values[0, 0]
    return F.interpolate(values, size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=True)[0, 0]


def contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """The inner boundary of a bool mask, ``thickness`` pixels wide."""
    inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return mask & ~inner


def contour_thickness(height: int, width: int) -> int:
    """About 1 pixel per 250 of the shorter side, so contours stay visible on large images."""
    return max(1, round(min(height, width) / 250))


def overlay(
    rgb: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float | None = None, map_range: float = 1.0
) -> np.ndarray:
    """The jet heatmap of a map on the method's fixed scale, ``jet(map / map_range)``, blended half and half
    (:data:`OVERLAY_ALPHA`) over an ``uint8 H×W×3`` image of the same size; with a pixel threshold (in the
    map's own units), the outline of ``map >= threshold`` is drawn on it in white (not where the whole map is
    at or above it: that outline would only frame the image)."""
    heat = jet(anomaly_map / map_range).astype(np.float64)
    blended = ((1 - OVERLAY_ALPHA) * rgb.astype(np.float64) + OVERLAY_ALPHA * heat).round().astype(np.uint8)
    if pixel_threshold is not None:
        above = anomaly_map >= pixel_threshold
        if not above.all():
            blended[contour(above, contour_thickness(*anomaly_map.shape))] = CONTOUR_COLOUR
    return blended


MAP_RANGE_KEY = "anovl:map_range"  # the PNG text chunk of a 16-bit map that records its scale


def map_to_png16(anomaly_map: torch.Tensor | np.ndarray, map_range: float = 1.0) -> Image.Image:
    """A map with values in [0, ``map_range``] as a 16-bit greyscale PNG image (value / map_range · 65535,
    rounded). ``map_range`` is the method's (:attr:`~anovl.models.base.AnomalyModel.map_range`: 1 for
    probabilities, the number of summed blocks for APRIL-GAN and AnomalyCLIP), so no value of its maps is
    clipped; :func:`write_map_png16` records it in the file."""
    values = np.asarray(anomaly_map.detach().float().cpu() if isinstance(anomaly_map, torch.Tensor) else anomaly_map)
    scaled = np.round(np.clip(values / map_range, 0.0, 1.0) * 65535).astype(np.uint16)
    return Image.fromarray(scaled)


def write_map_png16(path: Path, anomaly_map: torch.Tensor | np.ndarray, map_range: float = 1.0) -> None:
    """:func:`map_to_png16` saved at ``path`` with ``map_range`` in its text chunk ``anovl:map_range``."""
    info = PngImagePlugin.PngInfo()
    info.add_text(MAP_RANGE_KEY, repr(float(map_range)))
    map_to_png16(anomaly_map, map_range).save(path, format="PNG", pnginfo=info)


def png16_to_map(image: Image.Image) -> np.ndarray:
    """Inverse of :func:`write_map_png16`: float32 values in [0, map_range] (1 without the text chunk)."""
    recorded = getattr(image, "text", {}).get(MAP_RANGE_KEY, "1")
    try:
        map_range = float(recorded)
    except ValueError:
        map_range = math.nan
    if not (math.isfinite(map_range) and map_range > 0):
        raise AnovlError(f"the 16-bit map records the range {recorded[:40]!r}, not a positive number")
    return (np.asarray(image, dtype=np.float64) / 65535 * map_range).astype(np.float32)


def mask_to_png(mask: np.ndarray) -> Image.Image:
    """A bool mask as an 8-bit PNG image: 255 anomalous, 0 normal (the MVTec ground-truth convention)."""
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


# ----------------------------------------------------------------------------- panels


@functools.cache
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def _text_width(text: str) -> int:
    return int(np.ceil(_font().getlength(text)))


def scale_text(value: float) -> str:
    """A value of the colour scale as the bar and the caption write it: one decimal where that is exact (1.0,
    0.5, 3.0, 1.5), else three significant digits."""
    return f"{value:.1f}" if round(value, 1) == value else f"{value:.3g}"


def colour_bar_ticks(map_range: float = 1.0) -> list[tuple[float, str]]:
    """The ticks of the colour bar, top to bottom: (fraction of the scale, label) at ``map_range``, half of it
    and 0."""
    return [(fraction, scale_text(fraction * map_range)) for fraction in (1.0, 0.5, 0.0)]


def colour_bar(height: int, pixel_threshold: float | None = None, map_range: float = 1.0) -> Image.Image:
    """The colour scale of the maps: jet from ``map_range`` (top) to 0 (bottom), ticks at 0, half the range and
    the range, and the pixel threshold (in map units) marked with a black line."""
    values = np.linspace(1.0, 0.0, height)[:, None].repeat(BAR_WIDTH, axis=1)
    bar = Image.new("RGB", (BAR_WIDTH + BAR_LABEL_WIDTH, height), "white")
    bar.paste(Image.fromarray(jet(values)), (0, 0))
    draw = ImageDraw.Draw(bar)
    for fraction, label in colour_bar_ticks(map_range):
        row = round((1.0 - fraction) * (height - 1))
        draw.line([(BAR_WIDTH, row), (BAR_WIDTH + 3, row)], fill="black")
        top = min(max(row - FONT_SIZE // 2, 0), height - FONT_SIZE - 2)
        draw.text((BAR_WIDTH + 5, top), label, fill="black", font=_font())
    if pixel_threshold is not None and 0.0 <= pixel_threshold <= map_range:
        row = round((1.0 - pixel_threshold / map_range) * (height - 1))
        draw.line([(0, row), (BAR_WIDTH - 1, row)], fill=THRESHOLD_COLOUR, width=2)
    return bar


def panel_lines(
    category: str,
    name: str,
    label: int,
    score: float,
    image_threshold: float | None,
    pixel_threshold: float | None,
    values: tuple[float, float],
    picked_as: str = "",
    map_range: float = 1.0,
) -> list[str]:
    """The text of a panel: what the image is, its score against the threshold, the map's (min, max)
    ``values`` on the colour scale [0, ``map_range``], and why it was chosen."""
    if image_threshold is None:
        decision = f"score {score:.4f}  (no threshold)"
    else:
        verdict = "anomalous" if score >= image_threshold else "normal"
        relation = ">=" if score >= image_threshold else "<"
        decision = f"score {score:.4f} {relation} threshold {image_threshold:.4f}: {verdict}"
    if pixel_threshold is None:
        pixel = ""
    elif values[0] >= pixel_threshold:  # nothing to outline: say so rather than promise an outline
        pixel = f"  all of it >= {pixel_threshold:.4f}: no outline"
    elif values[1] < pixel_threshold:
        pixel = f"  all of it < {pixel_threshold:.4f}: no outline"
    else:
        pixel = f"  outline: map >= {pixel_threshold:.4f}"
    lines = [
        f"{category} / {name}   label: {LABEL_NAMES.get(label, 'unlabelled')}",
        decision,
        f"map {values[0]:.3f}-{values[1]:.3f} on a fixed 0-{map_range:g} scale{pixel}",
    ]
    return lines + ([f"picked as: {picked_as}"] if picked_as else [])


def panel(
    rgb: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None,
    lines: Sequence[str],
    pixel_threshold: float | None = None,
    map_range: float = 1.0,
) -> Image.Image:
    """Input | ground truth (grey when there is none) | heatmap overlay on the scale [0, ``map_range``], under
    column titles, with the colour bar on the right and ``lines`` of text above (see :func:`panel_lines`)."""
    height, width = rgb.shape[:2]
    truth = (
        np.full_like(rgb, NO_TRUTH_GREY)
        if mask is None
        else np.repeat(mask.astype(np.uint8)[..., None] * 255, 3, axis=2)
    )
    tiles = [rgb, truth, overlay(rgb, anomaly_map, pixel_threshold, map_range)]
    bar = colour_bar(height, pixel_threshold, map_range)
    # A column is as wide as its tile or the widest title (small images: 64 px is narrower than "ground truth"),
    # the tile and the title centred in it, so that titles never run into each other.
    column = max(width, *(_text_width(title) for title in COLUMN_TITLES))
    tiles_width = len(tiles) * column + (len(tiles) - 1) * PANEL_GAP
    text_height = LINE_HEIGHT * (len(lines) + 1)  # the last line holds the column titles
    canvas_width = max(tiles_width + PANEL_GAP + bar.width, max(_text_width(line) for line in lines) + 4)
    canvas = Image.new("RGB", (canvas_width, text_height + height), "white")
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((2, 1 + index * LINE_HEIGHT), line, fill="black", font=_font())
    for index, (tile, title) in enumerate(zip(tiles, COLUMN_TITLES)):
        left = index * (column + PANEL_GAP)
        canvas.paste(Image.fromarray(tile), (left + (column - width) // 2, text_height))
        draw.text(
            (left + (column - _text_width(title)) // 2, text_height - LINE_HEIGHT), title, fill="black", font=_font()
        )
        if mask is None and title == "ground truth":
            draw.text((left + (column - width) // 2 + 4, text_height + 4), "none", fill="white", font=_font())
    canvas.paste(bar, (tiles_width + PANEL_GAP, text_height))
    # A map of probabilities is one; a sum over blocks is not (its caption says over how much).
    bar_title = "P(anom.)" if map_range == 1 else "map"
    draw.text((tiles_width + PANEL_GAP, text_height - LINE_HEIGHT), bar_title, fill="black", font=_font())
    return canvas


def stack_padded(pictures: Sequence[Image.Image]) -> np.ndarray:
    """Pictures as one ``uint8 N×H×W×3`` array, each padded with white to the largest size (TensorBoard)."""
    height = max(picture.height for picture in pictures)
    width = max(picture.width for picture in pictures)
    stacked = np.full((len(pictures), height, width, 3), 255, dtype=np.uint8)
    for index, picture in enumerate(pictures):
        stacked[index, : picture.height, : picture.width] = np.asarray(picture.convert("RGB"))
    return stacked
