"""`predict` outputs: original resolution, thresholds from a test run / the user / normal images, masks,
scores.csv, and names that never clash."""

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image

from anovl import AnovlError
from anovl.callbacks import AnomalyMapWriter
from anovl.data import FolderDataModule, MVTecDataModule, generate_mvtec_like
from anovl.data.image_io import load_rgb
from anovl.data.transforms import normalize, resize_image
from anovl.engine import AnomalyModule
from anovl.models import AnoVL, AprilGAN
from anovl.results import ResultsTable
from anovl.thresholds import RunThresholds
from anovl.visualization import jet, png16_to_map
from tests.conftest import TINY

SIZE = 64
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def random_image(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Images of several sizes, one turned by its EXIF tag, and three sharing the stem "img"."""
    folder = tmp_path_factory.mktemp("photos") / "photos"
    folder.mkdir()
    random_image(0, 90, 60).save(folder / "wide.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80×50, shown turned by 90°: 50×80
    random_image(1, 80, 50).save(folder / "turned.jpg", exif=exif.tobytes())
    random_image(2, 70, 70).save(folder / "img.png")
    random_image(3, 40, 100).save(folder / "img.jpg")
    random_image(4, 100, 40).save(folder / "img.JPG")
    return folder


def tiny_module() -> AnomalyModule:
    torch.manual_seed(0)
    return AnomalyModule(AnoVL(TINY, pretrained=None, image_size=SIZE, num_views=1))


def predict(module, data, tmp_path, **writer_args):
    writer = AnomalyMapWriter(str(tmp_path / "out"), **writer_args)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        default_root_dir=tmp_path,
        callbacks=[writer],
    )
    predictions = trainer.predict(module, datamodule=data)
    maps = {
        path: anomaly_map
        for batch in predictions
        for path, anomaly_map in zip(batch["image_path"], batch["anomaly_map"])
    }
    rows = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    return maps, rows


def test_outputs_at_original_size_with_masks_and_distinct_names(photos, tmp_path):
    data = FolderDataModule(photos, image_size=SIZE, batch_size=2)
    maps, rows = predict(tiny_module(), data, tmp_path, image_threshold=0.5, pixel_threshold=0.5)
    assert len(rows) == 5 and len({row["output"].casefold() for row in rows}) == 5
    folder = tmp_path / "out" / "photos"
    assert len(list(folder.iterdir())) == 5 * 4  # overlay, .npy, 16-bit map and mask each: nothing overwritten
    for row in rows:
        stem, path = folder / row["output"], row["image_path"]
        height, width = load_rgb(path).shape[:2]  # upright, as the model saw it
        raw = np.load(f"{stem}_map.npy")
        assert raw.shape == (height, width)
        # The model's map brought back to the image's size by Pillow's bilinear resize.
        reference = np.asarray(Image.fromarray(maps[path].numpy()).resize((width, height), Image.Resampling.BILINEAR))
        assert np.abs(raw - reference).max() < 1e-5
        assert np.abs(png16_to_map(Image.open(f"{stem}_map.png")) - raw).max() <= 1 / 65535
        assert np.array_equal(np.asarray(Image.open(f"{stem}_mask.png")) == 255, raw >= 0.5)
        assert Image.open(f"{stem}_overlay.png").size == (width, height)
        score = float(row["score"])
        assert row["predicted_label"] == ("anomalous" if score >= 0.5 else "normal")
        assert (row["image_threshold"], row["pixel_threshold"], row["true_label"]) == ("0.5", "0.5", "")
    turned = next(row for row in rows if row["image_path"].endswith("turned.jpg"))
    assert np.load(folder / f"{turned['output']}_map.npy").shape == (80, 50)
    names = {Path(row["image_path"]).name: row["output"] for row in rows}
    assert names["wide.png"] == "wide" and names["img.jpg"].startswith("img_jpg_")
    thresholds = json.loads((tmp_path / "out" / "thresholds.json").read_text())["categories"]["photos"]
    assert (thresholds["image"], thresholds["pixel"]) == (0.5, 0.5) and thresholds["source"].startswith("given")


def test_model_resolution_keeps_the_model_map(photos, tmp_path):
    data = FolderDataModule(photos, image_size=SIZE, batch_size=5)
    maps, rows = predict(tiny_module(), data, tmp_path, resolution="model")
    for row in rows:
        raw = np.load(tmp_path / "out" / "photos" / f"{row['output']}_map.npy")
        assert np.array_equal(raw, maps[row["image_path"]].numpy())
        assert row["predicted_label"] == row["image_threshold"] == ""  # no threshold: no decision, no mask
    assert not list((tmp_path / "out" / "photos").glob("*_mask.png"))


@pytest.fixture(scope="module")
def mvtec_run(tmp_path_factory):
    """A labelled test run: its results.json holds F1-max thresholds per category."""
    root = generate_mvtec_like(
        tmp_path_factory.mktemp("mvtec"), ("fabric", "widget"), n_good=2, n_defect=1, image_size=SIZE
    )
    run = tmp_path_factory.mktemp("run")
    module = AnomalyModule(AnoVL(TINY, pretrained=None, image_size=SIZE, num_views=1), results_dir=str(run))
    Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        default_root_dir=run,
    ).test(module, datamodule=MVTecDataModule(root, image_size=SIZE))
    return root, run / "results.json", module.results


def test_results_json_keeps_thresholds_apart_from_metrics(mvtec_run):
    _, path, table = mvtec_run
    document = json.loads(path.read_text())
    saved = document["thresholds"]
    assert saved["categories"] == table.thresholds
    image_thresholds = [values["image"] for values in table.thresholds.values()]
    assert saved["mean"]["image"] == pytest.approx(np.mean(image_thresholds))
    assert not any("threshold" in key for record in document["categories"] for key in record)
    again = ResultsTable.read(path.parent)
    assert again.thresholds == table.thresholds  # kept by --resume


def test_thresholds_from_a_test_run(mvtec_run, photos, tmp_path):
    root, path, table = mvtec_run
    data = MVTecDataModule(root, categories=["widget"], image_size=SIZE, batch_size=4)
    _, rows = predict(tiny_module(), data, tmp_path / "same", thresholds=str(path))
    expected = table.thresholds["widget"]
    for row in rows:
        assert (float(row["image_threshold"]), float(row["pixel_threshold"])) == (expected["image"], expected["pixel"])
        assert row["predicted_label"] == ("anomalous" if float(row["score"]) >= expected["image"] else "normal")
        assert row["true_label"] == ("normal" if "/good/" in row["image_path"] else "anomalous")
    # A category that the run did not have gets the run's mean; a given value wins over the file's.
    _, rows = predict(
        tiny_module(),
        FolderDataModule(photos, image_size=SIZE),
        tmp_path / "other",
        thresholds=str(path.parent),
        image_threshold=0.25,
    )
    mean = RunThresholds.read(path).mean
    assert {(row["image_threshold"], float(row["pixel_threshold"])) for row in rows} == {("0.25", mean["pixel"])}


def test_quantile_thresholds_over_normal_images(photos, tmp_path):
    normal = tmp_path / "normal"
    normal.mkdir()
    for seed in range(5):
        random_image(10 + seed, 60 + 10 * seed, 64).save(normal / f"n{seed}.png")
    data = FolderDataModule(photos, image_size=SIZE, prompt_name="part")
    module = tiny_module()
    _, rows = predict(module, data, tmp_path, normal_images=str(normal), quantile=0.9)
    # Reference: the model run directly on the normal images, preprocessed by hand as METHOD §1 says.
    images = torch.stack([normalize(resize_image(load_rgb(path), (SIZE, SIZE))) for path in sorted(normal.iterdir())])
    with torch.no_grad():
        output = module.model(images, ["photos"] * 5, ["part"] * 5)
    image_threshold = np.quantile(output.pred_score.numpy(), 0.9)
    pixel_threshold = np.quantile(output.anomaly_map.numpy(), 0.9)
    for row in rows:
        assert float(row["image_threshold"]) == pytest.approx(image_threshold, rel=1e-5)
        assert float(row["pixel_threshold"]) == pytest.approx(pixel_threshold, rel=1e-5)
    source = json.loads((tmp_path / "out" / "thresholds.json").read_text())["categories"]["photos"]["source"]
    assert source.startswith("quantile 0.9 of 5 normal images")


def test_threshold_errors(mvtec_run, photos, tmp_path):
    root, path, _ = mvtec_run
    with pytest.raises(AnovlError, match="not both"):
        AnomalyMapWriter(thresholds=str(path), normal_images=str(photos))
    with pytest.raises(AnovlError, match="between 0 and 1"):
        AnomalyMapWriter(quantile=1.5)
    for bad in (float("nan"), 1e308, -5, True):
        with pytest.raises(AnovlError, match=r"a number in \[0, 1e\+06\]"):
            AnomalyMapWriter(image_threshold=bad)
    without = tmp_path / "old"
    ResultsTable(without, "old run").write()  # no category, so no thresholds
    with pytest.raises(AnovlError, match="holds no F1-max thresholds"):
        RunThresholds.read(without)
    with pytest.raises(AnovlError, match="calibrates one category"):
        predict(tiny_module(), MVTecDataModule(root, image_size=SIZE), tmp_path / "two", normal_images=str(photos))
    labelled = tmp_path / "labelled"  # good/ and bad/: not all normal
    for folder, seed in (("good", 20), ("bad", 21)):
        (labelled / folder).mkdir(parents=True)
        random_image(seed, 64, 64).save(labelled / folder / "x.png")
    with pytest.raises(AnovlError, match="only normal images"):
        predict(tiny_module(), FolderDataModule(photos, image_size=SIZE), tmp_path / "bad", normal_images=str(labelled))


def test_cli_predict_with_a_runs_thresholds(mvtec_run, photos, tmp_path):
    _, path, table = mvtec_run
    env = {**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    args = [
        "predict",
        "--config",
        REPO / "configs" / "folder.yaml",
        "--data.init_args.path",
        photos,
        "--model.init_args.backbone",
        TINY,
        "--model.init_args.pretrained",
        "null",
        "--model.init_args.image_size",
        str(SIZE),
        "--model.init_args.num_views",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        tmp_path / "runs",
        "--predictions.output_dir",
        tmp_path / "out",
        "--predictions.thresholds",
        path,
    ]
    result = subprocess.run(
        [sys.executable, "-m", "anovl.cli", *map(str, args)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert len(rows) == 5 and {float(row["image_threshold"]) for row in rows} == {table.mean_thresholds()["image"]}
    assert "photos: image threshold" in result.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "anovl.cli", *map(str, args[:-1]), tmp_path / "none.json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and missing.stderr.rstrip().splitlines()[-1].startswith(
        "anovl: error: predictions.thresholds:"
    )


def test_a_map_summed_over_blocks_keeps_its_values_in_the_16_bit_png_and_overlay(photos, tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        model = AprilGAN(TINY, pretrained=None, image_size=SIZE, layers=[1, 2, 3])
    assert model.map_range == 3  # a probability per block, summed
    data = FolderDataModule(photos, image_size=SIZE, batch_size=2)
    predict(AnomalyModule(model), data, tmp_path, pixel_threshold=1.5)
    folder = tmp_path / "out" / "photos"
    rows = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert len(rows) == 5
    outlined = 0
    for row in rows:
        stem = folder / f"{row['output']}_map"
        raw = np.load(f"{stem}.npy")
        assert raw.max() > 1  # a [0, 1] scale would have clipped it
        written = Image.open(f"{stem}.png")
        assert written.text["anovl:map_range"] == "3.0"
        assert np.abs(png16_to_map(written) - raw).max() <= 0.5 * 3 / 65535 + 1e-6
        # The overlay: jet(map / 3) blended half and half over the image (naive reference), and in white the
        # 4-neighbour boundary of map >= 1.5 in the map's own units.
        rgb = load_rgb(row["image_path"])
        expected = np.round(0.5 * rgb + 0.5 * jet(raw / 3).astype(float)).astype(np.uint8)
        region = raw >= 1.5
        padded = np.pad(region, 1)
        expected[region & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])] = 255
        assert np.array_equal(np.asarray(Image.open(folder / f"{row['output']}_overlay.png")), expected)
        outlined += int(region.any() and not region.all())
    assert outlined > 0
