"""Experiment tracking: an offline W&B run read back from its transaction log, CSV and TensorBoard runs,
config.yaml per run, metrics.csv dropped, failed runs cleaned up."""

import base64
import hashlib
import json
import struct
import zlib
from pathlib import Path

import pytest
import wandb
import yaml

from anovl.cli import main
from anovl.data import generate_mvtec_like
from anovl.results import MEAN_ROW
from tests.test_cli import CONFIGS, TINY_MODEL

FULL_CONFIG_SECTIONS = {"model", "data", "trainer", "seed_everything", "plugins", "engine", "pictures", "predictions"}


def read_wandb_log(path: Path) -> list:
    """The records of a W&B transaction log (``run-<id>.wandb``): a LevelDB-style log of 32 KiB blocks after a
    7-byte header, each record a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last) and a
    protobuf ``Record``; the CRC is checked, so a misread fails here."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is zero padding
            offset += block - offset % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if length == 0 and kind == 0:
            break
        payload = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == checksum  # CRC-32 of type and data
        pending += payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_state(records: list) -> dict:
    """Config, summary, history keys, run record and artifacts of a W&B run, as its records leave them."""
    state = {"config": {}, "summary": {}, "history": {}, "artifacts": [], "run": None}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            state["run"] = record.run
            for item in record.run.config.update:
                state["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                state["config"][item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                state["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            for item in record.history.item:
                state["history"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            state["artifacts"].append(record.artifact)
    return state


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return generate_mvtec_like(
        tmp_path_factory.mktemp("data"), ("fabric", "widget"), n_good=2, n_defect=1, image_size=64
    )


def demo(data_root, save_dir, *extra):
    main(
        [
            "test",
            "--config",
            str(CONFIGS / "demo.yaml"),
            *TINY_MODEL,
            "--data.init_args.root",
            str(data_root),
            "--data.init_args.batch_size",
            "4",
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
            *extra,
        ]
    )


TTA_VARIANTS = ("text", "lowrank", "linear")


@pytest.fixture(scope="module")
def wandb_runs(data_root, tmp_path_factory):
    """Three TTA variants with configs/wandb.yaml, offline, as a researcher compares them: per variant the run
    folder, the offline run's folder and its state read back from the transaction log."""
    runs = {}
    for variant in TTA_VARIANTS:
        save_dir = tmp_path_factory.mktemp(f"wandb-{variant}")
        demo(
            data_root,
            save_dir,
            "--config",
            str(CONFIGS / "wandb.yaml"),
            "--config",
            str(CONFIGS / "tta" / f"{variant}.yaml"),
            "--model.init_args.tta.steps",
            "1",
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
            "--trainer.logger.init_args.offline",
            "true",
        )
        wandb.teardown()  # what the end of the anovl process does: W&B's service writes out the run's log
        (run_dir,) = save_dir.glob("anovl/*")
        (log,) = save_dir.glob("wandb/offline-run-*/run-*.wandb")
        runs[variant] = run_dir, log.parent, wandb_state(read_wandb_log(log))
    return runs


@pytest.fixture(scope="module")
def wandb_run(wandb_runs):
    return wandb_runs["lowrank"]


def test_wandb_run_logs_the_full_config(wandb_run, data_root):
    run_dir, _, state = wandb_run
    config = state["config"]
    assert FULL_CONFIG_SECTIONS <= set(config)
    assert config["data"]["init_args"]["root"] == str(data_root)
    assert config["model"]["init_args"]["tta"]["adapter"] == "lowrank"
    assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert config["trainer"]["inference_mode"] is False and config["seed_everything"] == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert config["run"] == {"label": results["label"], "variant": "tta-lowrank", "group": "demo", "command": "test"}
    # The run's own config.yaml holds the same resolved config.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"] == config["model"] and saved["data"] == config["data"]


def test_wandb_variants_share_one_group_with_short_distinct_names_and_variant_tags(wandb_runs):
    labels = {}
    for variant, (run_dir, offline_dir, state) in wandb_runs.items():
        labels[variant] = label = json.loads((run_dir / "results.json").read_text())["label"]
        run = state["run"]
        # The experiment is the first config file (configs/demo.yaml): every variant run on it is in its group.
        assert run.run_group == "demo" and state["config"]["run"]["group"] == "demo"
        assert run.display_name == f"syntheticmvtec-AnoVL-tta-{variant}"
        assert set(run.tags) == {
            "syntheticmvtec",
            "AnoVL",
            f"tta-{variant}",
            "anovl-tiny-vit",
            "random-weights",
            label if len(label) <= 64 else f"{label[:55]}#{hashlib.sha256(label.encode()).hexdigest()[:8]}",
        }
        assert state["config"]["run"]["label"] == label and state["config"]["run"]["variant"] == f"tta-{variant}"
        # Metrics are summary values, not a one-point history.
        assert "mean/pixel_auroc" in state["summary"] and not any(
            "/" in key and not key.startswith("_") and "pixel" in key for key in state["history"]
        )
        table_ref = {
            key.removeprefix("results/"): value for key, value in state["summary"].items() if key.startswith("results/")
        }
        table = json.loads((offline_dir / "files" / table_ref["path"]).read_text())
        assert table["columns"][:4] == ["label", "variant", "category", "images"]
        assert {tuple(row[:2]) for row in table["data"]} == {(label, f"tta-{variant}")}
    assert len(set(labels.values())) == 3 and "rank=16" in labels["lowrank"]


def test_wandb_summary_and_table_hold_every_category_and_the_mean(wandb_run):
    run_dir, offline_dir, state = wandb_run
    results = json.loads((run_dir / "results.json").read_text())
    for record in results["categories"]:
        for metric in ("pixel_auroc", "image_auroc", "pixel_aupro"):
            assert state["summary"][f"{record['category']}/{metric}"] == pytest.approx(record[metric])
    assert state["summary"]["mean/pixel_auroc"] == pytest.approx(results["mean"]["pixel_auroc"])
    # W&B splits nested summary keys: the table's reference is results/_type, results/path, ...
    table_ref = {
        key.removeprefix("results/"): value for key, value in state["summary"].items() if key.startswith("results/")
    }
    assert table_ref["_type"] == "table-file" and table_ref["nrows"] == 3
    table = json.loads((offline_dir / "files" / table_ref["path"]).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [row["category"] for row in rows] == ["fabric", "widget", MEAN_ROW]
    assert rows[1]["pixel_auroc"] == pytest.approx(results["categories"][1]["pixel_auroc"])
    assert rows[2]["images"] == results["mean"]["images"]


def test_wandb_artifact_holds_the_results_files(wandb_run):
    run_dir, _, state = wandb_run
    (artifact,) = [artifact for artifact in state["artifacts"] if artifact.type == "results"]  # and the table's
    assert artifact.type == "results" and artifact.name.startswith("results-")
    entries = {entry.path: entry.digest for entry in artifact.manifest.contents}
    assert set(entries) == {"results.csv", "results.json", "results.md", "config.yaml"}
    for name, digest in entries.items():  # W&B's digest: base64 of the file's MD5
        assert digest == base64.b64encode(hashlib.md5((run_dir / name).read_bytes()).digest()).decode()


def test_each_wandb_run_keeps_its_own_config(wandb_run, data_root, tmp_path):
    # Two runs in one save folder: each config.yaml in its run's folder, none shared.
    for categories in ("[fabric]", "[widget]"):
        demo(
            data_root,
            tmp_path,
            "--config",
            str(CONFIGS / "wandb.yaml"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.logger.init_args.offline",
            "true",
            "--data.init_args.categories",
            categories,
        )
    configs = sorted(tmp_path.glob("anovl/*/config.yaml"))
    assert len(configs) == 2 and not (tmp_path / "config.yaml").exists()
    assert sorted(yaml.safe_load(path.read_text())["data"]["init_args"]["categories"][0] for path in configs) == [
        "fabric",
        "widget",
    ]


def test_csv_run_has_full_hparams_and_no_metrics_csv(data_root, tmp_path):
    demo(data_root, tmp_path)
    (run_dir,) = tmp_path.glob("demo/*")
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert FULL_CONFIG_SECTIONS <= set(hparams)
    assert hparams["data"]["init_args"]["root"] == str(data_root)
    # results.csv is the one table: one row per category with all its metrics, the mean last.
    assert not (run_dir / "metrics.csv").exists()
    header, *rows = (run_dir / "results.csv").read_text().splitlines()
    assert header.split(",")[:3] == ["category", "images", "pixel_auroc"]
    assert [row.split(",")[0] for row in rows] == ["fabric", "widget", MEAN_ROW]


def test_resumed_run_keeps_its_first_config(data_root, tmp_path):
    demo(data_root, tmp_path)
    (run_dir,) = tmp_path.glob("demo/*")
    first = (run_dir / "config.yaml").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    results["complete"], results["categories"] = False, results["categories"][:1]  # as if interrupted after fabric
    (run_dir / "results.json").write_text(json.dumps(results))
    demo(data_root, tmp_path, "--resume", str(run_dir))
    assert (run_dir / "config.yaml").read_text() == first
    assert "--resume" not in first and yaml.safe_load((run_dir / "config.1.yaml").read_text())["resume"] == str(run_dir)
    assert [row["category"] for row in json.loads((run_dir / "results.json").read_text())["categories"]] == [
        "fabric",
        "widget",
    ]


def test_tensorboard_logger_works(data_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    demo(
        data_root,
        tmp_path,
        "--trainer.logger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.logger.init_args.name",
        "tb",
    )
    (run_dir,) = tmp_path.glob("tb/*")
    results = json.loads((run_dir / "results.json").read_text())
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    (pixel_auroc,) = events.Scalars("mean/pixel_auroc")
    assert pixel_auroc.value == pytest.approx(results["mean"]["pixel_auroc"], rel=1e-6)
    assert "results" in str(events.Tags()["tensors"])  # the Markdown table, as text
    assert FULL_CONFIG_SECTIONS <= set(yaml.safe_load((run_dir / "hparams.yaml").read_text()))


def test_failed_run_removes_the_empty_folder_it_created(tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "widget" / "test" / "good").mkdir(parents=True)
    (bad / "widget" / "test" / "good" / "000.png").write_text("not an image")
    save_dir = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        demo(bad, save_dir, "--data.init_args.generate", "false", "--data.init_args.categories", "[widget]")
    assert exit_info.value.code == 2 and "Cannot read image" in capsys.readouterr().err
    assert not save_dir.exists()  # runs/demo/version_0 held only its config.yaml and hparams.yaml
    # A folder that holds anything else (here the user's notes) is kept, whoever made it.
    run_dir = save_dir / "mine"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        demo(
            bad,
            save_dir,
            "--data.init_args.generate",
            "false",
            "--data.init_args.categories",
            "[widget]",
            "--run_dir",
            str(run_dir),
        )
    assert (run_dir / "notes.txt").read_text() == "mine"
