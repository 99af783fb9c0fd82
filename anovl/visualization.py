"""Heatmap overlays and test panels (input | ground truth | overlay), in plain numpy + Pillow.

Maps are min–max scaled per image before colouring, as zero-shot anomaly papers do for their figures: the
colours show where an image is most anomalous, not how anomalous it is (the caption gives the raw range).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from anovl.data.transforms import CLIP_MEAN, CLIP_STD

OVERLAY_ALPHA = 0.5
CAPTION_HEIGHT = 14
PANEL_GAP = 4


def picture_name(image_path: str, category: str) -> str:
    """A file name stem for an image's outputs: ``<parent folder>_<stem>``, unique in MVTec-like layouts
    (``test/<defect>/000.png``), or just ``<stem>`` when the parent folder is the category itself."""
    path = Path(image_path)
    return path.stem if path.parent.name == category else f"{path.parent.name}_{path.stem}"


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


def scale_to_unit(anomaly_map: np.ndarray) -> np.ndarray:
    """Per-image min–max scaling; a constant map becomes all zeros."""
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    if high <= low:
        return np.zeros_like(anomaly_map, dtype=np.float64)
    return (anomaly_map.astype(np.float64) - low) / (high - low)


def overlay(rgb: np.ndarray, anomaly_map: np.ndarray) -> np.ndarray:
    """The jet heatmap of a map blended over an ``uint8 H×W×3`` image of the same size."""
    heat = jet(scale_to_unit(anomaly_map)).astype(np.float64)
    blended = (1 - OVERLAY_ALPHA) * rgb.astype(np.float64) + OVERLAY_ALPHA * heat
    return blended.round().astype(np.uint8)


def _with_caption(tiles: Sequence[np.ndarray], caption: str) -> Image.Image:
    height = max(tile.shape[0] for tile in tiles)
    width = sum(tile.shape[1] for tile in tiles) + PANEL_GAP * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, height + CAPTION_HEIGHT), "white")
    left = 0
    for tile in tiles:
        canvas.paste(Image.fromarray(tile), (left, CAPTION_HEIGHT))
        left += tile.shape[1] + PANEL_GAP
    ImageDraw.Draw(canvas).text((2, 1), caption, fill="black")
    return canvas


def _map_range(anomaly_map: np.ndarray) -> str:
    return f"map {anomaly_map.min():.3f}-{anomaly_map.max():.3f}"


def panel(image: torch.Tensor, anomaly_map: torch.Tensor, mask: torch.Tensor | None, title: str) -> Image.Image:
    """Input | ground truth (grey when there is none) | heatmap overlay, with a one-line caption."""
    rgb = denormalize(image)
    values = anomaly_map.detach().float().cpu().numpy()
    if mask is None:
        truth = np.full_like(rgb, 128)
    else:
        truth = np.repeat((mask.detach().cpu().numpy() > 0.5).astype(np.uint8)[..., None] * 255, 3, axis=2)
    return _with_caption([rgb, truth, overlay(rgb, values)], f"{title}  {_map_range(values)}")


def overlay_image(image: torch.Tensor, anomaly_map: torch.Tensor) -> Image.Image:
    """The heatmap overlay of one image alone (what ``predict`` writes)."""
    return Image.fromarray(overlay(denormalize(image), anomaly_map.detach().float().cpu().numpy()))


def map_to_png16(anomaly_map: torch.Tensor | np.ndarray) -> Image.Image:
    """A map of probabilities in [0, 1] as a 16-bit greyscale PNG image (value · 65535, rounded)."""
    values = np.asarray(anomaly_map.detach().float().cpu() if isinstance(anomaly_map, torch.Tensor) else anomaly_map)
    scaled = np.round(np.clip(values, 0.0, 1.0) * 65535).astype(np.uint16)
    return Image.fromarray(scaled)


def png16_to_map(image: Image.Image) -> np.ndarray:
    """Inverse of :func:`map_to_png16`: float32 values in [0, 1]."""
    return (np.asarray(image, dtype=np.float64) / 65535).astype(np.float32)
