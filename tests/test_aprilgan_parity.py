"""APRIL-GAN equals the authors' own scripts (train.py, test.py) on identical random weights and images.

tests/reference/data/aprilgan.npz was written by tests/reference/aprilgan.py, which runs the authors' unmodified
train.py (one Adam step on one batch) and test.py (zero-shot and few-shot) on a tiny 12-block CLIP whose
weights come from ``parity_weights`` and on a tiny VisA-layout dataset (``write_dataset``); both are rebuilt
here for anovl. Mutations that these tests catch are listed in docs/METHOD.md (APRIL-GAN).
"""

import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from anovl.backbones import register_model_config
from anovl.data.transforms import normalize
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
    return model, images, masks, classes, load


def test_zero_shot_maps_and_scores_equal_the_authors(setup, stored):
    model, images, _, classes, _ = setup
    output = model(images, classes, classes)
    np.testing.assert_allclose(output.anomaly_map.numpy(), stored["zero_shot_maps"], rtol=0, atol=MAP_TOLERANCE)
    np.testing.assert_allclose(output.pred_score.numpy(), stored["zero_shot_scores"], rtol=MAP_TOLERANCE, atol=1e-9)


def test_one_training_step_equals_the_authors(setup, stored):
    model, images, masks, classes, _ = setup
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
    model, images, _, classes, load = setup
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
