"""The VisA reference run (docs/METHOD.md §8) against a naive restatement of §8 (tests/reference/visa.py): one
image at a time, two tiles cut and stitched by hand, the tiles' logits upsampled and stitched before the
softmax, one linear adapter per image shared by its tiles. Only the encoder and the text embeddings come from anovl.
Also: the other tile settings differ, the generic module hands AnoVL whole wide images (DDP padding and batch
splitting included), and a run with one tile setting cannot be resumed with the other."""

import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, DistributedSampler

from anovl import AnoVL, AnovlError, TTAConfig
from anovl.data import VisADataModule, collate_batch, generate_visa_like
from anovl.data.transforms import prepare_batch
from anovl.engine import AnomalyModule
from tests.conftest import TINY
from tests.reference.visa import naive_independent_tta, naive_reference_tta, naive_tfa
from tests.test_cli import CONFIGS, TINY_MODEL
from tests.test_lightning import trainer
from tests.test_reliability_input import (
    _cli_in_process,
    assert_one_error_line,  # noqa: F401 (fixtures)
    run_main,
    text_cache,
)

S = 64
WIDTHS = (96, 112)  # diff = 32 and 48: overlaps of half and a quarter of a tile
CATEGORY = "macaroni1"
TOLERANCE = {"rtol": 1e-5, "atol": 2e-6}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny(text_cache, **kwargs) -> AnoVL:  # noqa: F811
    return AnoVL(TINY, pretrained=None, image_size=S, cache_dir=str(text_cache), **kwargs)


def wide_images(width: int, count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, S, width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the comparisons


@pytest.fixture(scope="module")
def tfa_model(text_cache):  # noqa: F811
    return tiny(text_cache)


@pytest.mark.parametrize("width", WIDTHS)
def test_training_free_maps_and_scores_equal_the_naive_run(tfa_model, text_cache, width):  # noqa: F811
    images = wide_images(width, 2, seed=width)
    output = tfa_model(images, [CATEGORY] * 2)
    assert output.anomaly_map.shape == (2, S, width)
    for index, image in enumerate(images):
        anomaly_map, score, tokens, _ = naive_tfa(tfa_model, image, CATEGORY)
        torch.testing.assert_close(output.anomaly_map[index], anomaly_map, **TOLERANCE)
        torch.testing.assert_close(output.pred_score[index], score, **TOLERANCE)
        torch.testing.assert_close(output.patch_tokens[0][index], tokens.flatten(0, 1), **TOLERANCE)
    # The 22 views of the reference MVTec score would change the score; the map stays.
    with_views = tiny(text_cache, wide_images="separate-tiles", num_views=22)(images, [CATEGORY] * 2)
    torch.testing.assert_close(with_views.anomaly_map, output.anomaly_map, **TOLERANCE)
    assert (with_views.pred_score - output.pred_score).abs().min() > 1e-4


@pytest.fixture(scope="module")
def reference_tta_model(text_cache):  # noqa: F811
    return tiny(text_cache, tta=TTAConfig(adapter="linear", mode="reference"))


def test_reference_mode_tta_equals_the_authors_loop_across_widths(reference_tta_model):
    # One category: two 64×96 images in one batch, then a 64×112 one; the AdamW state carries over all three.
    batches = [wide_images(96, 2, seed=1), wide_images(112, 1, seed=2)]
    reference_tta_model.start_category(CATEGORY)
    torch.manual_seed(7)
    outputs = [reference_tta_model(batch, [CATEGORY] * len(batch)) for batch in batches]
    expected = naive_reference_tta(
        reference_tta_model, [image for batch in batches for image in batch], CATEGORY, seed=7
    )
    got = [anomaly_map for output in outputs for anomaly_map in output.anomaly_map]
    for got_map, expected_map in zip(got, expected, strict=True):
        torch.testing.assert_close(got_map, expected_map, **TOLERANCE)
    for output, batch in zip(outputs, batches):
        for index, image in enumerate(batch):
            tfa_map, score, _, _ = naive_tfa(reference_tta_model, image, CATEGORY)
            torch.testing.assert_close(output.tfa_map[index], tfa_map, **TOLERANCE)
            torch.testing.assert_close(output.pred_score[index], score, **TOLERANCE)  # TTA leaves the score
    assert (got[0] - outputs[0].tfa_map[0]).abs().max() > 1e-4  # it did adapt


@pytest.fixture(scope="module")
def independent_tta_model(text_cache):  # noqa: F811
    return tiny(text_cache, tta=TTAConfig(adapter="linear"))


@pytest.mark.parametrize("width", WIDTHS)
def test_independent_mode_tta_equals_the_naive_run_per_image(independent_tta_model, text_cache, width):  # noqa: F811
    images = wide_images(width, 3, seed=10 + width)
    output = independent_tta_model(images, [CATEGORY] * 3)
    naive = [naive_independent_tta(independent_tta_model, image, CATEGORY) for image in images]
    for index, expected in enumerate(naive):
        torch.testing.assert_close(output.anomaly_map[index], expected, **TOLERANCE)
        # Alone, or in another batch position: the same map.
        alone = independent_tta_model(images[index : index + 1], [CATEGORY])
        torch.testing.assert_close(alone.anomaly_map[0], output.anomaly_map[index], **TOLERANCE)
    reversed_batch = independent_tta_model(images.flip(0), [CATEGORY] * 3)
    torch.testing.assert_close(reversed_batch.anomaly_map.flip(0), output.anomaly_map, **TOLERANCE)

    # The comparison can tell per-tile adapters (each tile its own adapter and loss) from the shared one.
    assert (output.anomaly_map - output.tfa_map).abs().max() > 1e-4  # it did adapt
    per_tile = tiny(text_cache, tta=TTAConfig(adapter="linear"), wide_images="separate-tiles", num_views=1)(
        images, [CATEGORY] * 3
    )
    torch.testing.assert_close(per_tile.tfa_map, output.tfa_map, **TOLERANCE)  # the same training-free map
    torch.testing.assert_close(per_tile.pred_score, output.pred_score, **TOLERANCE)  # and score, without views
    assert (per_tile.anomaly_map - output.anomaly_map).abs().max() > 100 * TOLERANCE["atol"]


def test_the_comparison_tells_a_softmax_before_stitching(text_cache, monkeypatch):  # noqa: F811
    # A random model's normal and abnormal states are nearly parallel, so its probabilities stay near ½ where
    # the softmax is nearly linear. Orthogonal states and a larger step make the order of softmax and
    # stitching show.
    model = tiny(text_cache, tta=TTAConfig(adapter="linear", lr=0.05))
    text_embeddings = model.text_states

    def orthogonal_states(category, prompt_name=None, device="cpu"):
        embeddings = text_embeddings(category, prompt_name, device)
        normal, abnormal = embeddings.states
        abnormal = F.normalize(abnormal - (abnormal @ normal) * normal, dim=0)
        return dataclasses.replace(embeddings, states=torch.stack([normal, abnormal]))

    monkeypatch.setattr(model, "text_states", orthogonal_states)
    image = wide_images(112, 1, seed=3)
    output = model(image, [CATEGORY])
    expected = naive_independent_tta(model, image[0], CATEGORY, lr=0.05)
    torch.testing.assert_close(output.anomaly_map[0], expected, **TOLERANCE)
    softmax_first = naive_independent_tta(model, image[0], CATEGORY, lr=0.05, softmax_before_stitching=True)
    assert (softmax_first - expected).abs().max() > 100 * TOLERANCE["atol"]


# ---------------------------------------------------------------- under the generic module and the CLI


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory):
    """One category of 5 wide images (an odd count, so two DDP processes need a padded copy)."""
    return generate_visa_like(
        tmp_path_factory.mktemp("visa"), {CATEGORY: "widget"}, n_good=1, n_defect=1, image_size=(S, WIDTHS[0])
    )


class MapsPerImage(Callback):
    """The maps and scores that test_step hands to callbacks, by image path."""

    def __init__(self):
        self.outputs = {}

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        if outputs is not None:
            for path, anomaly_map, score in zip(outputs["image_path"], outputs["anomaly_map"], outputs["pred_score"]):
                self.outputs[path] = (anomaly_map, score)


class ShardedVisA(VisADataModule):
    """This process's share of the test set as DDP's sampler gives it to one of two processes (padded)."""

    def __init__(self, *args, rank: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank = rank

    def test_dataloader(self):
        sampler = DistributedSampler(self.dataset, num_replicas=2, rank=self.rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=2, sampler=sampler, collate_fn=collate_batch)


def test_the_module_hands_whole_wide_images_to_anovl(visa_root, text_cache, tmp_path):  # noqa: F811
    module = AnomalyModule(tiny(text_cache, tta=TTAConfig(adapter="linear", steps=2)))
    whole = MapsPerImage()
    trainer(tmp_path / "whole", callbacks=[whole]).test(
        module, datamodule=VisADataModule(visa_root, image_size=S, mode="tile", batch_size=3)
    )
    assert module.results.image_counts == {CATEGORY: 5} and len(whole.outputs) == 5
    dataset = VisADataModule(visa_root, image_size=S, mode="tile")
    dataset.setup("test")
    for item in map(prepare_batch, dataset.dataset):  # one at a time, straight to the model: as in batches of 3
        output = module.model(item["image"][None], [item["category"]])
        anomaly_map, score = whole.outputs[item["image_path"]]
        assert anomaly_map.shape == (S, WIDTHS[0])
        torch.testing.assert_close(anomaly_map, output.anomaly_map[0], **TOLERANCE)
        torch.testing.assert_close(score, output.pred_score[0], **TOLERANCE)

    shares = []
    for rank in (0, 1):
        share = MapsPerImage()
        sharded = AnomalyModule(tiny(text_cache, tta=TTAConfig(adapter="linear", steps=2)))
        trainer(tmp_path / str(rank), callbacks=[share]).test(
            sharded, datamodule=ShardedVisA(visa_root, image_size=S, mode="tile", rank=rank)
        )
        shares.append(share.outputs)
        assert sharded.results.image_counts == {CATEGORY: 3 - rank}  # rank 1's padded copy left out
    assert sorted([*shares[0], *shares[1]]) == sorted(whole.outputs)
    for path, (anomaly_map, score) in {**shares[0], **shares[1]}.items():
        torch.testing.assert_close(anomaly_map, whole.outputs[path][0], **TOLERANCE)
        torch.testing.assert_close(score, whole.outputs[path][1], **TOLERANCE)


def visa_cli_args(root, save_dir, *extra):
    return [
        "test",
        "--data",
        "anovl.data.VisADataModule",
        *TINY_MODEL,
        "--pictures.max_per_category",
        "0",
        "--data.init_args.root",
        root,
        "--data.init_args.mode",
        "tile",
        "--config",
        CONFIGS / "tta" / "linear.yaml",
        "--model.init_args.tta.steps",
        "1",
        "--trainer.logger.init_args.save_dir",
        save_dir,
        *extra,
    ]


@pytest.mark.parametrize(
    ("first", "then"), [("visa-reference", "separate-tiles"), ("separate-tiles", "visa-reference")]
)
def test_a_run_cannot_be_resumed_with_the_other_tile_setting(visa_root, tmp_path, capsys, first, then):
    status, _, stderr = run_main(visa_cli_args(visa_root, tmp_path, "--model.init_args.wide_images", first), capsys)
    assert status == 0, stderr
    (run,) = (tmp_path / "anovl").iterdir()
    record = json.loads((run / "results.json").read_text())
    assert record["config"]["model"]["wide_images"] == first
    assert ("wide_images=separate-tiles" in record["label"]) == (first == "separate-tiles")
    status, _, stderr = run_main(
        visa_cli_args(visa_root, tmp_path, "--model.init_args.wide_images", then, "--resume", run), capsys
    )
    assert_one_error_line(status, stderr, f'model.wide_images: "{first}" in the run, "{then}" now')


def test_an_unknown_tile_setting_is_refused(text_cache):  # noqa: F811
    with pytest.raises(AnovlError, match="wide_images must be one of"):
        tiny(text_cache, wide_images="tiles")
