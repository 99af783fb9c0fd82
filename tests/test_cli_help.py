"""The CLI explains itself: top-level help, lazy start, anovl's options first, choices and descriptions,
third-party noise filtered, a missing logger package as one line."""

import subprocess
import sys

import pytest
from jsonargparse import ArgumentParser

from anovl.cli import COMMANDS, main
from anovl.lightning_cli import TRAINING_ONLY_TRAINER_FLAGS
from anovl.models.anovl.tta import TTAConfig
from tests.test_cli import CONFIGS, TINY_MODEL, anovl, cli_env, data_root  # noqa: F401 (fixtures)


def test_top_level_help_lists_every_command_without_importing_torch(cli_env, tmp_path):
    probe = (
        "import sys\nfrom anovl.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0\nheavy = [name for name in ('torch', 'lightning', 'open_clip') if name in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=cli_env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    for command in ("test", "predict", "compare", "grid"):
        assert f"\n  {command} " in result.stdout
    assert set(COMMANDS) >= {"test", "predict", "compare", "grid"}


def test_no_command_prints_the_help_and_fails(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "commands:" in capsys.readouterr().out


def test_test_help_leads_with_anovl_options_and_hides_training_flags(capsys):
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: anovl test [-c CONFIG ...]")
    positions = [
        help_text.index(marker)
        for marker in (
            "--model.help",
            "--data.help",
            "--engine.label",
            "--pictures.max_per_category",
            "--trainer.devices",
        )
    ]
    assert positions == sorted(positions)
    for flag in TRAINING_ONLY_TRAINER_FLAGS & {"max_epochs", "gradient_clip_val", "check_val_every_n_epoch"}:
        assert f"--trainer.{flag}" not in help_text
    assert len(help_text.splitlines()) < 450  # 425 with fit's engine options (validation, mosaic_rate)
    # --exported is handled before the LightningCLI parses, and still listed.
    assert "[--exported FILE]" in help_text.splitlines()[0] and "--exported FILE runs a model written by" in help_text


def test_model_help_takes_a_method_name_and_shows_its_own_defaults(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["anovl"])
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--model.help", "aprilgan"])
    help_text = " ".join(capsys.readouterr().out.split())  # the help wraps its lines
    assert exit_info.value.code in (0, None) and "Help for --model.help=anovl.AprilGAN" in help_text
    assert "default: ViT-L-14-336)" in help_text and "default: (6, 12, 18, 24))" in help_text


def test_hidden_training_defaults_still_apply(tmp_path, monkeypatch):
    from anovl.cli import AnovlCLI

    monkeypatch.chdir(tmp_path)
    cli = AnovlCLI(
        args=["--config", str(CONFIGS / "demo.yaml"), *TINY_MODEL, "--data.init_args.root", str(tmp_path / "data")],
        run=False,
    )
    assert cli.trainer.checkpoint_callback is None and not cli.trainer.predicting  # enable_checkpointing: False


def test_training_flags_are_still_accepted(capsys):
    # A config saved by an older anovl lists every trainer flag; it must still load.
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(CONFIGS / "demo.yaml"), "--trainer.max_epochs", "3", "--print_config"])
    assert exit_info.value.code in (0, None) and "model:" in capsys.readouterr().out


def test_data_help_shows_descriptions_and_choices(capsys):
    with pytest.raises(SystemExit):
        main(["test", "--data.help", "anovl.data.VisADataModule"])
    help_text = capsys.readouterr().out
    assert "--data.mode {resize,tile}" in help_text and "--data.on_bad_image {error,skip}" in help_text
    assert "images per batch" in help_text  # the docstring's description of batch_size


def test_tta_options_show_descriptions_and_choices():
    parser = ArgumentParser(prog="anovl")
    parser.add_class_arguments(TTAConfig, "model.init_args.tta")
    help_text = " ".join(parser.format_help().split())
    for option, choices in (
        ("mode", "{independent,reference}"),
        ("corruption", "{token,image}"),
        ("pseudo_labels", "{reference,tfa_threshold}"),
    ):
        assert f"--model.init_args.tta.{option} {choices}" in help_text
    assert "fresh parameters and optimiser state" in help_text and "AdamW learning rate" in help_text


def test_bad_choice_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "test",
                "--config",
                str(CONFIGS / "demo.yaml"),
                "--config",
                str(CONFIGS / "tta" / "text.yaml"),
                "--model.init_args.tta.mode",
                "sometimes",
                "--print_config",
            ]
        )
    assert exit_info.value.code == 2 and "sometimes" in capsys.readouterr().err


def test_third_party_noise_is_filtered_and_anovl_warnings_stay(cli_env, data_root, tmp_path):
    result = anovl(
        [
            "test",
            "--config",
            CONFIGS / "demo.yaml",
            "--config",
            CONFIGS / "wandb.yaml",
            *TINY_MODEL,
            "--data.init_args.root",
            data_root,
            "--data.init_args.categories",
            "[widget]",
            "--trainer.logger.init_args.save_dir",
            tmp_path,
            "--trainer.logger.init_args.offline",
            "true",
        ],
        cli_env,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    for noise in ("WARNING:root", "No pretrained weights loaded", "litlogger", "LeafSpec", "anonymous setting"):
        assert noise not in result.stderr
    assert "has random weights" in result.stderr  # anovl's own warning


def test_missing_logger_package_is_one_line(cli_env, tmp_path):
    if subprocess.run([sys.executable, "-c", "import mlflow"], capture_output=True).returncode == 0:
        pytest.skip("mlflow is installed here")
    result = anovl(
        [
            "test",
            "--config",
            CONFIGS / "demo.yaml",
            *TINY_MODEL,
            "--data.init_args.root",
            tmp_path / "d",
            "--trainer.logger",
            "lightning.pytorch.loggers.MLFlowLogger",
        ],
        cli_env,
        tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("anovl: error:")]
    assert "'mlflow'" in line and "pip install mlflow" in line
    assert not (tmp_path / "runs").exists()
