"""The `anovl` console script, run as a subprocess like a user would: test, predict, DDP, errors, configs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from anovl.cli import main
from anovl.data import generate_mvtec_like
from anovl.visualization import png16_to_map

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
TINY_MODEL = [
    "--model.init_args.backbone",
    "anovl-tiny-vit",
    "--model.init_args.pretrained",
    "null",
    "--model.init_args.image_size",
    "64",
    "--model.init_args.num_views",
    "2",
    "--trainer.enable_progress_bar",
    "false",
]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """Offline environment with one text-embedding cache for all subprocesses of this module."""
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "ANOVL_CACHE_DIR": str(tmp_path_factory.mktemp("cli-cache")),
    }


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Two categories of 6 and 7 images: 13 in all, so two DDP processes need one padded copy."""
    root = generate_mvtec_like(
        tmp_path_factory.mktemp("data"), ("fabric", "widget"), n_good=3, n_defect=1, image_size=64
    )
    (root / "fabric" / "test" / "good" / "002.png").unlink()
    return root


def anovl(args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anovl.cli", *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def demo_test_args(data_root, save_dir):
    return [
        "test",
        "--config",
        CONFIGS / "demo.yaml",
        *TINY_MODEL,
        "--data.init_args.root",
        data_root,
        "--data.init_args.batch_size",
        "2",
        "--trainer.logger.init_args.save_dir",
        save_dir,
    ]


def run_dir(save_dir: Path) -> Path:
    (directory,) = (save_dir / "demo").iterdir()
    return directory


@pytest.fixture(scope="module")
def single_process_run(data_root, cli_env, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("single")
    result = anovl(demo_test_args(data_root, save_dir), cli_env, save_dir)
    assert result.returncode == 0, result.stderr
    return result, run_dir(save_dir)


def test_cli_test_writes_results_and_panels(single_process_run):
    result, directory = single_process_run
    rows = list(csv.DictReader((directory / "results.csv").open()))
    assert [(row["category"], row["images"]) for row in rows] == [
        ("fabric", "6"),
        ("widget", "7"),
        ("mean (all categories)", "13"),
    ]
    document = json.loads((directory / "results.json").read_text())
    assert document["mean"]["pixel_auroc"] == pytest.approx(float(rows[-1]["pixel_auroc"]))
    assert document["random_weights"] is True
    assert "scores mean nothing" in (directory / "results.md").read_text()
    assert "scores mean nothing" in result.stdout and "widget" in result.stdout
    for category in ("fabric", "widget"):  # demo.yaml: pictures.max_per_category 3
        assert len(list((directory / "pictures" / category).glob("*.png"))) == 3
    saved = yaml.safe_load((directory / "config.yaml").read_text())
    assert saved["trainer"]["inference_mode"] is False


def test_ddp_two_processes_give_the_same_table(single_process_run, data_root, cli_env, tmp_path):
    result = anovl(
        [
            *demo_test_args(data_root, tmp_path),
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
    directory = run_dir(tmp_path)
    single = json.loads((single_process_run[1] / "results.json").read_text())
    distributed = json.loads((directory / "results.json").read_text())
    assert distributed["categories"] == single["categories"]  # padding copies left out: 6 + 7 images
    assert distributed["mean"] == single["mean"]
    # The pictures are chosen among all images (not per process) and drawn once: the same files, pixel for
    # pixel, with the same roles in their captions, as one process writes.
    for category in ("fabric", "widget"):
        pictures = sorted(path.name for path in (directory / "pictures" / category).glob("*.png"))
        assert len(pictures) == 3
        assert pictures == sorted(path.name for path in (single_process_run[1] / "pictures" / category).glob("*.png"))
        for name in pictures:
            assert np.array_equal(
                np.asarray(Image.open(directory / "pictures" / category / name)),
                np.asarray(Image.open(single_process_run[1] / "pictures" / category / name)),
            )


def test_ddp_predict_writes_one_scores_csv_in_dataset_order(data_root, cli_env, tmp_path):
    outputs = {}
    for processes in (1, 2):
        output = tmp_path / f"out{processes}"
        result = anovl(
            [
                "predict",
                "--config",
                CONFIGS / "demo.yaml",
                *TINY_MODEL,
                "--data.init_args.root",
                data_root,
                "--data.init_args.batch_size",
                "2",
                "--predictions.output_dir",
                output,
                "--predictions.overlays",
                "false",
                "--trainer.logger.init_args.save_dir",
                tmp_path / "runs",
                "--trainer.accelerator",
                "cpu",
                "--trainer.devices",
                str(processes),
                *(["--trainer.strategy", "ddp"] if processes > 1 else []),
            ],
            cli_env,
            tmp_path,
        )
        assert result.returncode == 0, result.stderr
        outputs[processes] = output
    single, distributed = (list(csv.DictReader((outputs[n] / "scores.csv").open())) for n in (1, 2))
    assert len(single) == 13 and len({row["image_path"] for row in single}) == 13
    assert distributed == single  # the same rows, in the dataset's order, each image once
    assert sorted(path.name for path in outputs[2].iterdir()) == sorted(path.name for path in outputs[1].iterdir())
    assert not list(outputs[2].glob("scores.rank*.csv"))  # the parts are merged and removed


def test_cli_predict_writes_maps_for_unlabelled_images(cli_env, data_root, tmp_path):
    images = tmp_path / "my_images"
    images.mkdir()
    for index, source in enumerate(sorted((data_root / "widget" / "test").glob("*/000.png"))[:3]):
        Image.open(source).save(images / f"part{index}.png")
    output = tmp_path / "out"
    result = anovl(
        [
            "predict",
            "--config",
            CONFIGS / "folder.yaml",
            "--data.init_args.path",
            images,
            *TINY_MODEL,
            "--predictions.output_dir",
            output,
            "--trainer.logger.init_args.save_dir",
            tmp_path / "runs",
        ],
        cli_env,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    scores = list(csv.DictReader((output / "scores.csv").open()))
    assert [Path(row["image_path"]).name for row in scores] == ["part0.png", "part1.png", "part2.png"]
    assert [row["output"] for row in scores] == ["part0", "part1", "part2"]
    assert {row["predicted_label"] for row in scores} == {""}  # no threshold given
    for index in range(3):
        stem = output / "my_images" / f"part{index}"
        raw = np.load(f"{stem}_map.npy")
        assert raw.dtype == np.float32 and raw.shape == (64, 64) and 0 <= raw.min() <= raw.max() <= 1
        png = Image.open(f"{stem}_map.png")
        assert png.mode == "I;16"
        assert np.abs(png16_to_map(png) - raw).max() <= 1 / 65535
        assert Image.open(f"{stem}_overlay.png").size == (64, 64)


def test_cli_wandb_offline(cli_env, data_root, tmp_path):
    result = anovl(
        [
            *demo_test_args(data_root, tmp_path),
            "--config",
            CONFIGS / "wandb.yaml",
            "--trainer.logger.init_args.save_dir",
            tmp_path,
            "--trainer.logger.init_args.offline",
            "true",
            "--data.init_args.categories",
            "[widget]",
        ],
        cli_env,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (results,) = tmp_path.glob("anovl/*/results.json")
    assert [row["category"] for row in json.loads(results.read_text())["categories"]] == ["widget"]
    assert list(tmp_path.glob("wandb/offline-run-*"))


@pytest.mark.parametrize(
    ("args", "message", "only_line"),
    [
        # Fails while the model is built, before anything else is printed.
        (["--model.init_args.backbone", "no-such-vit"], "anovl: error: unknown backbone 'no-such-vit'", True),
        # Fails once the data is listed, after Lightning's device lines.
        (
            ["--data.init_args.root", "/no/such/dir", "--data.init_args.generate", "false"],
            "anovl: error: Dataset root /no/such/dir is not a directory",
            False,
        ),
    ],
    ids=["unknown-backbone", "missing-root"],
)
def test_cli_user_errors_are_one_line(args, message, only_line, cli_env, tmp_path):
    result = anovl(["test", "--config", CONFIGS / "demo.yaml", *TINY_MODEL, *args], cli_env, tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.rstrip().splitlines()
    errors = [line for line in lines if line.startswith("anovl: error:")]
    assert len(errors) == 1 and errors[0].startswith(message) and lines[-1] == errors[0]
    if only_line:
        assert lines == errors


@pytest.mark.parametrize("configs", [["mvtec"], ["visa"], ["folder"], ["demo"], ["mvtec", "wandb"]])
def test_configs_print(configs, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["anovl"])
    args = ["predict" if configs == ["folder"] else "test"]
    for name in configs:
        args += ["--config", str(CONFIGS / f"{name}.yaml")]
    if configs == ["folder"]:
        args += ["--data.init_args.path", "images"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "anovl.models.AnoVL"
    assert config["trainer"]["inference_mode"] is False
    assert "enable_checkpointing" not in config["trainer"]  # training-only: accepted but not listed
    if configs[-1] == "wandb":
        assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    if configs == ["mvtec"]:
        assert config["model"]["init_args"]["backbone"] == "ViT-B-16-plus-240"
        assert config["model"]["init_args"]["num_views"] == 22
        assert config["data"]["init_args"]["root"] == "data/mvtec"


def test_short_override(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["anovl"])
    with pytest.raises(SystemExit):
        main(["test", "--config", str(CONFIGS / "mvtec.yaml"), "--data.root", "/elsewhere", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["root"] == "/elsewhere"
