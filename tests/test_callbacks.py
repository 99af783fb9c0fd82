"""PanelWriter: which test images get panels (independent of batch size and order), files, W&B galleries."""

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

import anovl.callbacks.panels
from anovl.callbacks import PanelWriter
from anovl.data import MVTecDataModule, generate_mvtec_like
from anovl.engine import AnomalyModule
from anovl.models import AnoVL, AprilGAN
from anovl.io.output_names import output_stem
from anovl.visualization import COLUMN_TITLES, LINE_HEIGHT, OVERLAY_ALPHA, PANEL_GAP, _text_width, denormalize, jet
from tests.conftest import TINY

SIZE = 64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # 3 normal and 4 anomalous images (one per defect type) per category.
    return generate_mvtec_like(
        tmp_path_factory.mktemp("mvtec"), ("fabric", "widget"), n_good=3, n_defect=1, image_size=SIZE
    )


class ScoreRecorder(Callback):
    def __init__(self):
        self.images = []
        self.pictures = {}  # image path -> (uint8 image, anomaly map)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        for index, path in enumerate(outputs["image_path"]):
            self.images.append(
                (outputs["category"][index], path, int(outputs["label"][index]), float(outputs["pred_score"][index]))
            )
            self.pictures[path] = (denormalize(outputs["image"][index]), outputs["anomaly_map"][index].numpy())


def run_test(root, tmp_path, batch_size, max_per_category, loggers=False, model=None, recorder=None):
    module = AnomalyModule(model or AnoVL(TINY, pretrained=None, image_size=SIZE, num_views=1))
    recorder = recorder or ScoreRecorder()
    writer = PanelWriter(max_per_category=max_per_category, output_dir=str(tmp_path / "pictures"))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=loggers,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        default_root_dir=tmp_path,
        callbacks=[recorder, writer],
    )
    trainer.test(module, datamodule=MVTecDataModule(root, image_size=SIZE, batch_size=batch_size))
    return module, recorder.images


def naive_choice(images, count, root):
    """Reference: each role's full ranking; the roles take turns, skipping images already taken."""

    def key_of(path):
        return Path(path).relative_to(root).as_posix()

    anomalous = [(score, path) for _, path, label, score in images if label == 1]
    normal = [(score, path) for _, path, label, score in images if label == 0]
    rankings = [
        [path for _, path in sorted(anomalous, reverse=True)],
        [
            path
            for path in sorted(
                (path for _, path in normal),
                key=lambda path: (int.from_bytes(hashlib.sha1(key_of(path).encode()).digest()[:8], "big"), path),
            )
        ],
        [path for _, path in sorted(((-score, path) for score, path in anomalous), reverse=True)],
        [path for _, path in sorted(normal, reverse=True)],
    ]
    chosen = []
    while len(chosen) < count and any(rankings):
        for ranking in rankings:
            while ranking and ranking[0] in chosen:
                ranking.pop(0)
            if ranking and len(chosen) < count:
                chosen.append(ranking.pop(0))
    return chosen


def test_panels_are_chosen_from_the_whole_category(root, tmp_path):
    _, images = run_test(root, tmp_path / "b1", batch_size=1, max_per_category=4)
    for category in ("fabric", "widget"):
        own = [image for image in images if image[0] == category]
        expected = {f"{output_stem(path, category)}.png" for path in naive_choice(own, 4, root)}
        written = {path.name for path in (tmp_path / "b1" / "pictures" / category).iterdir()}
        assert written == expected
        labels = {label for _, path, label, _ in own if f"{output_stem(path, category)}.png" in written}
        assert labels == {0, 1}  # normal and anomalous images, not the first four in loader order
    # Another batch size (so other batch boundaries and category ends) chooses the same images.
    run_test(root, tmp_path / "b3", batch_size=3, max_per_category=4)
    for category in ("fabric", "widget"):
        assert {path.name for path in (tmp_path / "b3" / "pictures" / category).iterdir()} == {
            path.name for path in (tmp_path / "b1" / "pictures" / category).iterdir()
        }


def test_a_quota_above_the_category_size_takes_every_image(root, tmp_path):
    run_test(root, tmp_path, batch_size=4, max_per_category=20)
    for category in ("fabric", "widget"):
        assert len(list((tmp_path / "pictures" / category).iterdir())) == 7


class RecordingWandbLogger(WandbLogger):
    """A real (offline) W&B logger that also remembers its log_image calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_calls = []

    def log_image(self, key, images, step=None, **kwargs):
        self.image_calls.append((key, len(images), kwargs.get("caption")))
        super().log_image(key, images, step, **kwargs)


def test_one_wandb_gallery_per_category(root, tmp_path):
    logger = RecordingWandbLogger(save_dir=str(tmp_path), offline=True, project="anovl-test")
    module, _ = run_test(root, tmp_path, batch_size=4, max_per_category=3, loggers=[logger])
    logger.experiment.finish()
    assert [(key, count) for key, count, _ in logger.image_calls] == [("pictures/fabric", 3), ("pictures/widget", 3)]
    for key, _, captions in logger.image_calls:
        category = key.split("/")[1]
        image_threshold = module.results.thresholds[category]["image"]
        assert all(f"threshold {image_threshold:.4f}" in caption for caption in captions)
    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    media = sorted(path.name for path in run_dir.glob("files/media/images/pictures/*.png"))
    assert len(media) == 6
    # One log call per category: its three images share one step.
    steps = {name.rsplit("_", 2)[0]: set() for name in media}
    for name in media:
        prefix, step, _ = name.rsplit("_", 2)
        steps[prefix].add(step)
    assert steps.keys() == {"fabric", "widget"} and all(len(values) == 1 for values in steps.values())


def test_panels_of_a_summed_map_use_the_method_scale(root, tmp_path, monkeypatch):
    """APRIL-GAN's map sums a probability per block (three here): the panel colours it on 0-3 and says so."""
    captions, panel_lines = [], anovl.callbacks.panels.panel_lines

    def recording_panel_lines(*args, **kwargs):
        captions.append(panel_lines(*args, **kwargs))
        return captions[-1]

    monkeypatch.setattr(anovl.callbacks.panels, "panel_lines", recording_panel_lines)
    torch.manual_seed(0)
    model = AprilGAN(TINY, pretrained=None, image_size=SIZE, layers=[1, 2, 3])
    assert model.map_range == 3
    recorder = ScoreRecorder()
    module, _ = run_test(root, tmp_path, batch_size=4, max_per_category=2, model=model, recorder=recorder)
    assert len(captions) == 4 and all("on a fixed 0-3 scale" in lines[2] for lines in captions)
    column = max(SIZE, *(_text_width(title) for title in COLUMN_TITLES))
    left = 2 * (column + PANEL_GAP) + (column - SIZE) // 2
    written = outlined = 0
    for category, path, _, _ in recorder.images:
        picture_path = tmp_path / "pictures" / category / f"{output_stem(path, category)}.png"
        if not picture_path.exists():
            continue
        rgb, anomaly_map = recorder.pictures[path]
        picture = np.asarray(Image.open(picture_path).convert("RGB"))
        top = LINE_HEIGHT * (4 + 1)  # three lines, "picked as", the column titles
        tile = picture[top : top + SIZE, left : left + SIZE]
        # Naive reference: jet(map / 3) blended half and half; white only on the outline of map >= threshold.
        expected = np.round((1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * jet(anomaly_map / 3).astype(float))
        white = (tile == 255).all(axis=2)
        assert np.array_equal(tile[~white], expected.astype(np.uint8)[~white])
        pixel_threshold = module.results.thresholds[category]["pixel"]
        assert pixel_threshold > 1 and (anomaly_map[white] >= pixel_threshold).all()  # outline: map >= threshold
        assert (anomaly_map > 1).mean() > 0.5  # values a 0-1 scale would have painted all the same red
        written += 1
        outlined += int(white.any())
    assert written == 4 and outlined > 0  # an outline in map units (map / 3 never reaches the threshold)
