"""One registry behaviour (list, "did you mean", replace with a warning) and the method registry: short names on
the CLI and in configs, results.json naming the method, and a results.json of the class-path era still resuming."""

import inspect
import json
import sys
import warnings

import pytest
import yaml
from jsonargparse import Namespace

from anovl import AnovlError
from anovl.configs import model_settings_by_class
from anovl.data import generate_mvtec_like
from anovl.lightning_cli import method_arguments, resolved_config, settings_of_another_class, with_default_model
from anovl.models import AnoVL, WinCLIP, create_method, list_methods, register_method
from anovl.models.base import AnomalyModel
from anovl.models.registry import METHODS, method_name
from anovl.plugins import load_plugin
from anovl.registry import Registry
from tests.conftest import TINY
from tests.test_reliability_input import _cli_in_process, assert_one_error_line, run_main, text_cache  # noqa: F401

WINCLIP_TINY = [
    "--model.init_args.backbone",
    TINY,
    "--model.init_args.pretrained",
    "null",
    "--model.init_args.image_size",
    "64",
    "--trainer.enable_progress_bar",
    "false",
    "--pictures.max_per_category",
    "0",
]


def test_registry_lists_suggests_and_replaces_with_a_warning():
    registry: Registry[str, int] = Registry("colour", "register one with add_colour")
    registry.register("red", 1)
    registry.register("green", 2)
    assert registry.names() == ["green", "red"] and registry.lookup("red") == 1
    with pytest.raises(
        AnovlError,
        match=r"unknown colour 'gren'; did you mean green\? registered: green, red "
        r"\(register one with add_colour\)",
    ):
        registry.lookup("gren")
    with pytest.raises(AnovlError, match="unknown colour 'blue'; registered: green, red"):
        registry.lookup("blue")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry.register("red", 1)  # the same entry again (a module imported twice): silent
    with pytest.warns(UserWarning, match="colour 'red' was registered before"):
        registry.register("red", 3)
    assert registry["red"] == 3


def test_methods_are_listed_created_and_named_by_their_registry_name():
    assert {"anovl", "winclip"} <= set(list_methods())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_method("winclip", backbone=TINY, pretrained=None, scales=[2])
    assert type(model) is WinCLIP and model.scales == (2,)
    assert method_name(model) == "winclip" and method_name(AnoVL) == "anovl"

    class Unregistered(WinCLIP):
        pass

    assert method_name(Unregistered) is None  # a subclass is not its parent's method
    with pytest.raises(AnovlError, match="unknown method 'winclp'; did you mean winclip"):
        create_method("winclp")


def test_register_method_checks_the_name_and_the_class(monkeypatch):
    monkeypatch.setattr("anovl.models.registry.METHODS", Registry("method"))
    with pytest.raises(AnovlError, match="lower case"):
        register_method("My Method")
    with pytest.raises(AnovlError, match="needs an AnomalyModel subclass"):
        register_method("plain")(object)

    @register_method("toy")
    class Toy(AnomalyModel):
        pass

    assert "toy" not in METHODS and Toy.__name__ == "Toy"  # went into the patched registry only


def constructor_defaults(cls: type) -> dict:
    """A class's constructor defaults as they read in a printed config (tuples are YAML lists)."""
    parameters = inspect.signature(cls).parameters.values()
    return {p.name: json.loads(json.dumps(p.default)) for p in parameters if p.default is not p.empty}


@pytest.mark.parametrize("method", ["anovl", "winclip", "aprilgan", "anomalyclip"])
@pytest.mark.parametrize("given", ["--model", "config file", "inline name", "a setting first"])
def test_a_chosen_method_gets_its_own_defaults(method, given, tmp_path, monkeypatch):
    # The CLI's default model (AnoVL) is no parser default: jsonargparse would keep its backbone, pretrained,
    # image_size and layers for another method chosen later, in place of that method's own defaults.
    monkeypatch.setattr(sys, "argv", ["anovl"])
    config = tmp_path / "method.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": method}}))
    choice = {
        "--model": ["--model", method],
        "config file": ["--config", str(config)],
        "inline name": ["--config", f"model: {method}"],
        "a setting first": ["--model.init_args.init_seed", "3", "--model", method],  # a given setting carries over
    }
    model = resolved_config(["test", *choice[given], "--data", "anovl.data.SyntheticMVTecDataModule"])["model"]
    setting = {"init_seed": 3} if given == "a setting first" else {}
    assert model["init_args"] == {**constructor_defaults(METHODS.lookup(method)), **setting}


@pytest.mark.parametrize(
    "arguments, given",
    [
        ([], {}),
        (["--config", "data: {init_args: {batch_size: 2}}"], {}),
        (["--config", "model: {init_args: {num_views: 3}}"], {"num_views": 3}),  # settings, but no class
        (["--model.init_args.num_views", "3"], {"num_views": 3}),
    ],
)
def test_without_a_model_named_anywhere_anovl_runs_with_its_defaults(arguments, given, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["anovl"])
    model = resolved_config(["test", *arguments, "--data", "anovl.data.SyntheticMVTecDataModule"])["model"]
    assert model["class_path"] == "anovl.models.AnoVL"
    assert model["init_args"] == {**constructor_defaults(AnoVL), **given}


def test_the_default_model_is_added_only_where_no_class_is_chosen_first(tmp_path):
    config = tmp_path / "aprilgan.yaml"
    config.write_text("model: {class_path: aprilgan}\n")
    chosen = (["--model", "winclip"], ["--model.class_path=winclip"], ["--config", str(config)], ["-c", "model: x.Y"])
    for arguments in chosen:
        command = ["test", *arguments, "--model.init_args.k_shot", "2"]
        assert with_default_model(command) == command
    default = ["--model", "anovl.models.AnoVL"]
    for arguments in (
        [],
        ["--model.init_args.num_views", "3", "--model", "winclip"],
        ["--config", "model: {init_args: {}}"],
    ):
        assert with_default_model(["fit", *arguments]) == ["fit", *default, *arguments]


def test_a_class_of_a_plugin_imported_again_keeps_its_method_name(tmp_path, monkeypatch):
    monkeypatch.setattr("anovl.models.registry.METHODS", Registry("method"))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    plugin = tmp_path / "reimported_toy_method.py"
    plugin.write_text(
        "from anovl.models.base import AnomalyModel\n"
        "from anovl.models.registry import register_method\n\n\n"
        '@register_method("reimported")\n'
        "class Reimported(AnomalyModel):\n"
        "    pass\n"
    )
    load_plugin(str(plugin))
    first = sys.modules["reimported_toy_method"].Reimported
    with pytest.warns(UserWarning, match="method 'reimported' was registered before"):
        load_plugin(str(plugin))  # run again, as a notebook cell: a new class object under the same name
    again = sys.modules["reimported_toy_method"].Reimported
    assert again is not first and method_name(again) == "reimported"
    assert method_name(first) == "reimported"  # a model built before the re-import is still named

    class Reimported(AnomalyModel):  # a class of the same name in another module is not the method
        pass

    assert method_name(Reimported) is None


@pytest.fixture(scope="module")
def one_category(tmp_path_factory):
    return generate_mvtec_like(tmp_path_factory.mktemp("one"), ("widget",), n_good=2, n_defect=1, image_size=64)


def test_short_names_on_the_command_line_and_in_configs_and_resuming_an_old_record(one_category, tmp_path, capsys):
    config = tmp_path / "winclip.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "winclip", "init_args": {"scales": [2]}}}))
    base = [
        "test",
        "--data",
        "anovl.data.MVTecDataModule",
        "--data.init_args.root",
        one_category,
        "--trainer.logger.init_args.save_dir",
        tmp_path,
        *WINCLIP_TINY,
    ]
    status, _, stderr = run_main([*base, "--config", config], capsys)
    assert status == 0, stderr
    (run,) = (tmp_path / "anovl").iterdir()
    document = json.loads((run / "results.json").read_text())
    assert document["config"]["model"]["method"] == "winclip" and "class_path" not in document["config"]["model"]
    assert document["config"]["model"]["scales"] == [2]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "anovl.models.winclip.torch_model.WinCLIP"  # resolvable as written

    # What versions before the registry wrote: the class path instead of the name. It still resumes.
    record = document["config"]["model"]
    document["config"]["model"] = {
        "class_path": "anovl.models.winclip.torch_model.WinCLIP",
        **{key: value for key, value in record.items() if key != "method"},
    }
    (run / "results.json").write_text(json.dumps(document))
    status, stdout, stderr = run_main(
        [*base, "--model", "winclip", "--model.init_args.scales", "[2]", "--resume", run], capsys
    )
    assert status == 0, stderr
    assert "widget" in stdout and json.loads((run / "results.json").read_text()) == document  # nothing left to run

    # Another method's class path in the record is refused.
    document["config"]["model"]["class_path"] = "anovl.models.anovl.torch_model.AnoVL"
    (run / "results.json").write_text(json.dumps(document))
    status, _, stderr = run_main([*base, "--model=winclip", "--model.init_args.scales", "[2]", "--resume", run], capsys)
    assert_one_error_line(status, stderr, "cannot resume", 'model.method: "anovl" in the run, "winclip" now')


@pytest.mark.parametrize("where", ["command line", "config"])
def test_an_unknown_short_name_fails_in_one_line(where, one_category, tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("model: winclp\n")
    given = ["--model", "winclp"] if where == "command line" else ["--config", config]
    status, _, stderr = run_main(["test", *given, "--data.init_args.root", one_category], capsys)
    assert_one_error_line(status, stderr, "unknown method 'winclp'; did you mean winclip?")


def test_results_json_names_an_unregistered_method_by_class_path(tmp_path):
    from anovl.models.registry import method_record

    class Local(WinCLIP):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert method_record(Local(TINY, pretrained=None)) == {
            "class_path": f"{__name__}.test_results_json_names_an_unregistered_method_by_class_path.<locals>.Local"
        }


@pytest.mark.parametrize(
    "arguments, note",
    [
        # A dataset config's AnoVL settings, then another method: what carries over and what is dropped is named.
        (
            [
                "--config",
                "model: {class_path: anovl, init_args: {backbone: my-vit, num_views: 3}}",
                "--model",
                "aprilgan",
            ],
            "settings given for AnoVL carry over to AprilGAN: backbone=my-vit; dropped (AprilGAN takes none of them): "
            "num_views.",
        ),
        (["--model.init_args.init_seed", "3", "--model", "winclip"], "carry over to WinCLIP: init_seed=3."),
        # Given again after the method is chosen, only the earlier method's own, or all for one method: no note.
        (["--config", "model: {class_path: anovl, init_args: {num_views: 3}}", "--model", "aprilgan"], None),
        (
            ["--config", "model: {class_path: anovl, init_args: {image_size: 96}}", "--model.init_args.num_views", "3"],
            None,
        ),
        (["--model", "anovl", "--model.init_args.backbone", "x", "--model", "winclip", "--model.backbone", "y"], None),
    ],
)
def test_settings_given_for_another_method_are_named_when_they_carry_over(arguments, note, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["anovl"])
    command_line = method_arguments(with_default_model(["test", *arguments]))
    model = resolved_config(["test", *arguments, "--data", "anovl.data.SyntheticMVTecDataModule"])["model"]
    said = settings_of_another_class(model_settings_by_class(command_line), Namespace(model))
    assert said == note if note is None else note in said
