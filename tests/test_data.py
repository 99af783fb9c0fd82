"""Datamodules (MVTec, VisA, folder, synthetic) on generated data in the real layouts."""

import csv
import hashlib
import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from anovl.data import (
    BadImageError,
    FolderDataModule,
    MVTecDataModule,
    SkippedFileWarning,
    SyntheticMVTecDataModule,
    VisADataModule,
    generate_mvtec_like,
    generate_visa_like,
)
from anovl.data.synthetic import DEFECT_TYPES
from anovl.data.transforms import prepare_batch
from anovl.metrics.functional import region_size_map
from anovl.errors import AnovlError

from tests.reference.preprocessing import reference_image, reference_mask
from tests.test_data_io import _fuzz_files

BATCH_KEYS = {"image", "mask", "region_sizes", "has_mask", "label", "category", "prompt_name", "image_path"}
SIZE = 32


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    return generate_mvtec_like(
        tmp_path_factory.mktemp("mvtec"), ("widget", "fabric"), n_good=3, n_defect=1, image_size=64
    )


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory):
    return generate_visa_like(tmp_path_factory.mktemp("visa"), n_good=2, n_defect=1, image_size=(40, 60))


@pytest.fixture
def mvtec_copy(mvtec_root, tmp_path):
    """A private copy to damage."""
    return Path(shutil.copytree(mvtec_root, tmp_path / "mvtec"))


def all_batches(datamodule):
    return list(datamodule.test_dataloader())


def concat(batches, key):
    values = [batch[key] for batch in batches]
    return torch.cat(values) if isinstance(values[0], torch.Tensor) else [item for value in values for item in value]


# ---------------------------------------------------------------- MVTec


def test_mvtec_samples_labels_and_sort_order(mvtec_root):
    datamodule = MVTecDataModule(mvtec_root, image_size=SIZE)
    assert datamodule.categories == ["fabric", "widget"]
    samples = datamodule.samples
    assert len(samples) == 2 * (3 + len(DEFECT_TYPES))
    assert [(s.category, s.key) for s in samples] == sorted((s.category, s.key) for s in samples)
    for sample in samples:
        assert sample.label == (0 if sample.image_path.parent.name == "good" else 1)
        assert sample.has_mask
        assert (sample.mask_path is None) == (sample.label == 0)
        assert sample.prompt_name == sample.category


def test_mvtec_batches_follow_the_contract(mvtec_root):
    datamodule = MVTecDataModule(mvtec_root, image_size=SIZE, batch_size=4)
    batches = all_batches(datamodule)
    assert [len(batch["label"]) for batch in batches] == [4, 3, 4, 3]  # batches never mix categories
    for batch in batches:
        assert set(batch) == BATCH_KEYS
        count = len(batch["label"])
        assert batch["image"].shape == (count, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
        assert batch["mask"].shape == (count, SIZE, SIZE) and batch["mask"].dtype == torch.bool
        assert torch.equal(batch["region_sizes"] > 0, batch["mask"])
        prepared = prepare_batch(batch)
        assert prepared["image"].dtype == torch.float32 and prepared["mask"].dtype == torch.float32
        assert batch["has_mask"].dtype == torch.bool and batch["label"].dtype == torch.long
        assert len(set(batch["category"])) == 1
        assert isinstance(batch["image_path"][0], str)
    assert concat(batches, "image_path") == [str(s.image_path) for s in datamodule.samples]
    assert torch.equal(concat(batches, "label"), torch.tensor([s.label for s in datamodule.samples]))
    assert datamodule.predict_dataloader() is not None
    assert concat(list(datamodule.predict_dataloader()), "image_path") == concat(batches, "image_path")


def test_mvtec_masks_match_the_generated_defects(mvtec_root):
    datamodule = MVTecDataModule(mvtec_root, image_size=SIZE, batch_size=16)
    batches = all_batches(datamodule)
    masks, labels = concat(batches, "mask"), concat(batches, "label")
    for mask, label, sample in zip(masks, labels, datamodule.samples):
        if label == 0:
            assert not mask.any()
        else:
            expected = reference_mask(sample.mask_path, (SIZE, SIZE))
            assert expected.any()
            assert torch.equal(mask.float(), expected)


def test_mvtec_category_selection_and_prompt_names(mvtec_root):
    datamodule = MVTecDataModule(
        mvtec_root, categories=["widget"], image_size=SIZE, prompt_names={"widget": "metal part"}
    )
    assert datamodule.categories == ["widget"]
    batch = all_batches(datamodule)[0]
    assert set(batch["prompt_name"]) == {"metal part"} and set(batch["category"]) == {"widget"}
    with pytest.warns(UserWarning, match="bottle"):
        MVTecDataModule(mvtec_root, prompt_names={"bottle": "x"}).samples


@pytest.mark.parametrize(
    "make_root,categories,match",
    [
        (lambda tmp: tmp / "missing", None, "missing"),
        (lambda tmp: tmp, None, "No category folders"),
        (lambda tmp: tmp, ["bottle"], "bottle"),
    ],
)
def test_mvtec_layout_errors(mvtec_root, tmp_path, make_root, categories, match):
    if categories:
        shutil.copytree(mvtec_root / "widget", tmp_path / "widget")
    with pytest.raises(AnovlError, match=match) as error:
        MVTecDataModule(make_root(tmp_path), categories=categories).categories
    assert "\n" not in str(error.value)


def test_mvtec_empty_category_is_an_error(tmp_path):
    (tmp_path / "empty" / "test" / "good").mkdir(parents=True)
    with pytest.raises(AnovlError, match="No test images") as error:
        MVTecDataModule(tmp_path).categories
    assert str(tmp_path / "empty" / "test") in str(error.value)


def test_btad_and_mpdd_style_folders(tmp_path):
    """BTAD: test/ok and test/ko, masks with the image's own stem; extensions in any case."""
    category = tmp_path / "01"
    for folder, name in (("ok", "000.BMP"), ("ok", "001.Png"), ("ko", "002.bmp")):
        (category / "test" / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (90, 90, 90)).save(category / "test" / folder / name)
    (category / "ground_truth" / "ko").mkdir(parents=True)
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[5:15, 5:15] = 255
    Image.fromarray(mask).save(category / "ground_truth" / "ko" / "002.png")
    (category / "test" / "ok" / ".DS_Store").write_bytes(b"junk")
    samples = MVTecDataModule(tmp_path, image_size=SIZE).samples
    assert [(s.image_path.name, s.label, s.mask_path and s.mask_path.name) for s in samples] == [
        ("002.bmp", 1, "002.png"),
        ("000.BMP", 0, None),
        ("001.Png", 0, None),
    ]


def test_missing_mask_errors_or_is_kept_for_image_metrics(mvtec_copy):
    mask_path = mvtec_copy / "widget" / "ground_truth" / "blob" / "000_mask.png"
    mask_path.unlink()
    image_path = mvtec_copy / "widget" / "test" / "blob" / "000.png"
    with pytest.raises(AnovlError, match="No mask") as error:
        MVTecDataModule(mvtec_copy).samples
    assert str(image_path) in str(error.value)
    datamodule = MVTecDataModule(mvtec_copy, on_bad_image="skip", image_size=SIZE)
    with pytest.warns(SkippedFileWarning, match=str(image_path)):
        samples = datamodule.samples
    sample = next(s for s in samples if s.image_path == image_path)
    assert sample.label == 1 and not sample.has_mask
    batches = all_batches(datamodule)
    index = concat(batches, "image_path").index(str(image_path))
    assert not concat(batches, "has_mask")[index] and concat(batches, "label")[index] == 1


def test_mask_of_another_size(mvtec_copy):
    mask_path = mvtec_copy / "widget" / "ground_truth" / "blob" / "000_mask.png"
    Image.open(mask_path).resize((50, 64)).save(mask_path)
    with pytest.raises(BadImageError, match="50×64") as error:
        all_batches(MVTecDataModule(mvtec_copy, image_size=SIZE))
    assert str(mask_path) in str(error.value) and "000.png" in str(error.value)
    with pytest.warns(SkippedFileWarning, match=str(mask_path)):
        batches = all_batches(MVTecDataModule(mvtec_copy, image_size=SIZE, on_bad_image="skip"))
    has_mask = dict(zip(concat(batches, "image_path"), concat(batches, "has_mask").tolist()))
    assert len(has_mask) == 14 and not has_mask[str(mvtec_copy / "widget" / "test" / "blob" / "000.png")]
    assert sum(has_mask.values()) == 13


def test_unreadable_image_errors_or_is_skipped(mvtec_copy):
    bad = mvtec_copy / "fabric" / "test" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(BadImageError, match="on_bad_image='skip'") as error:
        all_batches(MVTecDataModule(mvtec_copy, image_size=SIZE))
    assert str(bad) in str(error.value)
    with pytest.warns(SkippedFileWarning, match=str(bad)) as record:
        batches = all_batches(MVTecDataModule(mvtec_copy, image_size=SIZE, on_bad_image="skip"))
    assert len([w for w in record if issubclass(w.category, SkippedFileWarning)]) == 1
    paths = concat(batches, "image_path")
    assert len(paths) == 13 and str(bad) not in paths


def test_all_images_unreadable_is_an_error(tmp_path):
    (tmp_path / "c" / "test" / "good").mkdir(parents=True)
    (tmp_path / "c" / "test" / "good" / "a.png").write_bytes(b"nope")
    with pytest.warns(SkippedFileWarning), pytest.raises(AnovlError, match="None of the 1 images"):
        MVTecDataModule(tmp_path, on_bad_image="skip").setup()


def test_skip_mode_survives_a_fuzzed_dataset(mvtec_copy):
    rng = np.random.default_rng(7)
    list(_fuzz_files(rng, mvtec_copy / "widget" / "test" / "good", 60))
    masks = mvtec_copy / "fabric" / "ground_truth" / "scratch"
    for path, target in zip(_fuzz_files(rng, masks, 1), [masks / "000_mask.png"]):
        path.replace(target)  # a garbage mask
    datamodule = MVTecDataModule(mvtec_copy, image_size=SIZE, batch_size=5, on_bad_image="skip", num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = all_batches(datamodule)
    assert 14 <= len(concat(batches, "image_path")) <= 14 + 60
    assert all(torch.isfinite(batch["image"]).all() for batch in batches)


def test_invalid_arguments():
    with pytest.raises(AnovlError, match="on_bad_image"):
        MVTecDataModule("x", on_bad_image="ignore")
    with pytest.raises(AnovlError, match="batch_size"):
        MVTecDataModule("x", batch_size=0)
    with pytest.raises(AnovlError, match="mode"):
        VisADataModule("x", mode="crop")


# ---------------------------------------------------------------- corruption


def test_corrupted_image_is_independent_of_order_and_workers(mvtec_root):
    def corrupted_by_path(**options):
        batches = all_batches(MVTecDataModule(mvtec_root, image_size=SIZE, corruption="default", seed=5, **options))
        return dict(zip(concat(batches, "image_path"), concat(batches, "corrupted_image")))

    everything = corrupted_by_path(batch_size=3)
    assert len(everything) == 14
    one_category = corrupted_by_path(categories=["widget"], batch_size=2, num_workers=2)
    for path, corrupted in one_category.items():
        assert torch.equal(corrupted, everything[path])
    batch = all_batches(MVTecDataModule(mvtec_root, image_size=SIZE, corruption={"noise_p": 1.0}))[0]
    assert batch["corrupted_image"].shape == batch["image"].shape
    assert not torch.equal(batch["corrupted_image"], batch["image"])
    assert "corrupted_image" not in all_batches(MVTecDataModule(mvtec_root, image_size=SIZE))[0]


# ---------------------------------------------------------------- Lightning


class _Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.tested = []

    def test_step(self, batch, batch_index):
        self.tested.extend(batch["image_path"])

    def predict_step(self, batch, batch_index):
        return batch["image_path"]


def test_lightning_test_and_predict_see_every_image_once(visa_root):
    datamodule = VisADataModule(visa_root, image_size=SIZE, batch_size=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    module = _Recorder()
    trainer.test(module, datamodule=datamodule, verbose=False)
    expected = [str(s.image_path) for s in datamodule.samples]
    assert module.tested == expected
    predictions = trainer.predict(module, datamodule=datamodule)
    assert [path for batch in predictions for path in batch] == expected
    assert all(len(batch) <= 3 for batch in predictions)


def test_datamodules_are_configurable_from_the_command_line(tmp_path):
    from jsonargparse import ArgumentParser

    for cls in (MVTecDataModule, VisADataModule, FolderDataModule, SyntheticMVTecDataModule):
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "data")
        first = "--data.path" if cls is FolderDataModule else "--data.root"
        config = parser.parse_args(
            [first, str(tmp_path), "--data.corruption", "default", "--data.prompt_names", '{"a": "b"}']
        )
        datamodule = parser.instantiate(config).data
        assert (
            isinstance(datamodule, cls) and datamodule.corruption is not None and datamodule.prompt_names == {"a": "b"}
        )


# ---------------------------------------------------------------- VisA


def test_visa_samples_and_prompt_names(visa_root):
    datamodule = VisADataModule(visa_root, image_size=SIZE)
    assert datamodule.categories == ["fabric", "macaroni1", "macaroni2"]
    per_category = 2 + len(DEFECT_TYPES)  # test rows only: the train rows are ignored
    assert len(datamodule.samples) == 3 * per_category
    names = {s.category: s.prompt_name for s in datamodule.samples}
    assert names == {"fabric": "fabric", "macaroni1": "macaroni", "macaroni2": "macaroni"}
    overridden = VisADataModule(visa_root, categories=["macaroni2"], prompt_names={"macaroni2": "pasta"})
    assert {s.prompt_name for s in overridden.samples} == {"pasta"}


@pytest.mark.parametrize("mode", ["tile", "resize"])
def test_visa_batches_and_zero_one_masks(visa_root, mode):
    datamodule = VisADataModule(visa_root, image_size=SIZE, mode=mode, batch_size=4)
    batches = all_batches(datamodule)
    size_hw = (SIZE, SIZE * 3 // 2) if mode == "tile" else (SIZE, SIZE)
    for batch in batches:
        assert set(batch) == BATCH_KEYS
        assert batch["image"].shape[1:] == (3, *size_hw) and batch["mask"].shape[1:] == size_hw
    for mask, sample in zip(concat(batches, "mask"), datamodule.samples):
        if sample.label == 1:
            expected = reference_mask(sample.mask_path, size_hw, nonzero=True)
            assert expected.any() and torch.equal(mask.float(), expected)  # 0/1 masks are anomalous where nonzero
        else:
            assert sample.has_mask and not mask.any()


def test_visa_tile_mode_with_one_size_per_category(visa_root, tmp_path):
    """Different aspect ratios per category batch fine; mixed sizes within a category need batch_size=1."""
    root = Path(shutil.copytree(visa_root, tmp_path / "visa"))
    for path in (root / "fabric").rglob("*.*"):
        Image.open(path).resize((40, 40)).save(path)  # fabric: square, the others 60×40
    shapes = {tuple(b["image"].shape[2:]) for b in all_batches(VisADataModule(root, image_size=SIZE, batch_size=4))}
    assert shapes == {(SIZE, SIZE), (SIZE, SIZE * 3 // 2)}
    normal_test_image = root / "macaroni1" / "Data" / "Images" / "Normal" / "0003.JPG"  # no mask to mismatch
    Image.open(normal_test_image).resize((80, 40)).save(normal_test_image)
    with pytest.raises(AnovlError, match="batch_size=1"):
        all_batches(VisADataModule(root, categories=["macaroni1"], image_size=SIZE, batch_size=8))
    assert len(all_batches(VisADataModule(root, categories=["macaroni1"], image_size=SIZE, batch_size=1))) == 6


def test_visa_layout_errors(visa_root, tmp_path):
    with pytest.raises(AnovlError, match="1cls.csv"):
        VisADataModule(tmp_path).samples
    with pytest.raises(AnovlError, match="candle"):
        VisADataModule(visa_root, categories=["candle"]).samples
    split_file = tmp_path / "split_csv" / "1cls.csv"
    split_file.parent.mkdir()
    split_file.write_text("object,split,image\ncandle,test,a.JPG\n")
    with pytest.raises(AnovlError, match="label"):
        VisADataModule(tmp_path).samples
    rows = list(csv.reader((visa_root / "split_csv" / "1cls.csv").open()))
    rows[-1][2] = "broken"
    with split_file.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with pytest.raises(AnovlError, match=f"line {len(rows)}: label 'broken'"):
        VisADataModule(tmp_path).samples


def test_visa_missing_mask_column(visa_root, tmp_path):
    root = Path(shutil.copytree(visa_root, tmp_path / "visa"))
    split_file = root / "split_csv" / "1cls.csv"
    rows = list(csv.reader(split_file.open()))
    anomaly = next(row for row in rows if row[2] == "anomaly")
    anomaly[4] = ""
    with split_file.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with pytest.raises(AnovlError, match="No mask"):
        VisADataModule(root).samples
    with pytest.warns(SkippedFileWarning, match=anomaly[3]):
        samples = VisADataModule(root, on_bad_image="skip").samples
    assert sum(not s.has_mask for s in samples) == 1


# ---------------------------------------------------------------- folder


def _write_images(folder, names, size=(30, 20)):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", size, (120, 80, 40)).save(folder / name)


def test_flat_folder_for_prediction(tmp_path):
    folder = tmp_path / "parts"
    _write_images(folder, ["b.png", "a.jpg", "c.tiff"])
    _write_images(folder / "ignored", ["d.png"])
    (folder / "readme.txt").write_text("hi")
    datamodule = FolderDataModule(folder, image_size=SIZE, batch_size=2)
    with pytest.warns(UserWarning, match="ignored/d.png"):  # named, not dropped silently
        batches = list(datamodule.predict_dataloader())
    assert concat(batches, "image_path") == [str(folder / name) for name in ("a.jpg", "b.png", "c.tiff")]
    assert concat(batches, "label").tolist() == [-1, -1, -1] and not concat(batches, "has_mask").any()
    assert datamodule.categories == ["parts"] and set(concat(batches, "prompt_name")) == {"object"}
    single = FolderDataModule(folder / "a.jpg", prompt_name="bracket")
    assert [(s.image_path.name, s.prompt_name, s.category) for s in single.samples] == [("a.jpg", "bracket", "parts")]


def test_labelled_folder_with_masks(tmp_path):
    folder = tmp_path / "line3"
    _write_images(folder / "OK", ["g1.png"])
    _write_images(folder / "normal", ["g2.png"])
    _write_images(folder / "ng" / "dent", ["d1.png"])
    _write_images(folder / "anomaly", ["d2.png"])
    samples = FolderDataModule(folder).samples
    # Sorted by path below the folder: "OK/" < "anomaly/" < "ng/" < "normal/".
    assert [(s.image_path.name, s.label, s.has_mask) for s in samples] == [
        ("g1.png", 0, False),
        ("d2.png", 1, False),
        ("d1.png", 1, False),
        ("g2.png", 0, False),
    ]
    masks = tmp_path / "masks"
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[:10] = 255
    masks.mkdir()
    Image.fromarray(mask).save(masks / "d1_mask.png")
    with pytest.raises(AnovlError, match="d2.png"):
        FolderDataModule(folder, mask_dir=masks).samples
    Image.fromarray(mask).save(masks / "d2.png")
    datamodule = FolderDataModule(folder, mask_dir=masks, image_size=SIZE, batch_size=8)
    assert all(s.has_mask for s in datamodule.samples)
    batch = all_batches(datamodule)[0]
    assert batch["label"].tolist() == [0, 1, 1, 0]
    assert (
        batch["mask"][[1, 2]].sum(dim=(1, 2)).float().tolist() == [SIZE * SIZE / 2] * 2
        and not batch["mask"][[0, 3]].any()
    )


def test_folder_errors(tmp_path):
    with pytest.raises(AnovlError, match="missing"):
        FolderDataModule(tmp_path / "missing").samples
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnovlError, match="No images"):
        FolderDataModule(tmp_path / "empty").samples
    _write_images(tmp_path / "mixed", ["loose.png"])
    _write_images(tmp_path / "mixed" / "good", ["g.png"])
    with pytest.raises(AnovlError, match="loose images"):
        FolderDataModule(tmp_path / "mixed").samples
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(AnovlError, match="not a supported image"):
        FolderDataModule(tmp_path / "notes.txt").samples


# ---------------------------------------------------------------- synthetic


def _digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_synthetic_generation_is_deterministic_and_in_layout(tmp_path, mvtec_root):
    again = generate_mvtec_like(tmp_path / "again", ("widget", "fabric"), n_good=3, n_defect=1, image_size=64)
    assert _digest(again) == _digest(mvtec_root)
    other = generate_mvtec_like(tmp_path / "other", ("widget",), n_good=3, n_defect=1, image_size=64, seed=1)
    assert _digest(other)["widget/test/good/000.png"] != _digest(mvtec_root)["widget/test/good/000.png"]
    files = _digest(mvtec_root)
    for category in ("widget", "fabric"):
        assert f"{category}/train/good/000.png" in files
        for defect in DEFECT_TYPES:
            mask = np.asarray(Image.open(mvtec_root / category / "ground_truth" / defect / "000_mask.png"))
            assert set(np.unique(mask)) == {0, 255}


def test_synthetic_masks_cover_exactly_the_changed_pixels(tmp_path):
    """The same random stream renders the normal image first, so outside the mask nothing may differ."""
    from anovl.data.synthetic import _defective_image, _normal_image

    for style in ("widget", "washer", "fabric", "granite", "stripes"):
        for defect in DEFECT_TYPES:
            normal, _ = _normal_image(style, (64, 96), np.random.default_rng(3))
            defective, mask = _defective_image(style, defect, (64, 96), np.random.default_rng(3))
            assert mask.any(), (style, defect)
            np.testing.assert_array_equal(defective[~mask], normal[~mask])
            assert (defective[mask] != normal[mask]).any(axis=-1).mean() > 0.8, (style, defect)


def test_synthetic_datamodule_generates_once(tmp_path):
    root = tmp_path / "demo"
    datamodule = SyntheticMVTecDataModule(
        root, categories=["washer", "granite"], n_good=2, n_defect=1, image_size_on_disk=48, image_size=SIZE
    )
    assert datamodule.categories == ["granite", "washer"]
    assert len(all_batches(datamodule)) == 2
    marker = root / "washer" / "test" / "good" / "000.png"
    marker.write_bytes(b"changed")
    SyntheticMVTecDataModule(root, categories=["washer"]).prepare_data()
    assert marker.read_bytes() == b"changed"  # existing data is used as it is
    with pytest.raises(AnovlError):
        SyntheticMVTecDataModule(tmp_path / "absent", generate=False).samples
    with pytest.raises(AnovlError, match="styles"):
        generate_mvtec_like(tmp_path / "x", ("bottle",))


@pytest.mark.parametrize("layout", ["mvtec", "visa"])
def test_the_loader_path_gives_the_reference_preprocessing_and_maps(mvtec_root, visa_root, tiny_model, layout):
    """uint8 from the workers, normalised after the transfer (prepare_batch): the model sees the images of
    torchvision's pipeline, so its maps are those of the old float path (here on the CPU: bit for bit)."""
    from anovl.engine.module import AnomalyModule

    size = tiny_model.image_size
    datamodule = (
        MVTecDataModule(mvtec_root, image_size=size, batch_size=4, num_workers=1)
        if layout == "mvtec"
        else VisADataModule(visa_root, image_size=size, batch_size=4, num_workers=1)
    )
    module = AnomalyModule(tiny_model)
    batch = module.on_after_batch_transfer(next(iter(datamodule.test_dataloader())), 0)
    expected = torch.stack([reference_image(path, size) for path in batch["image_path"]])
    assert torch.equal(batch["image"], expected)
    with torch.no_grad():
        maps, _ = module.anomaly_maps(batch)
        reference_maps, _ = module.anomaly_maps({**batch, "image": expected})
    assert (maps - reference_maps).abs().max() <= 1e-5
    regions = torch.from_numpy(region_size_map(batch["mask"].numpy()))
    assert torch.equal(batch["region_sizes"], regions) and batch["mask"].dtype == torch.float32


def test_a_bad_file_read_in_a_worker_is_one_line(mvtec_copy):
    broken = mvtec_copy / "widget" / "test" / "good" / "000.png"
    broken.write_bytes(b"not a png")
    datamodule = MVTecDataModule(mvtec_copy, categories=["widget"], image_size=SIZE, num_workers=1)
    assert datamodule.loader_workers() == 1
    with pytest.raises(BadImageError) as error:
        list(datamodule.test_dataloader())
    message = str(error.value)
    assert (
        "\n" not in message and message.startswith(f"Cannot read image {broken}") and "on_bad_image='skip'" in message
    )


def test_auto_workers_leave_a_core_to_the_model(mvtec_root, monkeypatch):
    from anovl.data import datamodule as module

    for cores, expected in ((1, 0), (2, 1), (8, 7), (64, module.MAX_AUTO_WORKERS)):
        monkeypatch.setattr(module, "available_cores", lambda cores=cores: cores)
        assert MVTecDataModule(mvtec_root).loader_workers() == expected
    with pytest.raises(AnovlError, match="num_workers='many' must be an integer >= 0 or 'auto'"):
        MVTecDataModule(mvtec_root, num_workers="many")
