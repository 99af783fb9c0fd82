"""The pictures of a range-1 method (AnoVL, WinCLIP) as anovl drew them before the colour scale followed the
method's ``map_range``, for tests/test_visualization.py: those must not change.

tests/reference/data/visualization_range1.npz was written by this script with anovl at commit b0e2ab7 (the last
one before ``map_range`` reached the pictures):

    git worktree add /tmp/anovl-b0e2ab7 b0e2ab7
    PYTHONPATH=/tmp/anovl-b0e2ab7 python tests/reference/visualization_range1.py /tmp/visualization_range1.npz

It keeps what does not depend on the font (Pillow's text rendering may change between versions): the overlays
(with and without the threshold outline), the colour strip of the colour bar with its tick marks and threshold
line, and the text of a panel's caption.
"""

from __future__ import annotations

import sys

import numpy as np

BAR_HEIGHT = 40
BAR_THRESHOLD = 0.3
OUTLINE_THRESHOLD = 0.6
CAPTION_ARGS = ("bottle", "broken_000", 1, 0.734, 0.61, 0.5, (0.2, 0.8), "x")


def inputs() -> tuple[np.ndarray, np.ndarray]:
    """An image and a map with some values outside [0, 1] (clipped to the ends of the scale)."""
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    anomaly_map = np.clip(rng.normal(0.5, 0.3, (24, 32)), -0.2, 1.3)
    return rgb, anomaly_map


def main(out: str) -> None:
    from anovl.visualization import BAR_WIDTH, colour_bar, overlay, panel_lines

    rgb, anomaly_map = inputs()
    np.savez_compressed(
        out,
        overlay=overlay(rgb, anomaly_map),
        overlay_outlined=overlay(rgb, anomaly_map, pixel_threshold=OUTLINE_THRESHOLD),
        bar_colours=np.asarray(colour_bar(BAR_HEIGHT, pixel_threshold=BAR_THRESHOLD))[:, : BAR_WIDTH + 4],
        caption=np.array(panel_lines(*CAPTION_ARGS)),
    )


if __name__ == "__main__":
    main(sys.argv[1])
