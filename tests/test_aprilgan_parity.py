"""APRIL-GAN equals the authors' own scripts (train.py, test.py) on identical random weights and images.

tests/reference/data/aprilgan.npz was written by tests/reference/aprilgan.py, which runs the authors' unmodified
train.py (one Adam step on one batch) and test.py (zero-shot and few-shot) on a tiny 12-block CLIP whose
weights come from ``parity_weights`` and on a tiny VisA-layout dataset (``write_dataset``); both are rebuilt
here for anovl. Mutations that these tests catch are listed in docs/METHOD.md (APRIL-GAN).
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import open_clip
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from anovl.backbones import register_model_config
from anovl.data import MVTecDataModule
from anovl.data.transforms import normalize
from anovl.engine import Engine
from anovl.models.aprilgan import AprilGAN, few_shot_image_scores
from tests.reference import aprilgan as reference

DATA = reference.Path(__file__).resolve().parent / "reference" / "data" / "aprilgan.npz"
MAP_TOLERANCE = 1e-4  # the bound; float32 on the CPU gives ~1e-6


@pytest.fixture(scope="module")
def stored():
    return dict(np.load(DATA))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, stored):
    """anovl's APRIL-GAN on the reference CLIP with the reference's initial heads, the test images and masks."""
    folder = tmp_path_factory.mktemp("aprilgan")
    name = register_model_config(reference.CONFIG, name="anovl-aprilgan-parity")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = open_clip.create_model(name)
    assert sorted(name for name, _ in clip.named_parameters()) == list(stored["parameter_names"])
    reference.parity_weights(clip)
    torch.save(clip.state_dict(), folder / "clip.pt")
    # The given heads in the authors' release format: read by the converter.
    torch.save(
        {
            "trainable_linearlayer": {
                **{f"fc.{i}.weight": torch.from_numpy(w) for i, w in enumerate(stored["initial_weight"])},
                **{f"fc.{i}.bias": torch.from_numpy(b) for i, b in enumerate(stored["initial_bias"])},
            }
        },
        folder / "given.pth",
    )
    model = AprilGAN(
        name,
        str(folder / "clip.pt"),
        reference.IMAGE_SIZE,
        layers=reference.LAYERS,
        few_shot_layers=reference.FEW_SHOT_LAYERS,
        checkpoint=folder / "given.pth",
        use_text_cache=False,
    )
    meta = reference.write_dataset(folder / "visa")

    def load(relative, mask=False):
        array = np.asarray(Image.open(folder / "visa" / relative))
        return torch.from_numpy(array > 127).float() if mask else normalize(array)

    entries = [entry for name in reference.CLASSES for entry in meta["test"][name]]
    images = torch.stack([load(entry["img_path"]) for entry in entries])
    masks = torch.stack(
        [
            load(entry["mask_path"], mask=True)
            if entry["anomaly"]
            else torch.zeros(reference.IMAGE_SIZE, reference.IMAGE_SIZE)
            for entry in entries
        ]
    )
    classes = [entry["cls_name"] for entry in entries]
    return model, images, masks, classes, load, folder


def test_zero_shot_maps_and_scores_equal_the_authors(setup, stored):
    model, images, _, classes, *_ = setup
    output = model(images, classes, classes)
    np.testing.assert_allclose(output.anomaly_map.numpy(), stored["zero_shot_maps"], rtol=0, atol=MAP_TOLERANCE)
    np.testing.assert_allclose(output.pred_score.numpy(), stored["zero_shot_scores"], rtol=MAP_TOLERANCE, atol=1e-9)


def test_one_training_step_equals_the_authors(setup, stored):
    model, images, masks, classes, *_ = setup
    heads = {key: value.clone() for key, value in model.heads.state_dict().items()}
    try:
        optimizer = model.configure_optimizer(model.trained_module().parameters())
        losses = model.training_losses(images, masks, classes, classes)
        assert losses["focal"].item() == pytest.approx(stored["focal"].sum(), rel=1e-5)
        assert losses["dice"].item() == pytest.approx(stored["dice"].sum(), rel=1e-5)
        assert sum(losses.values()).item() == pytest.approx(float(stored["loss"]), rel=1e-5)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        # float32 sums cancel to ~1e-7 in the smallest components (gradients reach ~0.2)
        for index, head in enumerate(model.heads):
            np.testing.assert_allclose(head.weight.grad.numpy(), stored["gradient_weight"][index], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(head.bias.grad.numpy(), stored["gradient_bias"][index], rtol=1e-4, atol=1e-6)
        optimizer.step()
        for index, head in enumerate(model.heads):
            np.testing.assert_allclose(head.weight.detach().numpy(), stored["trained_weight"][index], rtol=1e-5, atol=0)
            np.testing.assert_allclose(head.bias.detach().numpy(), stored["trained_bias"][index], rtol=1e-5, atol=0)
        # The frozen CLIP got no gradient.
        assert all(parameter.grad is None for parameter in model.clip.parameters())
    finally:
        model.heads.load_state_dict(heads)


def test_few_shot_maps_and_scores_equal_the_authors(setup, stored):
    model, images, _, classes, load, _ = setup
    chosen = [str(path) for path in stored["few_shot_images"]]
    try:
        for name in reference.CLASSES:
            model.remember(name, torch.stack([load(path) for path in chosen if path.startswith(f"{name}/")]))
        output = model(images, classes, classes)
    finally:
        model.forget()
    np.testing.assert_allclose(output.anomaly_map.numpy(), stored["few_shot_maps"], rtol=0, atol=MAP_TOLERANCE)
    per_class = len(reference.TEST_IMAGES)
    scores = torch.cat(
        [
            few_shot_image_scores(
                output.pred_score[start : start + per_class],
                output.anomaly_map[start : start + per_class].flatten(1).amax(1),
            )
            for start in range(0, len(classes), per_class)
        ]
    )
    np.testing.assert_allclose(scores.numpy(), stored["few_shot_scores"], rtol=MAP_TOLERANCE, atol=1e-7)


def test_few_shot_scores_of_a_category_whose_maxima_are_all_equal_are_half_the_zero_shot_ones():
    zero_shot = torch.tensor([0.2, 0.9, 0.4])
    maxima = torch.tensor([1.0, 3.0, 2.0])
    # The authors' formula written out: 0.5 * (score + (max - min(max)) / (max(max) - min(max))).
    expected = [0.5 * (0.2 + 0.0), 0.5 * (0.9 + 1.0), 0.5 * (0.4 + 0.5)]
    np.testing.assert_allclose(few_shot_image_scores(zero_shot, maxima).numpy(), expected, rtol=1e-6)
    for scores, equal_maxima in ((zero_shot[:1], maxima[:1]), (zero_shot, torch.full((3,), 2.5))):
        with pytest.warns(UserWarning, match="same anomaly-map maximum"):
            final = few_shot_image_scores(scores, equal_maxima)
        np.testing.assert_array_equal(final.numpy(), 0.5 * scores.numpy())  # finite: the authors' 0/0 gives NaN


class ScoresSeen(Callback):
    """The image scores that callbacks (pictures, predictions) get, by image path."""

    def __init__(self):
        self.scores = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if outputs is not None:
            self.scores.update(zip(outputs["image_path"], outputs["pred_score"].tolist()))


def few_shot_folder(stored, folder, target):
    """The authors' draw of normal images, as the only ones in each category's folder (``target/<category>``);
    with ``k_shot`` 8, anovl's draw from two files takes both."""
    for path in stored["few_shot_images"]:
        category = str(path).split("/")[0]
        (target / category).mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "visa" / str(path), target / category)
    return str(target / "{category}")


def reference_order(folder):
    """The reference's test images in its order."""
    return [
        str(folder / "visa" / name / "test" / specie / f"{index:03d}.png")
        for name in reference.CLASSES
        for index, (specie, _) in enumerate(reference.TEST_IMAGES)
    ]


def few_shot_run(setup, stored, tmp_path, batch_size):
    """``anovl test`` and ``anovl predict`` of few-shot APRIL-GAN (few_shot_images) on the reference data: the
    scores the test's callbacks (pictures among them) got, results.json, and the scores in predict's scores.csv
    (scores in the reference's order)."""
    model, *_, folder = setup
    model.few_shot_images, model.k_shot = few_shot_folder(stored, folder, tmp_path / "shots"), 8
    seen = ScoresSeen()
    data = MVTecDataModule(
        root=str(folder / "visa"), image_size=reference.IMAGE_SIZE, batch_size=batch_size, num_workers=0
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Engine(
                {"enable_progress_bar": False, "callbacks": [seen]},
                run_dir=tmp_path / f"run{batch_size}",
                pictures={"max_per_category": 1},
            ).test(model, data)
            Engine(
                {"enable_progress_bar": False},
                run_dir=tmp_path / f"predict{batch_size}",
                predictions={"overlays": False, "raw_maps": False},
            ).predict(model, data)
    finally:
        model.few_shot_images = None
        model.forget()
    results = json.loads((tmp_path / f"run{batch_size}" / "results.json").read_text())
    predicted = predicted_scores(tmp_path / f"predict{batch_size}" / "predictions" / "scores.csv", folder)
    return np.array([seen.scores[path] for path in reference_order(folder)]), results, predicted


def predicted_scores(path, folder):
    """The scores of a predict's scores.csv, in the reference's order."""
    with path.open() as handle:
        scores = {row["image_path"]: float(row["score"]) for row in csv.DictReader(handle)}
    return np.array([scores[image] for image in reference_order(folder)])


def test_few_shot_run_gives_the_authors_image_scores_and_metrics(setup, stored, tmp_path):
    scores, results, predicted = few_shot_run(setup, stored, tmp_path, batch_size=2)
    np.testing.assert_allclose(scores, stored["few_shot_scores"], rtol=MAP_TOLERANCE, atol=1e-7)
    np.testing.assert_allclose(predicted, stored["few_shot_scores"], rtol=MAP_TOLERANCE, atol=1e-7)
    labels = [anomaly for _, anomaly in reference.TEST_IMAGES]
    per_class = len(labels)
    rows = {row["category"]: row for row in results["categories"]}
    for index, name in enumerate(reference.CLASSES):
        authors = stored["few_shot_scores"][index * per_class : (index + 1) * per_class]
        assert rows[name]["image_auroc"] == pytest.approx(100 * roc_auc_score(labels, authors))
        assert rows[name]["image_ap"] == pytest.approx(100 * average_precision_score(labels, authors))
    assert results["label"].startswith("APRIL-GAN-few-shot[")
    assert len(list((tmp_path / "run2" / "pictures").glob("*/*.png"))) == len(reference.CLASSES)
    assert results["config"]["model"]["few_shot"] == {"layers": reference.FEW_SHOT_LAYERS, "shots": 8, "seed": 0}
    # The scores do not depend on the batch size (normalised over the whole category, not per batch).
    one_at_a_time, _, predicted_alone = few_shot_run(setup, stored, tmp_path, batch_size=1)
    np.testing.assert_allclose(one_at_a_time, scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(predicted_alone, predicted, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # about 45 s: two processes start, each imports torch and Lightning
def test_few_shot_predict_in_two_processes_gives_the_authors_scores(setup, stored, tmp_path):
    """``anovl predict`` of few-shot APRIL-GAN under DDP (2 gloo processes, each with a share of every category):
    scores.csv holds the authors' image scores."""
    *_, folder = setup
    (tmp_path / "parity.json").write_text(json.dumps(reference.CONFIG))
    model = {
        "backbone": str(tmp_path / "parity.json"),
        "pretrained": str(folder / "clip.pt"),
        "image_size": reference.IMAGE_SIZE,
        "layers": reference.LAYERS,
        "few_shot_layers": reference.FEW_SHOT_LAYERS,
        "checkpoint": str(folder / "given.pth"),
        "few_shot_images": few_shot_folder(stored, folder, tmp_path / "shots"),
        "k_shot": 8,
    }
    data = {"root": str(folder / "visa"), "batch_size": 1, "num_workers": 0}
    config = {
        "model": {"class_path": "aprilgan", "init_args": model},
        "data": {"class_path": "anovl.data.MVTecDataModule", "init_args": data},
        "trainer": {"devices": 2, "strategy": "ddp", "accelerator": "cpu", "enable_progress_bar": False},
        "predictions": {"output_dir": str(tmp_path / "out"), "overlays": False, "raw_maps": False},
    }
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "anovl.cli", "predict", "--config", str(tmp_path / "predict.yaml")],
        env={**os.environ, "ANOVL_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(
        predicted_scores(tmp_path / "out" / "scores.csv", folder),
        stored["few_shot_scores"],
        rtol=MAP_TOLERANCE,
        atol=1e-7,
    )
