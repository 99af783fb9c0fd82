"""AnomalyModule running AnoVL under a Lightning Trainer: metrics, order/batch independence, tiles, TTA resets, predict."""

import json
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from PIL import Image
from torch.utils.data import DataLoader

from anovl import AnovlError, TTAConfig
from anovl.callbacks import AnomalyMapWriter, PanelWriter
from anovl.data import MVTecDataModule, VisADataModule, collate_batch, generate_mvtec_like, generate_visa_like
from anovl.data.transforms import prepare_batch
from anovl.metrics import AnomalyMetrics
from anovl.engine import AnomalyModule
from anovl.models import AnoVL
from anovl.visualization import png16_to_map
from tests.conftest import TINY

SIZE = 64


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    return generate_mvtec_like(
        tmp_path_factory.mktemp("mvtec"), ("fabric", "widget"), n_good=2, n_defect=1, image_size=SIZE
    )


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text-cache")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny_module(cache_dir, label=None, **kwargs) -> AnomalyModule:
    kwargs = {"num_views": 2, **kwargs}
    return AnomalyModule(AnoVL(TINY, pretrained=None, image_size=SIZE, cache_dir=str(cache_dir), **kwargs), label)


def trainer(root_dir, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        default_root_dir=root_dir,
        **kwargs,
    )


class ResultsFileWatcher(Callback):
    """Records which categories results.json lists after every test batch."""

    def __init__(self, path):
        self.path = path
        self.seen = []

    def on_test_batch_end(self, *args, **kwargs):
        if self.path.is_file():
            self.seen.append([row["category"] for row in json.loads(self.path.read_text())["categories"]])


def test_metrics_equal_direct_computation(mvtec_root, shared_cache, tmp_path):
    module = tiny_module(shared_cache)
    data = MVTecDataModule(mvtec_root, image_size=SIZE, batch_size=4)
    watcher = ResultsFileWatcher(tmp_path / "results.json")
    trainer(tmp_path, callbacks=[watcher, PanelWriter(max_per_category=2)]).test(module, datamodule=data)
    assert ["fabric"] in watcher.seen  # written as soon as fabric was finished, before the epoch ended

    direct, counts = {}, {}
    with torch.no_grad():
        for batch in map(prepare_batch, data.test_dataloader()):
            output = module.model(batch["image"], batch["category"], batch["prompt_name"])
            category = batch["category"][0]  # batches never mix categories
            direct.setdefault(category, AnomalyMetrics()).update(
                output.anomaly_map, batch["mask"], output.pred_score, batch["label"], batch["has_mask"]
            )
            counts[category] = counts.get(category, 0) + len(batch["category"])
    computed = {category: metric.compute() for category, metric in direct.items()}
    expected = {
        category: {name: 100 * value for name, value in values.items() if not name.endswith("_threshold")}
        for category, values in computed.items()
    }
    assert module.results.rows == expected  # the same computation, so exactly equal
    assert module.results.thresholds == {
        category: {"image": values["image_f1max_threshold"], "pixel": values["pixel_f1max_threshold"]}
        for category, values in computed.items()
    }
    assert module.results.image_counts == counts == {"fabric": 6, "widget": 6}
    mean = module.results.mean()
    assert mean["pixel_auroc"] == pytest.approx(sum(row["pixel_auroc"] for row in expected.values()) / 2)

    document = json.loads((tmp_path / "results.json").read_text())
    assert document["mean"]["pixel_auroc"] == pytest.approx(mean["pixel_auroc"])
    assert "scores mean nothing" in (tmp_path / "results.md").read_text()
    assert len(list((tmp_path / "pictures" / "widget").iterdir())) == 2


def test_results_do_not_depend_on_batch_size(mvtec_root, shared_cache, tmp_path):
    tables = []
    for batch_size in (1, 3):
        module = tiny_module(shared_cache, num_views=1, tta=TTAConfig(steps=2))
        data = MVTecDataModule(mvtec_root, image_size=SIZE, batch_size=batch_size)
        trainer(tmp_path / str(batch_size)).test(module, datamodule=data)
        tables.append(module.results)
    assert tables[0].rows.keys() == tables[1].rows.keys()
    for category, row in tables[0].rows.items():
        assert row == pytest.approx(tables[1].rows[category], rel=1e-6)  # float sums may differ by batch shape
    assert tables[0].image_counts == tables[1].image_counts


class FrameworkTiledAnoVL(AnoVL):
    """AnoVL as a model that leaves wide images to the framework's tiling."""

    handles_wide_images = False


def test_tile_mode_stitches_tile_maps(tmp_path, shared_cache):
    root = generate_visa_like(
        tmp_path / "visa", {"macaroni1": "widget"}, n_good=1, n_defect=1, image_size=(SIZE, SIZE + 32)
    )
    data = VisADataModule(root, image_size=SIZE, mode="tile", batch_size=2)
    module = AnomalyModule(
        FrameworkTiledAnoVL(TINY, pretrained=None, image_size=SIZE, cache_dir=str(shared_cache), num_views=2)
    )
    batch = prepare_batch(next(iter(data.test_dataloader())))
    maps, scores = module.anomaly_maps(batch)
    assert maps.shape == (2, SIZE, SIZE + 32)

    images, categories = batch["image"], batch["category"]
    with torch.no_grad():
        left = module.model(images[..., :SIZE], categories)
        right = module.model(images[..., 32:], categories)
    expected = torch.zeros_like(maps)
    expected[..., :SIZE] += left.anomaly_map
    expected[..., 32:] += right.anomaly_map
    expected[..., 32:SIZE] /= 2
    assert torch.allclose(maps, expected, atol=1e-6)
    assert torch.allclose(scores, (left.pred_score + right.pred_score) / 2, atol=1e-6)
    # AnoVL's own separate-tiles mode is this tiling; its reference mode scores the tiles without views.
    separate_maps, separate_scores = tiny_module(shared_cache, wide_images="separate-tiles").anomaly_maps(batch)
    assert torch.allclose(separate_maps, maps, atol=1e-6) and torch.allclose(separate_scores, scores, atol=1e-6)
    _, reference_scores = tiny_module(shared_cache).anomaly_maps(batch)
    assert not torch.allclose(reference_scores, scores, atol=1e-4)

    trainer(tmp_path / "run").test(module, datamodule=data)
    assert module.results.image_counts == {"macaroni1": 5}


class InterleavedMVTec(MVTecDataModule):
    def test_dataloader(self):
        return DataLoader(self.dataset, batch_size=1, sampler=[0, 6, 1], collate_fn=collate_batch)


def test_categories_must_come_grouped(mvtec_root, shared_cache, tmp_path):
    data = InterleavedMVTec(mvtec_root, image_size=SIZE)
    with pytest.raises(AnovlError, match="grouped by category"):
        trainer(tmp_path).test(tiny_module(shared_cache, num_views=1), datamodule=data)


def test_reference_tta_is_reset_at_category_changes(shared_cache):
    module = tiny_module(shared_cache, num_views=1, tta=TTAConfig(steps=1, mode="reference"))
    resets = []
    module.model.tta.reset = lambda: resets.append(True)
    batch = {
        "image": torch.zeros(3, 3, SIZE, SIZE),
        "prompt_name": ["macaroni"] * 3,
        "category": ["macaroni1", "macaroni1", "macaroni2"],
    }
    module.anomaly_maps(batch)
    assert len(resets) == 2  # at the first category and at the change; the prompt name stays the same


def test_predict_writes_maps(mvtec_root, shared_cache, tmp_path):
    module = tiny_module(shared_cache, num_views=1)
    data = MVTecDataModule(mvtec_root, categories=["widget"], image_size=SIZE, batch_size=4)
    writer = AnomalyMapWriter(str(tmp_path / "out"))
    first = trainer(tmp_path, callbacks=[writer]).predict(module, datamodule=data)[0]
    name = "blob_000"  # <defect folder>_<stem>
    assert first["image_path"][0].endswith("blob/000.png")
    folder = tmp_path / "out" / "widget"
    raw = np.load(folder / f"{name}_map.npy")
    assert raw.dtype == np.float32 and raw.shape == (SIZE, SIZE)
    assert np.array_equal(raw, first["anomaly_map"][0].numpy())
    assert np.abs(png16_to_map(Image.open(folder / f"{name}_map.png")) - raw).max() <= 1 / 65535
    assert Image.open(folder / f"{name}_overlay.png").size == (SIZE, SIZE)
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 6
    assert rows[0] == "image_path,category,output,score,image_threshold,pixel_threshold,predicted_label,true_label"


def test_tf32_is_set_for_the_run_and_recorded(mvtec_root, shared_cache, tmp_path):
    module = AnomalyModule(tiny_module(shared_cache).model, tf32=True)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    seen = []

    class Probe(Callback):
        def on_test_start(self, trainer, pl_module):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

    trainer(tmp_path, callbacks=[Probe()], limit_test_batches=1).test(
        module, datamodule=MVTecDataModule(mvtec_root, image_size=SIZE, categories=["fabric"], num_workers=0)
    )
    assert seen == [(True, True)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert module.results.config["evaluation"]["precision"] == "32-true with TF32"
