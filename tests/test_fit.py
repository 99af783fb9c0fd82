"""`anovl fit`: what trains and what stays frozen, checkpoints, resume, processes, precision, bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from anovl.cli import main
from anovl.data import SyntheticMVTecDataModule
from anovl.data.synthetic import generate_mvtec_like
from anovl.engine import AnomalyModule, Engine
from anovl.errors import AnovlError
from anovl.models import AprilGAN

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--model",
    "anovl.models.AprilGAN",
    "--model.init_args.backbone",
    "anovl-tiny-vit",
    "--model.init_args.pretrained",
    "null",
    "--model.init_args.image_size",
    "64",
    "--model.init_args.layers",
    "[1, 2, 3]",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One category of 6 images: 2 normal, 4 anomalous with masks."""
    return generate_mvtec_like(tmp_path_factory.mktemp("data"), ("widget",), n_good=2, n_defect=1, image_size=64)


def tiny_aprilgan(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AprilGAN("anovl-tiny-vit", None, 64, layers=(1, 2, 3), use_text_cache=False, **kwargs)


def datamodule(root, batch_size=2):
    return SyntheticMVTecDataModule(root, generate=False, categories=["widget"], image_size=64, batch_size=batch_size)


def fit(root, save_dir, epochs, ckpt_path=None, batch_size=2, mosaic_rate=0.0, logger=None, **trainer_args):
    seed_everything(0)
    module = AnomalyModule(tiny_aprilgan(), mosaic_rate=mosaic_rate)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger or CSVLogger(save_dir, name="fit"),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        log_every_n_steps=1,
        **trainer_args,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=datamodule(root, batch_size), ckpt_path=ckpt_path)
    return module, trainer


def heads(module):
    return {key: value.clone() for key, value in module.model.heads.state_dict().items()}


def test_fit_trains_only_the_heads_and_checkpoints_hold_only_them(data_root, tmp_path):
    module, trainer = fit(data_root, tmp_path, epochs=2, mosaic_rate=0.5)
    model = module.model
    assert all(not parameter.requires_grad and parameter.grad is None for parameter in model.clip.parameters())
    trained = {id(parameter) for parameter in model.heads.parameters()}
    optimizer = trainer.optimizers[0]
    assert {id(parameter) for group in optimizer.param_groups for parameter in group["params"]} == trained
    assert set(optimizer.state) and all(id(parameter) in trained for parameter in optimizer.state)
    path = Path(trainer.checkpoint_callback.last_model_path)
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["state_dict"]) == {f"model.heads.{key}" for key in model.heads.state_dict()}
    assert checkpoint["anovl"]["record"] == {"method": "aprilgan"}
    assert path.stat().st_size < 200_000  # the heads (6 k numbers) and their Adam state, not the CLIP (1.8 M)
    # The loss terms, learning rate and epoch time reached the logger.
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("train/focal_epoch", "train/dice_epoch", "train/loss_epoch", "train/lr_epoch", "train/epoch_time_s"):
        assert name in logged
    # A plain model loads the checkpoint (a model argument) to the same heads.
    loaded = tiny_aprilgan(checkpoint=path)
    for key, value in heads(module).items():
        torch.testing.assert_close(loaded.heads.state_dict()[key], value, rtol=0, atol=0)


def test_resume_gives_the_weights_of_an_uninterrupted_run(data_root, tmp_path):
    uninterrupted, _ = fit(data_root, tmp_path / "whole", epochs=3, mosaic_rate=0.5)
    # A run stopped after its first epoch (a SIGKILL later loses only the unfinished epoch), resumed from last.ckpt.
    _, first = fit(data_root, tmp_path / "part", epochs=1, mosaic_rate=0.5)
    resumed, _ = fit(
        data_root, tmp_path / "part", epochs=3, mosaic_rate=0.5, ckpt_path=first.checkpoint_callback.last_model_path
    )
    for key, value in heads(uninterrupted).items():
        torch.testing.assert_close(heads(resumed)[key], value, rtol=0, atol=0)
    # ... and training moved the heads at all.
    assert any(
        not torch.equal(value, heads(fit(data_root, tmp_path / "one", epochs=1)[0])[key])
        for key, value in heads(uninterrupted).items()
    )


def test_loss_terms_learning_rate_and_epoch_time_reach_tensorboard(data_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, trainer = fit(data_root, tmp_path, epochs=2, logger=TensorBoardLogger(tmp_path, name="fit"))
    (events,) = Path(trainer.logger.log_dir).glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    values = {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    for name in ("focal", "dice", "loss", "lr"):
        assert len(values[f"train/{name}_epoch"]) == 2 and len(values[f"train/{name}_step"]) == 6  # 6 images, batch 2
    assert len(values["train/epoch_time_s"]) == 2 and all(seconds > 0 for seconds in values["train/epoch_time_s"])
    assert values["train/lr_epoch"] == pytest.approx([1e-3, 1e-3])  # APRIL-GAN's Adam
    # The total is the sum of the terms, step by step and in the epoch means.
    for kind in ("step", "epoch"):
        total = [a + b for a, b in zip(values[f"train/focal_{kind}"], values[f"train/dice_{kind}"])]
        assert values[f"train/loss_{kind}"] == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains(data_root, tmp_path, precision):
    module, _ = fit(data_root, tmp_path, epochs=1, precision=precision)
    assert all(torch.isfinite(value).all() for value in heads(module).values())
    assert module.model.heads[0].weight.dtype == torch.float32  # master weights stay float32


def cli_env(tmp_path):
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "ANOVL_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }


def fit_args(data_root, save_dir, *extra):
    return [
        "fit",
        *TINY,
        "--data",
        "anovl.data.SyntheticMVTecDataModule",
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.generate",
        "false",
        "--data.init_args.categories",
        "[widget]",
        "--data.init_args.batch_size",
        "2",
        "--trainer.logger",
        "CSVLogger",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        *extra,
    ]


def validation_metrics(run_dir):
    """The last epoch's val/<metric> values of a run's metrics.csv."""
    (path,) = run_dir.glob("*/version_0/metrics.csv")
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return {key: float(value) for row in rows for key, value in row.items() if key.startswith("val/") and value}


def test_ddp_two_processes_equal_one_with_the_same_global_batch(data_root, tmp_path):
    env = cli_env(tmp_path)
    # Validation on 5 images: 2 processes get 3 each, one of them padding, which is left out.
    validation_root = generate_mvtec_like(tmp_path / "val", ("widget",), n_good=1, n_defect=1, image_size=64)
    validation = yaml.safe_dump(
        {"class_path": "anovl.data.MVTecDataModule", "init_args": {"root": str(validation_root), "batch_size": 1}}
    )
    runs, validated = {}, {}
    for name, extra in (
        ("one", ["--data.init_args.batch_size", "4"]),
        ("two", ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]),
    ):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "anovl.cli",
                *fit_args(data_root, tmp_path / name, *extra),
                "--trainer.max_epochs",
                "1",
                "--engine.validation",
                validation,
            ],
            check=False,
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        (checkpoint,) = (tmp_path / name).glob("*/version_0/checkpoints/last.ckpt")
        runs[name] = torch.load(checkpoint, weights_only=True)["state_dict"]
        validated[name] = validation_metrics(tmp_path / name)
    for key, value in runs["one"].items():
        # float tolerance: the reductions differ in order; Adam divides by small gradients
        torch.testing.assert_close(runs["two"][key], value, rtol=1e-5, atol=1e-5)
    # The validation metrics of 2 processes (each with a share) are those of one.
    assert {"val/pixel_auroc", "val/image_auroc", "val/pixel_aupro"} <= set(validated["one"])
    assert validated["two"] == pytest.approx(validated["one"], abs=1e-3)


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_saves_a_checkpoint_and_exits_143(data_root, tmp_path, processes):
    # With a validation split (the same images here): its test metrics are logged at each epoch's end.
    validation = yaml.safe_dump(
        {"class_path": "anovl.data.MVTecDataModule", "init_args": {"root": str(data_root), "batch_size": 4}}
    )
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "anovl.cli",
            *fit_args(data_root, tmp_path, "--trainer.max_epochs", "1000", "--engine.validation", validation),
            *(ddp if processes == 2 else []),
        ],
        env=cli_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("*/version_0/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "interrupted.ckpt" in stderr
    (saved,) = tmp_path.glob("*/version_0/checkpoints/interrupted.ckpt")
    tiny_aprilgan(checkpoint=saved)  # a complete, loadable checkpoint
    (metrics,) = tmp_path.glob("*/version_0/metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"val/pixel_auroc", "val/image_auroc", "val/pixel_aupro"} <= set(header)


def run_main(args, capsys):
    """The exit code (0 where ``main`` returns) and stderr of an in-process ``anovl`` command."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def test_bad_input_gets_one_line(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["anovl"])
    monkeypatch.chdir(tmp_path)
    data = [
        "--data",
        "anovl.data.SyntheticMVTecDataModule",
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.generate",
        "false",
        "--data.init_args.categories",
        "[widget]",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
    ]
    # A training-free method.
    code, err = run_main(
        [
            "fit",
            "--model",
            "winclip",
            "--model.init_args.backbone",
            "anovl-tiny-vit",
            "--model.init_args.pretrained",
            "null",
            *data,
        ],
        capsys,
    )
    assert code == 2 and "WinCLIP is training-free" in err and "Traceback" not in err
    # Data without masks: a folder of unlabelled images.
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((data_root / "widget" / "test").rglob("*.png"))[:3]:
        (folder / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    code, err = run_main(
        [
            "fit",
            *TINY,
            "--data",
            "anovl.data.FolderDataModule",
            "--data.init_args.path",
            str(folder),
            "--trainer.logger",
            "false",
        ],
        capsys,
    )
    assert code == 2 and "fit trains on labelled images with pixel masks" in err and "Traceback" not in err
    # Checkpoints: corrupt, truncated, of another method.
    _, trainer = fit(data_root, tmp_path / "good", epochs=1)
    good = Path(trainer.checkpoint_callback.last_model_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint at all")
    for path in (truncated, corrupt):
        code, err = run_main(["test", *TINY, *data, "--ckpt_path", str(path)], capsys)
        assert code == 2 and "corrupt, truncated" in err and "Traceback" not in err, err
    other = torch.load(good, weights_only=True)
    other["anovl"] = {
        **other["anovl"],
        "method": "AnomalyCLIP",
        "record": {"method": "anomalyclip"},
        "settings": {**other["anovl"]["settings"], "backbone": "ViT-L-14-336"},
    }
    torch.save(other, tmp_path / "other.ckpt")
    code, err = run_main(["test", *TINY, *data, "--ckpt_path", str(tmp_path / "other.ckpt")], capsys)
    assert code == 2 and "AnomalyCLIP on ViT-L-14-336" in err and "APRIL-GAN on anovl-tiny-vit" in err


@pytest.mark.slow  # three fit processes: about a minute alone, several on a busy machine
def test_sigkill_then_resume_equals_an_uninterrupted_run(data_root, tmp_path):
    env = cli_env(tmp_path)
    options = ["--trainer.max_epochs", "60", "--engine.mosaic_rate", "0.5", "--trainer.deterministic", "true"]
    whole = subprocess.run(
        [sys.executable, "-m", "anovl.cli", *fit_args(data_root, tmp_path / "whole", *options)],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = subprocess.Popen(
        [sys.executable, "-m", "anovl.cli", *fit_args(data_root, tmp_path / "killed", *options)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def last_epoch_saved() -> int:
        # Only the newest epoch's file is kept (epoch=N-step=M.ckpt): a poll may miss any one N on a fast machine.
        saved = tmp_path.glob("killed/*/version_0/checkpoints/epoch=*-*.ckpt")
        return max((int(path.name.split("-")[0].removeprefix("epoch=")) for path in saved), default=-1)

    deadline = time.monotonic() + 300
    while last_epoch_saved() < 2 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL  # killed mid-run, not finished
    (last,) = tmp_path.glob("killed/*/version_0/checkpoints/last.ckpt")
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "anovl.cli",
            *fit_args(data_root, tmp_path / "killed", *options),
            "--ckpt_path",
            str(last),
        ],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (expected,) = tmp_path.glob("whole/*/version_0/checkpoints/last.ckpt")
    (final,) = tmp_path.glob("killed/*/version_1/checkpoints/last.ckpt")
    expected, final = (torch.load(path, weights_only=True) for path in (expected, final))
    assert final["epoch"] == expected["epoch"]
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=0)


def test_few_shot_from_a_folder_per_category(tmp_path):
    root = generate_mvtec_like(tmp_path, ("widget",), n_good=1, n_defect=1, n_train=3, image_size=64)
    model = tiny_aprilgan(few_shot_images=str(root / "{category}" / "train" / "good"), k_shot=2)
    images = torch.randn(2, 3, 64, 64)
    assert model(images, ["widget", "widget"]).few_shot_map is None  # no category started yet: zero-shot
    model.start_category("widget")  # what the test loop calls before a category's first images
    few_shot = model(images, ["widget", "widget"])
    assert few_shot.few_shot_map is not None and model.settings()["few_shot"]["shots"] == 2
    assert model.label.startswith("APRIL-GAN-few-shot")
    with pytest.raises(AnovlError, match="no normal images of 'screw'"):
        model.start_category("screw")


def test_threshold_calibration_refuses_scores_normalised_per_category(tmp_path):
    from types import SimpleNamespace

    from anovl.callbacks import AnomalyMapWriter

    few_shot = tiny_aprilgan(few_shot_images=str(tmp_path / "{category}"))
    assert few_shot.scores_need_category and not tiny_aprilgan().scores_need_category
    writer = AnomalyMapWriter(normal_images=str(tmp_path))
    with pytest.raises(AnovlError, match="normalised over a whole category"):
        writer.on_predict_start(None, SimpleNamespace(model=few_shot))


def test_trained_heads_name_the_label_and_resume_refuses_other_heads(data_root, tmp_path, capsys, monkeypatch):
    _, trainer = fit(data_root, tmp_path / "fit", epochs=1)
    trained = Path(trainer.checkpoint_callback.last_model_path)
    # Other heads: the same checkpoint with one weight moved.
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["state_dict"]["model.heads.0.bias"] += 1
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    fingerprints = [tiny_aprilgan(checkpoint=path).heads_fingerprint() for path in (trained, other)]
    assert fingerprints[0] != fingerprints[1] and "heads" not in tiny_aprilgan().label
    monkeypatch.setattr(sys, "argv", ["anovl"])
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "test"
    test_args = [
        "test",
        *TINY,
        "--data",
        "anovl.data.SyntheticMVTecDataModule",
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.generate",
        "false",
        "--data.init_args.categories",
        "[widget]",
    ]
    code, err = run_main([*test_args, "--run_dir", str(run), "--ckpt_path", str(trained)], capsys)
    assert code == 0, err
    label = yaml.safe_load((run / "results.json").read_text())["label"]
    assert f"heads={fingerprints[0]}" in label  # known before the run starts (W&B names, compare, grid)
    # --resume with the run's own checkpoint goes on; with other heads it is refused in one line.
    code, err = run_main([*test_args, "--resume", str(run), "--ckpt_path", str(trained)], capsys)
    assert code == 0, err
    code, err = run_main([*test_args, "--resume", str(run), "--ckpt_path", str(other)], capsys)
    assert code == 2 and err.count("anovl: error:") == 1 and "heads" in err, err


def test_a_direct_trainer_test_with_ckpt_path_records_the_trained_heads_as_the_engine_does(data_root, tmp_path):
    fitted_module, fitted = fit(data_root, tmp_path / "fit", epochs=1)
    trained = fitted.checkpoint_callback.last_model_path
    fingerprint = tiny_aprilgan(checkpoint=trained).heads_fingerprint()
    untrained = tiny_aprilgan()
    assert fingerprint != untrained.heads_fingerprint() and "heads" not in untrained.label
    options = {"enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu", "logger": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Engine(options, run_dir=tmp_path / "engine").test(tiny_aprilgan(), datamodule(data_root), ckpt_path=trained)
        # Lightning's own call, outside the Engine: the checkpoint is loaded after the module is built.
        module = AnomalyModule(untrained, results_dir=str(tmp_path / "direct"))
        Trainer(inference_mode=False, **options).test(module, datamodule=datamodule(data_root), ckpt_path=trained)
    engine, direct = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("engine", "direct"))
    assert engine["config"]["model"]["heads"] == fingerprint and f"heads={fingerprint}" in engine["label"]
    assert direct == engine  # label, title, the settings recorded and the metrics of the same trained heads
    assert module.label == engine["label"]
    # Tested after a fit in the same session, without a checkpoint: the label names the heads just trained.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(inference_mode=False, default_root_dir=tmp_path / "after_fit", **options).test(
            fitted_module, datamodule=datamodule(data_root)
        )
    assert json.loads((tmp_path / "after_fit" / "results.json").read_text())["label"] == engine["label"]
    # A label given by the user stays as given.
    named = AnomalyModule(tiny_aprilgan(), label="mine", results_dir=str(tmp_path / "named"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(inference_mode=False, **options).test(named, datamodule=datamodule(data_root), ckpt_path=trained)
    assert json.loads((tmp_path / "named" / "results.json").read_text())["label"] == "mine"


def test_a_mosaic_is_four_images_of_its_category_resized_with_its_own_mask_regions(data_root):
    from PIL import Image
    from scipy import ndimage

    from anovl.engine.training import TrainingData

    dataset = datamodule(data_root).dataset
    by_path = {str(sample.image_path): index for index, sample in enumerate(dataset.samples)}
    data = TrainingData(dataset, seed=0)
    for position in range(4):
        mosaic = data[(0, position, 0)]
        parts = [dataset[by_path[path]] for path in mosaic["image_path"].removeprefix("mosaic of ").split(", ")]
        # Naive reference: the four images pasted 2 × 2 and resized by Pillow (bilinear, antialiased).
        tiles = [part["image"].permute(1, 2, 0).numpy() for part in parts]
        grid = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)])
        expected = np.asarray(Image.fromarray(grid).resize((64, 64), Image.BILINEAR)).astype(int)
        assert np.abs(mosaic["image"].permute(1, 2, 0).numpy().astype(int) - expected).max() <= 1
        assert int(mosaic["label"]) == int(any(int(part["label"]) == 1 for part in parts))
        # The mosaic's region sizes are those of its own mask (8-connected), not of its first image.
        mask = mosaic["mask"].numpy()
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.where(labels > 0, np.bincount(labels.ravel())[labels], 0)
        np.testing.assert_array_equal(mosaic["region_sizes"].numpy(), sizes)


def test_a_few_shot_run_refuses_a_loader_without_length(tmp_path):
    from torch.utils.data import DataLoader, IterableDataset

    class Endless(IterableDataset):
        def __iter__(self):
            return iter(())

    module = AnomalyModule(tiny_aprilgan(few_shot_images=str(tmp_path / "{category}")))
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(AnovlError, match="data loader with a length"):
        trainer.predict(module, dataloaders=DataLoader(Endless(), batch_size=None))
