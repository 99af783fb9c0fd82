"""The browser demo: its analysis against the model, and end to end in a real headless Chromium."""

import json
import os
from pathlib import Path
import socket
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from anovl import AnoVL, AnovlError
from anovl.cli import main
from anovl.deploy import export_model, load_exported, predict, sidecar_path
from anovl.deploy.app import Analyzer, build_app
from anovl.models import AprilGAN
from anovl.visualization import OVERLAY_ALPHA, jet, overlay
from tests.conftest import TINY

pytest.importorskip("gradio")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 120_000  # every browser wait is bounded (generous: CI machines may be loaded)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AnoVL(TINY, pretrained=None, num_views=1)


def random_png(path, height=90, width=120, seed=0):
    Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_analysis_is_the_model_prediction(model, tmp_path):
    photo = random_png(tmp_path / "photo.png")
    result = Analyzer(model, image_threshold=0.3, pixel_threshold=0.49, output_dir=tmp_path)(str(photo), " bottle ")
    expected = predict(model, photo, "bottle")
    assert result["overlay"].shape == (64, 64, 3)
    assert np.array_equal(result["overlay"], overlay(expected.image, expected.anomaly_map))
    assert np.array_equal(result["mask"], (expected.anomaly_map >= 0.49).astype(np.uint8) * 255)
    assert np.array_equal(np.asarray(Image.open(result["mask_file"])), result["mask"])
    verdict = "anomalous" if expected.pred_score >= 0.3 else "normal"
    assert result["score"] == f"{expected.pred_score:.4f} ({verdict})"


def test_random_weights_are_announced(model, tmp_path):
    photo = random_png(tmp_path / "photo.png")
    analyzer = Analyzer(model, pixel_threshold=0.5, output_dir=tmp_path)
    assert analyzer.random_weights and "random weights" in analyzer(str(photo), "bottle")["status"]
    assert "random-weights" in str(build_app(analyzer).config)  # the page says it before any upload


def test_a_typed_class_never_chooses_where_the_mask_goes(model, tmp_path):
    photo = random_png(tmp_path / "photo.png")
    output = tmp_path / "out"
    output.mkdir()
    result = Analyzer(model, pixel_threshold=0.5, output_dir=output)(str(photo), "../../evil/bottle")
    assert Path(result["mask_file"]).parent == output and Path(result["mask_file"]).is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "photo.png"]


@pytest.mark.parametrize(
    "make, category, limits, message",
    [
        (lambda p: p.write_text("not an image"), "bottle", {}, "not a readable image"),
        (lambda p: p.write_bytes(b""), "bottle", {}, "is empty"),
        (lambda p: random_png(p), "bottle", {"max_upload_mb": 0.001}, "the demo takes images up to 0.001 MB"),
        (lambda p: random_png(p), "bottle", {"max_megapixels": 0.001}, "up to 0.001 megapixels"),
        (lambda p: random_png(p), "  ", {}, "pick or type the class"),
        (None, "bottle", {}, "upload an image first"),
    ],
)
def test_bad_uploads_get_one_clear_message(model, tmp_path, make, category, limits, message):
    path = tmp_path / "upload.png"
    if make is not None:
        make(path)
    with pytest.raises(AnovlError, match=message):
        Analyzer(model, output_dir=tmp_path, **limits)(str(path) if make else None, category)


def test_exported_model_offers_its_classes_and_thresholds(model, tmp_path):
    path = export_model(model, ["bottle", "screw"], tmp_path / "m.onnx")
    analyzer = Analyzer(load_exported(path), output_dir=tmp_path)
    assert analyzer.fixed_classes == ["bottle", "screw"]
    with pytest.raises(AnovlError, match="knows the classes bottle, screw, not 'cable'"):
        analyzer(str(random_png(tmp_path / "a.png")), "cable")
    result = analyzer(str(tmp_path / "a.png"), "screw")
    expected = predict(model, tmp_path / "a.png", "screw")
    assert np.array_equal(result["mask"] > 0, expected.anomaly_map >= 0.5)  # no recorded threshold: 0.5


def naive_overlay(rgb, anomaly_map, map_range):
    """Reference: jet(map / map_range) blended as overlay's docs say (no threshold outline in the app)."""
    heat = jet(anomaly_map / map_range).astype(float)
    return np.round((1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * heat).astype(np.uint8)


def test_a_summed_map_is_shown_on_its_method_scale(tmp_path):
    """APRIL-GAN's map sums a probability per block (three here): the heatmap spans 0-3, and the mask without a
    given threshold marks half of that range."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        april = AprilGAN(TINY, pretrained=None, image_size=64, layers=[1, 2, 3])
    photo = random_png(tmp_path / "photo.png")
    result = Analyzer(april, output_dir=tmp_path)(str(photo), "bottle")
    expected = predict(april, photo, "bottle")
    assert expected.anomaly_map.max() > 1  # a 0-1 scale would paint these the same red
    assert np.array_equal(result["overlay"], naive_overlay(expected.image, expected.anomaly_map, 3.0))
    assert np.array_equal(result["mask"] > 0, expected.anomaly_map >= 1.5)
    assert "heatmap on the fixed scale 0-3 (blue 0, red 3)" in result["status"]


def test_an_export_carries_its_map_range(model, tmp_path):
    """The heatmap of an exported model is on the scale its sidecar records; an old sidecar without it is 1."""
    path = export_model(model, ["bottle"], tmp_path / "m.onnx")
    photo = random_png(tmp_path / "photo.png")
    expected = predict(model, photo, "bottle")
    record = json.loads(sidecar_path(path).read_text())
    del record["map_range"]
    sidecar_path(path).write_text(json.dumps(record))
    result = Analyzer(load_exported(path), output_dir=tmp_path)(str(photo), "bottle")
    assert np.array_equal(result["overlay"], naive_overlay(expected.image, expected.anomaly_map, 1.0))
    assert "fixed scale 0-1 " in result["status"]
    sidecar_path(path).write_text(json.dumps({**record, "map_range": 2.0}))
    result = Analyzer(load_exported(path), output_dir=tmp_path)(str(photo), "bottle")
    assert np.array_equal(result["overlay"], naive_overlay(expected.image, expected.anomaly_map, 2.0))
    assert np.array_equal(result["mask"] > 0, expected.anomaly_map >= 1.0)


def test_app_command_refuses_mixed_model_sources(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["app", "--exported", str(tmp_path / "m.onnx"), "--weights", "w.pt"])
    assert exit_info.value.code == 2
    assert "--exported runs the exported file as it is" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served_app(model, tmp_path):
    """The app on 127.0.0.1 in this process, closed at the end of the test (uploads over 0.02 MB refused)."""
    from anovl.deploy.app import build_app

    demo = build_app(
        Analyzer(model, pixel_threshold=0.49, max_upload_mb=0.02, output_dir=tmp_path / "served"), ["bottle", "screw"]
    )
    (tmp_path / "served").mkdir()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def test_app_in_a_headless_browser(served_app, model, tmp_path):
    if not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} is missing: install Debian's browser with `apt-get install -y chromium`"
        if os.environ.get("ANOVL_REQUIRE_BROWSER"):  # set by .ci/run, which installs it
            pytest.fail(reason)
        pytest.skip(reason)
    playwright_api = pytest.importorskip("playwright.sync_api")
    small = random_png(tmp_path / "part.png", 40, 50)  # under the 0.02 MB limit
    large = random_png(tmp_path / "large.png", 120, 160, seed=1)  # about 58 KB: over it
    (tmp_path / "notes.txt").write_text("not an image")
    expected = predict(model, small, "screw")

    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=WAIT_MS)
        try:
            page = browser.new_page(accept_downloads=True)
            page.set_default_timeout(WAIT_MS)
            page.goto(served_app)
            status = page.locator("#status")

            shown = []  # the file the upload box holds

            def run(upload, category):
                clear = page.locator("button[aria-label='Clear']")  # the upload box's, once it holds a file
                if clear.count():
                    clear.first.click()
                    # The box re-renders after a clear: wait for it, or the next file may go to the old input.
                    page.locator("#upload").get_by_text(shown.pop()).wait_for(state="detached")
                page.locator("#upload input[type=file]").wait_for(state="attached")
                page.locator("#upload input[type=file]").set_input_files(str(upload))
                shown.append(upload.name)
                page.locator("#upload").get_by_text(upload.name).wait_for()
                if category:
                    page.locator("#category input").fill(category)
                    page.locator("#category input").press("Enter")
                page.click("#run")

            # Bad uploads first: a message in the page each time, and the server keeps serving.
            run(small, "")  # no class picked yet
            status.get_by_text("pick or type the class").wait_for()
            run(tmp_path / "notes.txt", "screw")
            status.get_by_text("not a readable image").wait_for()
            run(large, "screw")
            status.get_by_text("the demo takes images up to 0.02 MB").wait_for()

            run(small, "screw")
            status.get_by_text("image score").wait_for()
            assert page.locator("#score textarea").input_value() == f"{expected.pred_score:.4f}"
            page.locator("#overlay img").wait_for()
            with page.expect_download(timeout=WAIT_MS) as download_info:
                page.locator("#mask-file a[download]").click()
            downloaded = tmp_path / "downloaded_mask.png"
            download_info.value.save_as(downloaded)
        finally:
            browser.close()
    mask = np.asarray(Image.open(downloaded))
    assert mask.shape == (64, 64)
    assert np.array_equal(mask > 0, expected.anomaly_map >= 0.49)
