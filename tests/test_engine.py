"""The Engine (what `anovl test` does, from Python) and configs that round-trip: a notebook gets the CLI's run
folder; a run's config.yaml repeats the run; a user's model config is recorded by its content; bad adapter
arguments fail in one line before any data is read."""

import json
import warnings
from pathlib import Path

import pytest
import yaml

from anovl import AnovlError
from anovl.backbones import register_model_config
from anovl.data import MVTecDataModule, generate_mvtec_like
from anovl.engine import Engine
from anovl.models import create_method
from anovl.testing.tiny import tiny_config
from tests.conftest import TINY
from tests.test_reliability_input import _cli_in_process, assert_one_error_line, run_main, text_cache  # noqa: F401

RESULT_FILES = ("results.csv", "results.json", "results.md")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate_mvtec_like(
        tmp_path_factory.mktemp("data"), ("fabric", "widget"), n_good=2, n_defect=1, image_size=64
    )


def tiny_args(root, *extra):
    return [
        "test",
        "--data",
        "anovl.data.MVTecDataModule",
        "--data.init_args.root",
        root,
        "--model",
        "anovl",
        "--model.init_args.backbone",
        TINY,
        "--model.init_args.pretrained",
        "null",
        "--model.init_args.image_size",
        "64",
        "--model.init_args.num_views",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--pictures.max_per_category",
        "1",
        *extra,
    ]


def files(folder: Path) -> dict[str, Path]:
    return {str(path.relative_to(folder)): path for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_notebook_runs_a_test_through_the_engine_and_gets_the_cli_folder(root, tmp_path, capsys):
    status, _, stderr = run_main([*tiny_args(root), "--run_dir", tmp_path / "cli"], capsys)
    assert status == 0, stderr

    # What a notebook cell does: build the method and the data, hand them to an Engine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_method("anovl", backbone=TINY, pretrained=None, image_size=64, num_views=2)
    data = MVTecDataModule(root=str(root), image_size=model.image_size)
    engine = Engine({"enable_progress_bar": False}, run_dir=tmp_path / "notebook", pictures={"max_per_category": 1})
    table = engine.test(model, data)

    cli, notebook = files(tmp_path / "cli"), files(tmp_path / "notebook")
    assert list(cli) == list(notebook)  # results, config.yaml, hparams.yaml, the same pictures
    assert any(name.startswith("pictures/") for name in cli)
    for name in [*RESULT_FILES, *(name for name in cli if name.startswith("pictures/"))]:
        assert cli[name].read_bytes() == notebook[name].read_bytes(), name
    assert table.label == json.loads(cli["results.json"].read_text())["label"] and list(table.rows) == [
        "fabric",
        "widget",
    ]
    assert json.loads(notebook["results.json"].read_text())["config"]["model"]["method"] == "anovl"
    recorded = yaml.safe_load(notebook["config.yaml"].read_text())
    assert recorded["model"]["method"] == "anovl" and recorded["model"]["settings"]["pretrained"] is None


def test_engine_checks_the_data_size_and_refuses_a_wrapped_model(root, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_method("winclip", backbone=TINY, pretrained=None, image_size=64)
    with pytest.raises(AnovlError, match="the data's image_size is 96 but the model expects 64"):
        Engine(run_dir=tmp_path / "run").test(model, MVTecDataModule(root=str(root), image_size=96))
    with pytest.raises(AnovlError, match="not both"):
        Engine(run_dir=tmp_path / "a", resume=tmp_path / "b")


def test_a_saved_config_keeps_nulls_and_repeats_its_run(root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run_main([*tiny_args(root), "--trainer.logger.init_args.save_dir", tmp_path], capsys)
    assert status == 0, stderr
    (first,) = (tmp_path / "anovl").iterdir()
    config = yaml.safe_load((first / "config.yaml").read_text())
    hparams = yaml.safe_load((first / "hparams.yaml").read_text())  # what every logger gets, W&B's config too
    for record in (config, hparams):
        assert "pretrained" in record["model"]["init_args"] and record["model"]["init_args"]["pretrained"] is None
    status, _, stderr = run_main(["test", "--config", first / "config.yaml"], capsys)
    assert status == 0, stderr
    (second,) = set((tmp_path / "anovl").iterdir()) - {first}
    for name in RESULT_FILES:
        assert (first / name).read_text() == (second / name).read_text(), name


def test_a_user_model_config_is_recorded_by_content_and_resume_refuses_another(root, tmp_path, capsys):
    path = tmp_path / "configs" / "my-vit.json"
    path.parent.mkdir()
    config = tiny_config("ViT-B-16")
    path.write_text(json.dumps(config))
    args = [*tiny_args(root, "--trainer.logger.init_args.save_dir", tmp_path), "--model.init_args.backbone", path]
    status, _, stderr = run_main(args, capsys)
    assert status == 0, stderr
    (run,) = (tmp_path / "anovl").iterdir()
    recorded = json.loads((run / "results.json").read_text())["config"]["model"]
    assert recorded["backbone"] == "my-vit" and len(recorded["backbone_config"]) == 16

    config["vision_cfg"]["mlp_ratio"] = 2.0  # another model under the same name
    path.write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the name is registered again: a warning says so
        status, _, stderr = run_main([*args, "--resume", run], capsys)
    assert_one_error_line(status, stderr, "cannot resume", "model.backbone_config")
    register_model_config(config, name="unrelated")  # the registry keeps working afterwards


@pytest.mark.parametrize(
    "adapter_args, fragment",
    [({"rnk": 4}, "unexpected keyword argument 'rnk'); it takes: rank"), ({"rank": "x", "extra": 1}, "'extra'")],
)
def test_bad_adapter_args_fail_in_one_line_before_any_data_is_read(adapter_args, fragment, tmp_path, capsys):
    missing = tmp_path / "no-such-data"  # reading the data would fail with another message
    status, _, stderr = run_main(
        [
            "test",
            "--data",
            "anovl.data.MVTecDataModule",
            "--data.init_args.root",
            missing,
            "--model.init_args.backbone",
            TINY,
            "--model.init_args.pretrained",
            "null",
            "--model.init_args.tta",
            json.dumps({"adapter": "lowrank", "adapter_args": adapter_args}),
        ],
        capsys,
    )
    assert_one_error_line(status, stderr, "tta.adapter_args do not fit the 'lowrank' adapter", fragment)
    assert not missing.exists()


def test_export_reads_configs_as_the_cli_does(tmp_path):
    from anovl.configs import read_config
    from anovl.deploy.export_cli import model_from_config
    from anovl.models import AnoVL

    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "class_path": "anovl",
                    "init_args": {"backbone": TINY, "pretrained": None, "image_size": 64, "num_views": 2},
                }
            }
        )
    )
    assert read_config(config)["model"]["class_path"] == "anovl.models.anovl.torch_model.AnoVL"
    model = model_from_config(config)
    assert type(model) is AnoVL and model.num_views == 2
    config.write_text("model: winclp\n")
    with pytest.raises(AnovlError, match="unknown method 'winclp'; did you mean winclip"):
        read_config(config)
    config.write_text("- a list\n")
    with pytest.raises(AnovlError, match="must be a mapping"):
        read_config(config)
