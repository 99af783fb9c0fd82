"""`anovl grid`: variants x datasets as separate `anovl test` runs, one comparison table, resume."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from anovl.cli import main
from anovl.data import generate_mvtec_like
from anovl.errors import AnovlError
from anovl.grid import cell_settings, load_grid, setting_changes
from anovl.results import MEAN_ROW
from tests.test_cli import CONFIGS, TINY_MODEL


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {
        name: generate_mvtec_like(base / name, categories, n_good=2, n_defect=1, image_size=64)
        for name, categories in (("A", ("fabric", "widget")), ("B", ("widget",)))
    }


def write_grid(tmp_path, data_roots, variants=None):
    document = {
        "name": "tiny",
        "variants": variants or {"TFA": [], "TTA-text": [str(CONFIGS / "tta" / "text.yaml")]},
        "datasets": {
            name: [
                str(CONFIGS / "demo.yaml"),
                {
                    "data": {
                        "init_args": {
                            "root": str(root),
                            "categories": sorted(path.name for path in root.iterdir()),
                            "batch_size": 4,
                        }
                    }
                },
            ]
            for name, root in data_roots.items()
        },
        "args": TINY_MODEL,
        "metrics": ["pixel_auroc", "image_auroc"],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def run_grid(path, output, capfd):
    with pytest.raises(SystemExit) as exit_info:
        main(["grid", "--config", str(path), "--output", str(output)])
    captured = capfd.readouterr()
    assert exit_info.value.code == 0, captured.err
    return captured.out


@pytest.fixture(scope="module")
def grid_run(data_roots, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("grid")
    path, output = write_grid(tmp_path, data_roots), tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["grid", "--config", str(path), "--output", str(output)])
    assert exit_info.value.code == 0
    return path, output


def test_each_pair_is_its_own_run_and_one_table_compares_them(grid_run):
    _, output = grid_run
    runs = {
        (folder.parent.parent.name, folder.parent.name): json.loads((folder / "results.json").read_text())
        for folder in output.glob("*/*/version_0")
    }
    assert sorted(runs) == [("A", "TFA"), ("A", "TTA-text"), ("B", "TFA"), ("B", "TTA-text")]
    for (dataset, variant), results in runs.items():
        folder = output / dataset / variant / "version_0"
        assert results["complete"] and (folder / "grid-cell.json").is_file()
        assert results["complete"] and (folder / "config.yaml").is_file()
        assert results["label"].startswith("AnoVL-tfa" if variant == "TFA" else "AnoVL-tta-text")
        engine = yaml.safe_load((folder / "config.yaml").read_text())["engine"]
        assert engine["group"] == "tiny" and engine["variant"] == variant
    rows = list(csv.DictReader((output / "grid.csv").open()))
    assert [(row["dataset"], row["variant"], row["category"]) for row in rows] == [
        ("A", "TFA", "fabric"),
        ("A", "TFA", "widget"),
        ("A", "TFA", MEAN_ROW),
        ("A", "TTA-text", "fabric"),
        ("A", "TTA-text", "widget"),
        ("A", "TTA-text", MEAN_ROW),
        ("B", "TFA", "widget"),
        ("B", "TFA", MEAN_ROW),
        ("B", "TTA-text", "widget"),
        ("B", "TTA-text", MEAN_ROW),
    ]
    for row in rows:
        results = runs[row["dataset"], row["variant"]]
        expected = (
            results["mean"]
            if row["category"] == MEAN_ROW
            else next(record for record in results["categories"] if record["category"] == row["category"])
        )
        assert float(row["pixel_auroc"]) == pytest.approx(expected["pixel_auroc"])
        assert row["label"] == results["label"]
    markdown = (output / "grid.md").read_text()
    tfa, tta = runs["B", "TFA"]["mean"]["pixel_auroc"], runs["B", "TTA-text"]["mean"]["pixel_auroc"]
    assert "## B" in markdown and "| category | TFA | TTA-text |" in markdown
    assert f"| **{MEAN_ROW}** | **{tfa:.1f}** | **{tta:.1f} ({tta - tfa:+.1f})** |" in markdown


def test_grid_resumes_finished_and_interrupted_runs(grid_run, capfd):
    path, output = grid_run
    interrupted = output / "A" / "TTA-text" / "version_0"
    results = json.loads((interrupted / "results.json").read_text())
    finished_fabric = results["categories"][0]
    results["complete"], results["categories"] = False, results["categories"][:1]  # killed after fabric
    (interrupted / "results.json").write_text(json.dumps(results))
    untouched = (output / "B" / "TFA" / "version_0" / "results.json").stat().st_mtime_ns
    out = run_grid(path, output, capfd)
    assert "A × TFA: finished" in out and "A × TTA-text: interrupted -> test" in out and "--resume" in out
    assert (output / "B" / "TFA" / "version_0" / "results.json").stat().st_mtime_ns == untouched
    resumed = json.loads((interrupted / "results.json").read_text())
    assert resumed["complete"] and [row["category"] for row in resumed["categories"]] == ["fabric", "widget"]
    assert resumed["categories"][0] == finished_fabric  # kept, not run again


def test_grid_dry_run_and_bad_grid_files(grid_run, tmp_path, capfd):
    path, output = grid_run
    with pytest.raises(SystemExit) as exit_info:
        main(["grid", "--config", str(path), "--output", str(tmp_path / "new"), "--dry_run"])
    assert exit_info.value.code == 0 and not (tmp_path / "new").exists()
    assert capfd.readouterr().out.count(": new -> test") == 4
    bad = tmp_path / "bad.yaml"
    for document, message in [
        ({"variants": {"x": []}}, "'datasets' must map names"),
        ({"variants": {"x": ["missing.yaml"]}, "datasets": {"d": []}}, "missing.yaml not found"),
        ({"variants": {"a/b": []}, "datasets": {"d": []}}, "without '/'"),
        ({"variants": {"x": []}, "datasets": {"d": []}, "extra": 1}, "unknown keys"),
    ]:
        bad.write_text(yaml.safe_dump(document))
        with pytest.raises(SystemExit) as exit_info:
            main(["grid", "--config", str(bad)])
        err = capfd.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("anovl: error:") and message in err
        assert len(err.splitlines()) == 1


def test_shipped_grid_config_names_the_four_variants_and_two_datasets():
    grid = load_grid(CONFIGS / "grid.yaml", None)
    assert grid.variants == ["TFA", "TTA-text", "TTA-lowrank", "WinCLIP"] and grid.datasets == ["MVTec", "VisA"]
    cells = {(cell.dataset, cell.variant): cell for cell in grid.cells}
    assert cells["VisA", "TTA-lowrank"].configs == [str(CONFIGS / "visa.yaml"), str(CONFIGS / "tta" / "lowrank.yaml")]
    winclip = yaml.safe_load(cells["VisA", "WinCLIP"].configs[-1])
    assert winclip["model"]["class_path"] == "anovl.models.winclip.WinCLIP" and "data" not in winclip
    assert str(cells["MVTec", "TFA"].base) == "runs/grid/variants/MVTec/TFA"


def test_a_changed_cell_runs_again_into_a_new_version(data_roots, tmp_path, capfd):
    """A grid run, a change in one variant's config, and a rerun: only that cell runs again, into version_1;
    the table shows its new numbers; version_0 stays as it was."""
    lowrank = tmp_path / "lowrank.yaml"
    lowrank.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "init_args": {"tta": {"adapter": "lowrank", "steps": 1, "lr": 0.5, "adapter_args": {"rank": 2}}}
                }
            }
        )
    )
    path = write_grid(tmp_path, {"B": data_roots["B"]}, variants={"TFA": [], "TTA-lowrank": [str(lowrank)]})
    output = tmp_path / "out"
    run_grid(path, output, capfd)
    first = json.loads((output / "B" / "TTA-lowrank" / "version_0" / "results.json").read_text())
    tfa_mtime = (output / "B" / "TFA" / "version_0" / "results.json").stat().st_mtime_ns
    lowrank.write_text(lowrank.read_text().replace("rank: 2", "rank: 4"))
    with pytest.raises(SystemExit):
        main(["grid", "--config", str(path), "--output", str(output), "--dry_run"])
    out = capfd.readouterr().out
    assert "B × TFA: finished" in out and "B × TTA-lowrank: changed: rank 2 → 4 -> test" in out
    assert not (output / "B" / "TTA-lowrank" / "version_1").exists()  # a dry run runs and writes nothing
    out = run_grid(path, output, capfd)
    assert "B × TFA: finished" in out and "changed: rank 2 → 4" in out
    assert (output / "B" / "TFA" / "version_0" / "results.json").stat().st_mtime_ns == tfa_mtime
    assert not (output / "B" / "TFA" / "version_1").exists()
    # The old result stays; the new one is what the table shows.
    assert json.loads((output / "B" / "TTA-lowrank" / "version_0" / "results.json").read_text()) == first
    second = json.loads((output / "B" / "TTA-lowrank" / "version_1" / "results.json").read_text())
    assert "rank=4" in second["label"] and "rank=2" in first["label"]
    rows = [row for row in csv.DictReader((output / "grid.csv").open()) if row["variant"] == "TTA-lowrank"]
    assert {row["label"] for row in rows} == {second["label"]}
    mean = next(row for row in rows if row["category"] == MEAN_ROW)
    assert float(mean["pixel_auroc"]) == pytest.approx(second["mean"]["pixel_auroc"])
    # Back to rank 2: version_0 matches again and nothing runs.
    lowrank.write_text(lowrank.read_text().replace("rank: 4", "rank: 2"))
    out = run_grid(path, output, capfd)
    assert "B × TTA-lowrank: finished" in out and not (output / "B" / "TTA-lowrank" / "version_2").exists()
    assert {
        row["label"] for row in csv.DictReader((output / "grid.csv").open()) if row["variant"] == "TTA-lowrank"
    } == {first["label"]}


def test_cell_settings_leave_out_runtime_options_and_hash_plugins(tmp_path):
    plugin = tmp_path / "plugin.py"
    plugin.write_text("X = 1\n")
    config = {
        "model": {"class_path": "m.M", "init_args": {"hidden": 32, "cache_dir": "/a"}},
        "data": {"class_path": "d.D", "init_args": {"root": "/data", "batch_size": 8, "num_workers": 2}},
        "trainer": {"precision": "32-true", "devices": 1},
        "engine": {"cflow_pro": False},
        "seed_everything": 0,
    }
    settings = cell_settings(config, [str(plugin)])
    faster = json.loads(json.dumps(config))
    faster["data"]["init_args"].update(batch_size=1, num_workers=0)
    faster["model"]["init_args"]["cache_dir"] = "/b"
    faster["trainer"]["devices"] = 4
    assert cell_settings(faster, [str(plugin)]) == settings
    changed = json.loads(json.dumps(config))
    changed["model"]["init_args"]["hidden"] = 64
    changed["trainer"]["precision"] = "bf16-mixed"
    assert setting_changes(settings, cell_settings(changed, [str(plugin)])) == [
        "hidden 32 → 64",
        "precision 32-true → bf16-mixed",
    ]
    plugin.write_text("X = 2\n")
    assert setting_changes(settings, cell_settings(config, [str(plugin)])) == [f"plugin {plugin} edited"]
    edited = cell_settings(config, [str(plugin)])
    assert setting_changes(edited, cell_settings(config, [str(plugin), "json"])) == ["plugin json added"]


def test_a_variant_given_inline_imports_its_plugins(data_roots, tmp_path):
    """A variant whose inline mapping names a plugin and its class: the grid resolves it (the plugin imported
    first), as the `anovl test` of the cell does."""
    patch_norm = CONFIGS.parent / "examples" / "plugins" / "patch_norm.py"
    variant = {
        "plugins": [str(patch_norm)],
        "model": {"class_path": "patch_norm.PatchNorm", "init_args": {"backbone": "anovl-tiny-vit"}},
    }
    path = write_grid(tmp_path, {"B": data_roots["B"]}, variants={"PatchNorm": [variant]})
    document = yaml.safe_load(path.read_text())
    document["args"] = []  # the tiny model's options include AnoVL's num_views, which PatchNorm does not take
    path.write_text(yaml.safe_dump(document))
    # In a process of its own: the plugin's import and registration must not leak into other tests.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "anovl.cli",
            "grid",
            "--config",
            str(path),
            "--output",
            str(tmp_path / "out"),
            "--dry_run",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "B × PatchNorm: new -> test" in result.stdout and "patch_norm.PatchNorm" in result.stdout
