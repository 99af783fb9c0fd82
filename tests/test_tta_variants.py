"""TTA variants from their configs under `anovl test`, W&B run naming by variant, `anovl compare`."""

import json
from pathlib import Path

import pytest

from anovl.cli import AnovlCLI, main
from anovl.data import generate_mvtec_like
from tests.test_cli import CONFIGS, TINY_MODEL

VARIANT_CONFIGS = {
    "text.yaml": "tta-text",
    "linear.yaml": "tta-linear",
    "lowrank.yaml": "tta-lowrank",
    "image_corruption.yaml": "tta-text-image-corruption",
    "tfa_threshold.yaml": "tta-text-tfa_threshold",
    "reference.yaml": "tta-text-reference-mode",
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return generate_mvtec_like(tmp_path_factory.mktemp("data"), ("fabric", "widget"), n_good=2, n_defect=1,
                               image_size=64)


def run_test(data_root: Path, save_dir: Path, *extra: str) -> dict:
    main(["test", "--config", str(CONFIGS / "demo.yaml"), *extra, *TINY_MODEL,
          "--data.init_args.root", str(data_root), "--data.init_args.batch_size", "4",
          "--trainer.logger.init_args.save_dir", str(save_dir)])
    (results,) = save_dir.glob("demo/*/results.json")
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def tfa_results(data_root, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("tfa")
    return save_dir, run_test(data_root, save_dir)


def test_configs_cover_every_adapter_and_option():
    assert sorted(p.name for p in (CONFIGS / "tta").glob("*.yaml")) == sorted(VARIANT_CONFIGS)


@pytest.mark.parametrize("config, variant", VARIANT_CONFIGS.items())
def test_each_variant_runs_from_its_config(config, variant, data_root, tfa_results, tmp_path):
    results = run_test(data_root, tmp_path, "--config", str(CONFIGS / "tta" / config))
    tfa = tfa_results[1]
    assert results["variant"] == variant and tfa["variant"] == "tfa"
    assert results["complete"] and [row["category"] for row in results["categories"]] == ["fabric", "widget"]
    # TTA changes the maps, never the image score (METHOD §5).
    assert results["mean"]["image_auroc"] == tfa["mean"]["image_auroc"]
    assert results["mean"]["pixel_auroc"] != tfa["mean"]["pixel_auroc"]


def test_wandb_runs_are_named_grouped_and_tagged_by_variant(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = AnovlCLI(args=["--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "wandb.yaml"),
                         "--config", str(CONFIGS / "tta" / "lowrank.yaml"), *TINY_MODEL,
                         "--data.init_args.root", str(tmp_path / "data"),
                         "--trainer.logger.init_args.offline", "true"], run=False)
    logger = cli.config.trainer.logger.init_args
    assert logger.name == "syntheticmvtec-tta-lowrank" and logger.group == "tta-lowrank"
    assert {"tta-lowrank", "syntheticmvtec", "anovl-tiny-vit"} <= set(logger.tags)
    assert cli.trainer.logger._wandb_init["group"] == "tta-lowrank"


def test_compare_puts_variants_side_by_side(data_root, tfa_results, tmp_path, capsys):
    tta_results = run_test(data_root, tmp_path / "tta", "--config", str(CONFIGS / "tta" / "text.yaml"))
    (tta_dir,) = (tmp_path / "tta").glob("demo/*")
    (tfa_dir,) = tfa_results[0].glob("demo/*")
    output = tmp_path / "comparison.md"
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(tfa_dir), str(tta_dir), "--metrics", "pixel_auroc", "--output", str(output)])
    assert exit_info.value.code == 0
    table = output.read_text()
    assert "| category | tfa | tta-text |" in table
    tfa_mean, tta_mean = tfa_results[1]["mean"]["pixel_auroc"], tta_results["mean"]["pixel_auroc"]
    assert f"| mean | {tfa_mean:.1f} | {tta_mean:.1f} ({tta_mean - tfa_mean:+.1f}) |" in table
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
