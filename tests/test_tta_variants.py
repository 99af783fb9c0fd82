"""TTA variants from their configs under `anovl test`, labels and W&B run naming by label, `anovl compare`."""

import hashlib
import json
from pathlib import Path

import pytest

from anovl.cli import AnovlCLI, main
from anovl.data import generate_mvtec_like
from anovl.engine.engine import name_wandb_run
from anovl.io import markdown_cell
from tests.test_cli import CONFIGS, TINY_MODEL

# The label's variant and the settings that differ from the reference TTA of that adapter.
VARIANT_CONFIGS = {
    "text.yaml": ("AnoVL-tta-text", []),
    "linear.yaml": ("AnoVL-tta-linear", []),
    "lowrank.yaml": ("AnoVL-tta-lowrank", ["lr=0.01", "rank=16"]),
    "image_corruption.yaml": ("AnoVL-tta-text", ["corruption=image"]),
    "tfa_threshold.yaml": ("AnoVL-tta-text", ["pseudo_labels=tfa_threshold"]),
    "reference.yaml": ("AnoVL-tta-text", ["mode=reference"]),
    "visa_reference.yaml": ("AnoVL-tta-linear", ["mode=reference"]),
}
# What the tiny demo model differs in from the reference backbone, in every label of this module.
TINY_DIFFERENCES = ["backbone=anovl-tiny-vit", "image_size=64", "num_views=2", "pretrained=None"]


def label_parts(label: str) -> tuple[str, set[str]]:
    variant, _, settings = label.partition("[")
    return variant, set(settings.rstrip("]").split(";"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return generate_mvtec_like(
        tmp_path_factory.mktemp("data"), ("fabric", "widget"), n_good=2, n_defect=1, image_size=64
    )


def run_test(data_root: Path, save_dir: Path, *extra: str) -> dict:
    main(
        [
            "test",
            "--config",
            str(CONFIGS / "demo.yaml"),
            *extra,
            *TINY_MODEL,
            "--data.init_args.root",
            str(data_root),
            "--data.init_args.batch_size",
            "4",
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
        ]
    )
    (results,) = save_dir.glob("demo/*/results.json")
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def tfa_results(data_root, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("tfa")
    return save_dir, run_test(data_root, save_dir)


def test_configs_cover_every_adapter_and_option():
    assert sorted(p.name for p in (CONFIGS / "tta").glob("*.yaml")) == sorted(VARIANT_CONFIGS)


@pytest.mark.parametrize("config, expected", VARIANT_CONFIGS.items())
def test_each_variant_runs_from_its_config(config, expected, data_root, tfa_results, tmp_path):
    results = run_test(data_root, tmp_path, "--config", str(CONFIGS / "tta" / config))
    tfa = tfa_results[1]
    variant, differences = expected
    assert label_parts(results["label"]) == (variant, {*TINY_DIFFERENCES, "init_seed=0", *differences})
    assert label_parts(tfa["label"]) == ("AnoVL-tfa", {*TINY_DIFFERENCES, "init_seed=0"})
    assert results["complete"] and [row["category"] for row in results["categories"]] == ["fabric", "widget"]
    # TTA changes the maps, never the image score (docs/METHOD.md §5).
    assert results["mean"]["image_auroc"] == tfa["mean"]["image_auroc"]
    assert results["mean"]["pixel_auroc"] != tfa["mean"]["pixel_auroc"]


def test_every_variant_gets_its_own_label():
    settings = [(variant, frozenset(differences)) for variant, differences in VARIANT_CONFIGS.values()]
    assert len(set(settings)) == len(settings)


def wandb_init(tmp_path, *extra):
    cli = AnovlCLI(
        args=[
            "--config",
            str(CONFIGS / "demo.yaml"),
            "--config",
            str(CONFIGS / "wandb.yaml"),
            *extra,
            *TINY_MODEL,
            "--data.init_args.root",
            str(tmp_path / "data"),
            "--trainer.logger.init_args.offline",
            "true",
        ],
        run=False,
    )
    return cli.model.label, cli.trainer.logger._wandb_init


def test_wandb_runs_are_named_by_variant_grouped_by_experiment_and_tagged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    label, init = wandb_init(tmp_path, "--config", str(CONFIGS / "tta" / "lowrank.yaml"))
    assert label.startswith("AnoVL-tta-lowrank[")
    # Short: dataset, method, variant; grouped by the experiment (the first config file, demo.yaml).
    assert init["name"] == "syntheticmvtec-AnoVL-tta-lowrank" and init["group"] == "demo"
    # The full label is a tag too, shortened with a hash of it where W&B's 64 characters are too few.
    label_tag = label if len(label) <= 64 else label[:55] + "#" + hashlib.sha256(label.encode()).hexdigest()[:8]
    assert set(init["tags"]) == {
        "AnoVL",
        "tta-lowrank",
        "syntheticmvtec",
        "anovl-tiny-vit",
        "random-weights",
        label_tag,
    }
    # Rank 4 and rank 16 are variants of one experiment: one group, told apart by their label tags.
    rank_4, init_4 = wandb_init(
        tmp_path, "--config", str(CONFIGS / "tta" / "lowrank.yaml"), "--model.init_args.tta.adapter_args", "{rank: 4}"
    )
    assert "rank=4" in rank_4 and init_4["group"] == init["group"] and init_4["name"] == init["name"]
    assert set(init_4["tags"]) - set(init["tags"])  # the label tags differ
    # A grid's (or the user's) variant key, group and version.
    long_label = "x" * 80
    cli = AnovlCLI(
        args=[
            "--config",
            str(CONFIGS / "demo.yaml"),
            "--config",
            str(CONFIGS / "wandb.yaml"),
            *TINY_MODEL,
            "--data.init_args.root",
            str(tmp_path / "data"),
            "--engine.variant",
            "TTA-r4",
            "--engine.group",
            "sweep",
            "--engine.label",
            long_label,
        ],
        run=False,
    )
    init_grid = cli.trainer.logger._wandb_init
    assert init_grid["name"] == "syntheticmvtec-AnoVL-TTA-r4" and init_grid["group"] == "sweep"
    init_grid["name"] = None
    name_wandb_run(cli.trainer, cli.model, "syntheticmvtec", tmp_path / "grid" / "version_3")  # a grid cell's folder
    assert init_grid["name"] == "syntheticmvtec-AnoVL-TTA-r4-v3"
    assert {"TTA-r4", "x" * 55 + "#" + hashlib.sha256(long_label.encode()).hexdigest()[:8]} <= set(init_grid["tags"])
    assert all(len(tag) <= 64 for tag in init_grid["tags"])
    _, user_init = wandb_init(tmp_path, "--trainer.logger.init_args.name", "mine")
    assert user_init["name"] == "mine"


def test_compare_puts_variants_side_by_side(data_root, tfa_results, tmp_path, capsys):
    tta_results = run_test(data_root, tmp_path / "tta", "--config", str(CONFIGS / "tta" / "text.yaml"))
    (tta_dir,) = (tmp_path / "tta").glob("demo/*")
    (tfa_dir,) = tfa_results[0].glob("demo/*")
    output = tmp_path / "comparison.md"
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(tfa_dir), str(tta_dir), "--metrics", "pixel_auroc", "--output", str(output)])
    assert exit_info.value.code == 0
    table = output.read_text()
    # Labels are shown literally: their brackets are escaped so that Markdown never reads them as links.
    labels = [markdown_cell(tfa_results[1]["label"]), markdown_cell(tta_results["label"])]
    assert "\\[" in labels[1] and f"| category | {labels[0]} | {labels[1]} |" in table
    tfa_mean, tta_mean = tfa_results[1]["mean"]["pixel_auroc"], tta_results["mean"]["pixel_auroc"]
    assert (
        f"| **mean (all categories)** | **{tfa_mean:.1f}** | **{tta_mean:.1f} ({tta_mean - tfa_mean:+.1f})** |" in table
    )
    assert "random weights" in capsys.readouterr().out


def test_compare_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    for target in (tmp_path / "missing", tmp_path / "bad"):
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", str(target)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("anovl: error:") and len(err.splitlines()) == 1
