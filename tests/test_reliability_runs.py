"""Interrupted runs and determinism: `anovl test --resume` after a SIGKILL gives the table of an uninterrupted
run; the same seed gives the same table; TTA's results do not depend on batch size, data order or DDP."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from anovl import TTAConfig
from anovl.cli import main
from anovl.data import MVTecDataModule, collate_batch, generate_mvtec_like
from anovl.results import METRIC_TITLES, ResultsTable
from tests.test_cli import CONFIGS, cli_env, data_root, demo_test_args, run_dir  # noqa: F401 (fixtures)
from tests.test_cli import anovl as run_console_script
from tests.test_lightning import tiny_module, trainer
from tests.test_reliability_input import (
    _cli_in_process,
    assert_one_error_line,
    cli_args,  # noqa: F401 (fixtures)
    prepare_in_process_cli,
    run_main,
    text_cache,
)

TEXT_TTA = CONFIGS / "tta" / "text.yaml"
REFERENCE_TTA = CONFIGS / "tta" / "reference.yaml"
RESULT_FILES = ("results.json", "results.csv", "results.md")


@pytest.fixture(scope="module")
def three_categories(tmp_path_factory):
    """Three categories of 12 images: enough work per category for a kill to land between categories."""
    return generate_mvtec_like(
        tmp_path_factory.mktemp("three"), ("fabric", "washer", "widget"), n_good=4, n_defect=2, image_size=64
    )


def slow_args(root, save_dir):
    return cli_args(root, save_dir, "--model.init_args.num_views", "22")


def in_process_run(args, text_cache) -> None:  # noqa: F811
    """`anovl` in this process, for module-scoped fixtures (which cannot use the function-scoped monkeypatch)."""
    with pytest.MonkeyPatch.context() as patch:
        prepare_in_process_cli(patch, text_cache)
        main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def reference_run(three_categories, text_cache, tmp_path_factory):  # noqa: F811
    """The uninterrupted run that a killed and resumed one must reproduce."""
    save_dir = tmp_path_factory.mktemp("uninterrupted")
    in_process_run(slow_args(three_categories, save_dir), text_cache)
    (directory,) = (save_dir / "anovl").iterdir()
    return directory


def wait_for_file(folder: Path, pattern: str, process: subprocess.Popen, timeout: float = 120) -> Path:
    """The first file below ``folder`` matching ``pattern``, polled while ``process`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = next(folder.glob(pattern), None)
        if found is not None:
            return found
        assert process.poll() is None, "the run ended before writing any results"
        time.sleep(0.02)
    raise AssertionError(f"no {pattern} after {timeout} s")


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_resume_after_a_stop_signal_gives_the_uninterrupted_table(
    stop_signal, three_categories, reference_run, tmp_path, capsys, cli_env
):  # noqa: F811
    save_dir = tmp_path / "runs"
    args = slow_args(three_categories, save_dir)
    process = subprocess.Popen(
        [sys.executable, "-m", "anovl.cli", *map(str, args)],
        env=cli_env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        results = wait_for_file(save_dir, "anovl/*/results.json", process)  # written when a category finishes
        sent = time.monotonic()
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    if stop_signal != signal.SIGKILL:
        # Stopped promptly, and never an exit status that a scheduler would take for success.
        assert time.monotonic() - sent < 30
        assert process.returncode == 128 + stop_signal, stderr
        assert f"stopped by {stop_signal.name}" in stderr and "--resume" in stderr
    run = results.parent
    partial = json.loads(results.read_text())
    assert partial["complete"] is False, "the run finished before it was killed; give it more work"
    finished = [row["category"] for row in partial["categories"]]

    # A damaged image in a finished category: the resumed run must not load that category again.
    image = three_categories / finished[0] / "test" / "good" / "000.png"
    original = image.read_bytes()
    image.write_bytes(b"damaged")
    try:
        status, _, stderr = run_main([*args, "--resume", run], capsys)
    finally:
        image.write_bytes(original)
    assert status == 0, stderr
    for name in RESULT_FILES:
        assert (run / name).read_text() == (reference_run / name).read_text(), name
    assert [path.name for path in (save_dir / "anovl").iterdir()] == [run.name]  # continued in place
    assert not (run / "metrics.csv").exists()  # results.csv (compared above) is the CSV run's one table


def test_resume_of_a_finished_run_prints_its_table_and_runs_nothing(
    three_categories, reference_run, tmp_path, capsys, monkeypatch
):
    run = Path(shutil.copytree(reference_run, tmp_path / "anovl" / "version_0"))
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}

    def no_test(*args, **kwargs):
        raise AssertionError("Trainer.test ran although every category was finished")

    monkeypatch.setattr(Trainer, "test", no_test)
    status, stdout, stderr = run_main([*slow_args(three_categories, tmp_path), "--resume", run], capsys)
    assert status == 0, stderr
    assert all(category in stdout for category in ("fabric", "washer", "widget", "mean"))
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


def test_results_json_reads_back_into_the_same_table(tmp_path):
    # What --resume builds on: values (NaN included), counts, configuration record and skipped files survive.
    metrics = {name: value for name, value in zip(METRIC_TITLES, (0.9, 0.123456789, math.nan, 0.5, 1.0, 0.25, 0.75))}
    table = ResultsTable(
        tmp_path,
        "a run",
        True,
        3,
        "tta-text",
        config={"model": {"num_views": 22}},
        skipped_files=["Cannot read image x.png (...)"],
    )
    table.add("bottle", metrics, 10)
    table.add("cable", {**metrics, "image_auroc": math.nan}, 4)
    read = ResultsTable.read(tmp_path)
    # Only "complete" differs: how many categories a run has is the datamodule's to say, not the file's.
    assert {**json.loads(read.to_json()), "complete": False} == json.loads(table.to_json())
    assert read.image_counts == {"bottle": 10, "cable": 4} and math.isnan(read.rows["cable"]["image_auroc"])
    continued = ResultsTable(None, "a run", True, 3, "tta-text", config=read.config)
    continued.include(read)
    continued.add("carpet", metrics, 2)
    assert list(continued.rows) == ["bottle", "cable", "carpet"] and continued.complete
    assert continued.skipped_files == table.skipped_files


def drop_config_record(run: Path) -> None:
    document = json.loads((run / "results.json").read_text())
    del document["config"]
    (run / "results.json").write_text(json.dumps(document))


# (extra arguments, change to the copied run folder, fragments of the error line)
RESUME_REFUSALS = {
    "other-num-views": (
        ["--model.init_args.num_views", "2"],
        None,
        ["model.num_views: 22 in the run, 2 now", "config.yaml --resume"],
    ),
    "tta-added": (["--config", TEXT_TTA], None, ["model.tta: null in the run, {{"]),
    "other-data-root": (
        ["--data.init_args.root", "{tmp}/moved"],
        None,
        ["data.locations:", '{{"root": "{tmp}/moved"}} now'],
    ),
    "reference-mode-tta": (
        ["--config", REFERENCE_TTA],
        None,
        ["cannot be resumed", "tta.mode 'reference'", "run it again from the start"],
    ),
    "no-results": (
        [],
        lambda run: (run / "results.json").unlink(),
        ["results.json not found", "start a new run without --resume"],
    ),
    "no-config-record": ([], drop_config_record, ["has no record of the run's configuration"]),
    "not-a-results-file": (
        [],
        lambda run: (run / "results.json").write_text("{"),
        ["results.json", "not a results file"],
    ),
}


@pytest.mark.parametrize("case", RESUME_REFUSALS)
def test_resume_refuses_what_would_give_another_table(case, three_categories, reference_run, tmp_path, capsys):
    shutil.copytree(three_categories, tmp_path / "moved")
    run = Path(shutil.copytree(reference_run, tmp_path / "anovl" / "version_0"))
    extra, change, fragments = RESUME_REFUSALS[case]
    if change is not None:
        change(run)
    extra = [str(arg).format(tmp=tmp_path) for arg in extra]
    status, _, stderr = run_main([*slow_args(three_categories, tmp_path), *extra, "--resume", run], capsys)
    assert_one_error_line(status, stderr, *(fragment.format(tmp=tmp_path) for fragment in fragments))


# ---------------------------------------------------------------- determinism


def test_the_same_seed_gives_the_same_table(data_root, text_cache, tmp_path):  # noqa: F811
    # Reference-mode TTA draws from the global RNG, so only the fixed seed makes it repeatable.
    documents = []
    for attempt, seed in (("first", 0), ("second", 0), ("other-seed", 1)):
        in_process_run(
            [*demo_test_args(data_root, tmp_path / attempt), "--config", REFERENCE_TTA, "--seed_everything", seed],
            text_cache,
        )
        documents.append(json.loads((run_dir(tmp_path / attempt) / "results.json").read_text()))
    assert documents[0] == documents[1]
    assert documents[2]["categories"] != documents[0]["categories"]
    assert documents[0]["label"].startswith("AnoVL-tta-text[") and "mode=reference" in documents[0]["label"]


def test_tta_maps_do_not_depend_on_batch_size_or_order(data_root, text_cache, tmp_path):  # noqa: F811
    module = tiny_module(text_cache, tta=TTAConfig())
    data = MVTecDataModule(data_root, image_size=64, batch_size=1)
    reversed_in_fours = DataLoader(
        data.dataset, batch_size=4, sampler=list(reversed(range(len(data.dataset)))), collate_fn=collate_batch
    )  # batches that also mix categories

    def per_image(**data_source):
        outputs = trainer(tmp_path).predict(module, **data_source)
        return {
            path: (output["anomaly_map"][index], output["pred_score"][index])
            for output in outputs
            for index, path in enumerate(output["image_path"])
        }

    one_by_one, reordered = per_image(datamodule=data), per_image(dataloaders=reversed_in_fours)
    assert list(reordered) == list(reversed(one_by_one))
    for path, (anomaly_map, score) in one_by_one.items():
        # Batched matrix products may round differently; everything else is the same computation.
        torch.testing.assert_close(reordered[path][0], anomaly_map, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reordered[path][1], score, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def single_process_tta_run(data_root, text_cache, tmp_path_factory):  # noqa: F811
    save_dir = tmp_path_factory.mktemp("tta-single")
    in_process_run([*demo_test_args(data_root, save_dir), "--config", TEXT_TTA], text_cache)
    return run_dir(save_dir)


def test_ddp_with_tta_gives_the_single_process_table(single_process_tta_run, data_root, tmp_path, cli_env):  # noqa: F811
    result = run_console_script(
        [
            *demo_test_args(data_root, tmp_path),
            "--config",
            TEXT_TTA,
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
        ],
        cli_env,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    single = json.loads((single_process_tta_run / "results.json").read_text())
    distributed = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert distributed["label"] == single["label"] and distributed["label"].startswith("AnoVL-tta-text")
    assert distributed["categories"] == single["categories"]  # 13 images: one padding copy left out
    assert distributed["mean"] == single["mean"]


def test_a_failure_in_the_next_category_keeps_the_finished_rows(three_categories, tmp_path, capsys):
    root = Path(shutil.copytree(three_categories, tmp_path / "data"))
    (root / "washer" / "test" / "good" / "001.png").write_bytes(b"damaged")  # fails while washer is read
    status, _, stderr = run_main(cli_args(root, tmp_path / "runs", "--data.init_args.batch_size", "3"), capsys)
    assert_one_error_line(status, stderr, "Cannot read image", "washer")
    (results,) = (tmp_path / "runs").glob("anovl/*/results.json")
    document = json.loads(results.read_text())  # still valid JSON, written before the failure
    assert [row["category"] for row in document["categories"]] == ["fabric"] and document["complete"] is False


def test_predict_stops_on_sigterm_with_a_failure_status(three_categories, tmp_path, cli_env):  # noqa: F811
    output = tmp_path / "out"
    args = [
        "predict",
        "--config",
        CONFIGS / "demo.yaml",
        "--data",
        "anovl.data.MVTecDataModule",
        "--data.init_args.root",
        three_categories,
        "--data.init_args.batch_size",
        "1",
        "--model.init_args.backbone",
        "anovl-tiny-vit",
        "--model.init_args.image_size",
        "64",
        "--model.init_args.num_views",
        "22",
        "--trainer.enable_progress_bar",
        "false",
        "--predictions.output_dir",
        output,
        "--trainer.logger.init_args.save_dir",
        tmp_path / "runs",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "anovl.cli", *map(str, args)],
        env=cli_env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_file(output, "*/*_map.npy", process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr
    written = len(list(output.glob("*/*_map.npy")))
    assert 0 < written < 36  # stopped before the end; what was written stays
