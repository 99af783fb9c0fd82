"""Ground truth that cannot vanish (masks of every depth and mode) and memory bounded on odd images."""

import csv
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anovl.data import BadImageError, MVTecDataModule, SkippedFileWarning, VisADataModule, load_mask
from anovl.data.dataset import MAX_TILE_ASPECT
from anovl.errors import AnovlError
from tests.test_reliability_paths import mvtec_copy, mvtec_root  # noqa: F401 (shared fixtures)

SIZE = 32


def encode(truth: np.ndarray, encoding: str, rng: np.random.Generator) -> Image.Image:
    """``truth`` (bool H×W) written as a mask the way some tool might save it."""
    on = int(rng.integers(1, 256))
    if encoding == "1":
        return Image.fromarray(truth).convert("1")
    if encoding == "L 0/255":
        return Image.fromarray(truth.astype(np.uint8) * 255)
    if encoding == "L 0/1":
        return Image.fromarray(truth.astype(np.uint8))
    if encoding == "L 0/k":
        return Image.fromarray(truth.astype(np.uint8) * on)
    if encoding == "I;16 0/255":
        return Image.fromarray(truth.astype(np.uint16) * 255)
    if encoding == "I;16 0/65535":
        return Image.fromarray(truth.astype(np.uint16) * 65535)
    if encoding == "I 0/255":
        return Image.fromarray(truth.astype(np.int32) * 255, mode="I")
    if encoding == "I 0/2^31-1":
        return Image.fromarray(truth.astype(np.int32) * (2**31 - 1), mode="I")
    if encoding == "F 0/1":
        return Image.fromarray(truth.astype(np.float32), mode="F")
    if encoding == "F 0/255":
        return Image.fromarray(truth.astype(np.float32) * 255, mode="F")
    if encoding == "P":
        palette = Image.fromarray(truth.astype(np.uint8))
        palette.putpalette([0, 0, 0, *rng.integers(1, 256, 3).tolist()] + [0] * 762)
        return palette.convert("P") if palette.mode == "P" else palette.convert("P")
    if encoding == "LA alpha":  # black marks on a transparent layer
        return Image.fromarray(np.stack([np.zeros_like(truth, np.uint8), truth.astype(np.uint8) * 255], axis=2), "LA")
    if encoding == "RGBA white on transparent":
        rgba = np.zeros((*truth.shape, 4), dtype=np.uint8)
        rgba[truth] = (255, 255, 255, 255)
        return Image.fromarray(rgba, "RGBA")
    if encoding == "RGBA opaque":
        rgba = np.full((*truth.shape, 4), 255, dtype=np.uint8)
        rgba[..., :3] = truth[..., None] * np.array([on, 0, 0], dtype=np.uint8)
        return Image.fromarray(rgba, "RGBA")
    if encoding == "RGB red":
        return Image.fromarray((truth[..., None] * np.array([on, 0, 0])).astype(np.uint8))
    raise ValueError(encoding)


ENCODINGS = [
    "1",
    "L 0/255",
    "L 0/1",
    "L 0/k",
    "I;16 0/255",
    "I;16 0/65535",
    "I 0/255",
    "I 0/2^31-1",
    "F 0/1",
    "F 0/255",
    "P",
    "LA alpha",
    "RGBA white on transparent",
    "RGBA opaque",
    "RGB red",
]


def test_fuzzed_binary_masks_decode_to_their_truth_in_every_encoding(tmp_path):
    rng = np.random.default_rng(0)
    for trial in range(120):
        encoding = ENCODINGS[trial % len(ENCODINGS)]
        truth = rng.random((int(rng.integers(2, 20)), int(rng.integers(2, 20)))) < rng.uniform(0.05, 0.7)
        truth[0, 0] = True
        suffix = ".tif" if encoding.startswith(("I ", "F ")) else ".png"
        path = tmp_path / f"{trial}{suffix}"
        encode(truth, encoding, rng).save(path)
        for nonzero in (False, True):
            np.testing.assert_array_equal(load_mask(path, nonzero), truth, err_msg=f"{encoding}, nonzero={nonzero}")


def test_sixteen_bit_soft_mask_uses_its_range(tmp_path):
    values = np.zeros((8, 8), dtype=np.uint16)
    values[0, :4] = [100, 200, 255, 10]  # 8-bit values stored in 16 bits, anti-aliased
    Image.fromarray(values).save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), values > 127.5)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8), "does not look like a mask"),
        (np.full((4, 4), np.nan, dtype=np.float32), "negative or NaN"),
        (np.full((4, 4), -1.0, dtype=np.float32), "negative or NaN"),
    ],
)
def test_files_that_are_not_masks_are_bad_images(tmp_path, content, fragment):
    path = tmp_path / "m.tif"
    Image.fromarray(content).save(path)
    with pytest.raises(BadImageError, match=fragment) as error:
        load_mask(path)
    assert str(path) in str(error.value)


def a_mask(root: Path) -> Path:
    return sorted((root / "widget" / "ground_truth").rglob("*.png"))[0]


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("sixteen bit 0/255", None),
        ("empty", "marks no pixel as anomalous"),
        ("photo", "does not look like a mask"),
    ],
)
def test_ground_truth_cannot_vanish(mvtec_copy, damage, fragment):
    mask_path = a_mask(mvtec_copy)
    truth = np.asarray(Image.open(mask_path)) > 127
    if damage == "sixteen bit 0/255":
        Image.fromarray(truth.astype(np.uint16) * 255).save(mask_path)
    elif damage == "empty":
        Image.fromarray(np.zeros(truth.shape, dtype=np.uint8)).save(mask_path)
    else:
        Image.fromarray(np.random.default_rng(1).integers(0, 256, truth.shape, dtype=np.uint8)).save(mask_path)
    datamodule = MVTecDataModule(mvtec_copy, image_size=SIZE, batch_size=16)
    if fragment is None:  # decoded as anomalous where 255, not as an empty mask
        batch = next(iter(datamodule.test_dataloader()))
        index = batch["image_path"].index(
            str(next(s.image_path for s in datamodule.samples if s.mask_path == mask_path))
        )
        assert batch["mask"][index].sum() > 0
        return
    with pytest.raises(BadImageError, match=fragment):
        list(datamodule.test_dataloader())
    with pytest.warns(SkippedFileWarning, match=fragment):
        skipping = MVTecDataModule(mvtec_copy, image_size=SIZE, on_bad_image="skip")
        kept = [
            s
            for s in skipping.dataset.samples
            if s.image_path.stem == mask_path.stem.removesuffix("_mask")
            and s.image_path.parent.name == mask_path.parent.name
        ]
    assert len(kept) == 1 and not kept[0].has_mask and kept[0].label == 1  # kept for the image metrics
    assert any(fragment in message for message in skipping.skipped_files)


# ---------------------------------------------------------------- bounded memory


def thin_jpeg_visa(root: Path, width: int = 20000, height: int = 1) -> Path:
    """A VisA root whose one test image is a 20000×1 JPEG of noise (about 56 KB)."""
    image = root / "thin" / "Data" / "Images" / "Normal" / "0.JPG"
    image.parent.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image, quality=95)
    (root / "split_csv").mkdir()
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [
                ("object", "split", "label", "image", "mask"),
                ("thin", "test", "normal", "thin/Data/Images/Normal/0.JPG", ""),
            ]
        )
    return image


def test_a_20000x1_jpeg_in_tile_mode_fails_fast_with_one_clear_error(tmp_path):
    image = thin_jpeg_visa(tmp_path)
    assert image.stat().st_size < 100_000
    # num_workers=0: the decoding is traced in this process.
    datamodule = VisADataModule(tmp_path, image_size=240, mode="tile", batch_size=1, num_workers=0)
    tracemalloc.start()
    try:
        with pytest.raises(BadImageError) as error:
            list(datamodule.test_dataloader())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(error.value)
    assert str(image) in message and "20000×1" in message and f"{MAX_TILE_ASPECT}:1" in message
    assert "mode='resize'" in message and "\n" not in message
    assert peak < 20_000_000  # numpy arrays are traced: nothing near the 13 GB the tiled tensor would take
    # Skip mode leaves it out while listing, and resize mode reads it as S×S.
    with pytest.warns(SkippedFileWarning, match="aspect ratio"), pytest.raises(AnovlError, match="None of the 1"):
        VisADataModule(tmp_path, image_size=240, mode="tile", on_bad_image="skip").setup()
    batch = next(iter(VisADataModule(tmp_path, image_size=SIZE, mode="resize").test_dataloader()))
    assert batch["image"].shape == (1, 3, SIZE, SIZE)


def test_resized_size_is_held_to_the_decompression_bomb_limit(tmp_path, monkeypatch):
    image = thin_jpeg_visa(tmp_path, width=64, height=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # the 64×32 file passes; what it becomes must too
    datamodule = VisADataModule(tmp_path, image_size=240, mode="resize")
    with pytest.raises(BadImageError, match="resized it would be 240×240 pixels"):
        list(datamodule.test_dataloader())
    assert image.is_file()
