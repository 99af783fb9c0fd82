"""Plugins: a user's own method, adapter or category from their own module, usable from `anovl test`."""

import importlib.metadata
import json
import sys
import textwrap

import pytest
import torch
import yaml

from anovl import plugins
from anovl.cli import main, plugin_specs
from anovl.errors import AnovlError
from anovl.models.anovl import ADAPTERS
from anovl.models.components.scoring import patch_map
from tests.test_cli import REPO
from tests.test_reliability_input import assert_one_error_line, prepare_in_process_cli, run_main, text_cache  # noqa: F401

PATCH_NORM = REPO / "examples" / "plugins" / "patch_norm.py"
TINY = [
    "--model.init_args.backbone",
    "anovl-tiny-vit",
    "--model.init_args.image_size",
    "64",
    "--trainer.enable_progress_bar",
    "false",
]


@pytest.fixture
def data_root(tmp_path):
    from anovl.data import generate_mvtec_like

    return generate_mvtec_like(tmp_path / "data", ("fabric", "widget"), n_good=2, n_defect=1, image_size=64)


@pytest.fixture(autouse=True)
def _forget_plugin_modules(monkeypatch):
    # Plugins register into process-wide tables; each test starts and ends with the same ones.
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.setattr(plugins, "entry_points", lambda group: [])
    for name in list(ADAPTERS):
        monkeypatch.setitem(ADAPTERS, name, ADAPTERS[name])
    yield
    for name in set(ADAPTERS) - {"text", "linear", "lowrank"}:
        ADAPTERS.pop(name)


def test_toy_method_runs_from_yaml_with_its_label(data_root, tmp_path, capsys, monkeypatch, text_cache):  # noqa: F811
    prepare_in_process_cli(monkeypatch, text_cache)
    monkeypatch.chdir(REPO)  # the config names the plugin file relative to the repository
    status, stdout, stderr = run_main(
        [
            "test",
            "--config",
            "examples/plugins/patch_norm.yaml",
            *TINY,
            "--data.init_args.root",
            str(data_root),
            "--data.init_args.generate",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ],
        capsys,
    )
    assert status == 0, stderr
    (run,) = (tmp_path / "patch_norm").iterdir()
    document = json.loads((run / "results.json").read_text())
    assert document["label"] == "PatchNorm[backbone=anovl-tiny-vit;image_size=64;init_seed=0;pretrained=None]"
    assert document["title"].startswith("PatchNorm[") and document["config"]["model"]["method"] == "patchnorm"
    assert [row["category"] for row in document["categories"]] == ["fabric", "widget"]
    assert yaml.safe_load((run / "config.yaml").read_text())["plugins"] == ["examples/plugins/patch_norm.py"]

    # The toy's map is what its docstring says, computed here from the encoder alone.
    module = sys.modules["patch_norm"]
    model = module.PatchNorm("anovl-tiny-vit", pretrained=None, image_size=64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        norms = model.encoder(images).patch_tokens[0].norm(dim=-1)
    expected = ((norms - norms.mean(1, keepdim=True)) / norms.std(1, keepdim=True)).sigmoid()
    output = model(images, ["widget", "widget"])
    torch.testing.assert_close(output.anomaly_map, patch_map(expected, 64))
    torch.testing.assert_close(output.pred_score, expected.max(1).values)


ADAPTER_PLUGIN = """
    import torch.nn.functional as F
    from anovl import register_adapter
    from anovl.models.anovl.adapters import Adapter, BatchedLinear

    @register_adapter("scaled-linear")
    class ScaledLinear(Adapter):
        def __init__(self, dim, sentences, generators, scale: float = 0.5):
            super().__init__(dim, sentences, generators)
            self.scale = scale
            self.linear = BatchedLinear(self.batch, dim, dim, device=sentences.device)
            self.reset_parameters(generators)

        def forward(self, x):
            return x + self.scale * self.linear(F.normalize(x, dim=-1))
"""


@pytest.mark.parametrize("how", ["option", "environment"])
def test_user_adapter_is_selectable_from_anovl_test(how, data_root, tmp_path, capsys, monkeypatch, text_cache):  # noqa: F811
    prepare_in_process_cli(monkeypatch, text_cache)
    plugin = tmp_path / "my_adapters.py"
    plugin.write_text(textwrap.dedent(ADAPTER_PLUGIN))
    args = [
        "test",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        *TINY,
        "--model.init_args.num_views",
        "1",
        "--model.init_args.tta",
        '{"adapter": "scaled-linear", "adapter_args": {"scale": 0.25}, "steps": 1}',
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.generate",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    if how == "option":
        args += ["--plugins", f"[{plugin}]"]
    else:
        monkeypatch.setenv("ANOVL_PLUGINS", str(plugin))
    status, _, stderr = run_main(args, capsys)
    assert status == 0, stderr
    (results,) = (tmp_path / "runs").glob("demo/*/results.json")
    label = json.loads(results.read_text())["label"]
    assert label.startswith("AnoVL-tta-scaled-linear[") and "scale=0.25" in label
    saved = yaml.safe_load((results.parent / "config.yaml").read_text())
    assert saved["plugins"] == ([str(plugin)] if how == "option" else [])


def test_plugin_specs_come_from_options_and_config_files(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("plugins: [my_pkg.models, ./local.py]\nmodel: {class_path: my_pkg.models.M}\n")
    assert plugin_specs(["test", "--config", str(config), "--plugins", "[other]", "--plugins=third"]) == [
        "my_pkg.models",
        "./local.py",
        "other",
        "third",
    ]
    assert plugin_specs(["test", "--config", str(tmp_path / "missing.yaml")]) == []


def test_plugin_specs_come_from_inline_and_repeated_configs(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("plugins: [a.py]\n")
    second.write_text("plugins: [b]\n")
    inline = yaml.safe_dump({"plugins": ["c.py"], "model": {"init_args": {"backbone": "my-vit"}}})
    assert plugin_specs(
        [
            "test",
            "-c",
            str(first),
            "--config",
            inline,
            f"--config={second}",
            "--config",
            "[not, a, map]",
            "--config",
            "plugins: [a.py, d]",
        ]
    ) == ["a.py", "c.py", "b", "d"]


# A backbone name no other test registers: model configs are registered process-wide (test_engine.py uses my-vit).
MY_VIT_PLUGIN = f"""
    import json
    from anovl import register_model_config

    register_model_config(json.load(open({str(REPO / "anovl" / "model_configs" / "anovl-tiny-vit.json")!r})), name="inline-plugin-vit")
"""


def test_inline_configs_import_their_plugins_and_the_run_records_them_all(
    data_root, tmp_path, capsys, monkeypatch, text_cache
):  # noqa: F811
    prepare_in_process_cli(monkeypatch, text_cache)
    plugin = tmp_path / "my_vit.py"
    plugin.write_text(textwrap.dedent(MY_VIT_PLUGIN))
    (tmp_path / "other.py").write_text("")
    common = [
        "test",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        *TINY,
        "--model.init_args.num_views",
        "1",
        "--data.init_args.root",
        str(data_root),
        "--data.init_args.generate",
        "false",
        "--data.init_args.categories",
        "[widget]",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    # Before: an inline config's plugins were not imported, and the backbone they register was "unknown".
    status, _, stderr = run_main(
        [
            *common,
            "--config",
            yaml.safe_dump({"plugins": [str(tmp_path / "other.py")]}),
            "--model.init_args.backbone",
            "inline-plugin-vit",
        ],
        capsys,
    )
    assert_one_error_line(
        status, stderr, "unknown backbone 'inline-plugin-vit'", f"plugins loaded: {tmp_path / 'other.py'}"
    )
    status, _, stderr = run_main(
        [
            *common,
            "--config",
            yaml.safe_dump({"plugins": [str(tmp_path / "other.py")]}),
            "--config",
            yaml.safe_dump({"plugins": [str(plugin)]}),
            "--model.init_args.backbone",
            "inline-plugin-vit",
        ],
        capsys,
    )
    assert status == 0, stderr
    (config,) = (tmp_path / "runs").glob("demo/*/config.yaml")
    saved = yaml.safe_load(config.read_text())
    assert saved["model"]["init_args"]["backbone"] == "inline-plugin-vit"
    # A later config's plugins: replaces an earlier one's in the parsed config; the record keeps both.
    assert saved["plugins"] == [str(tmp_path / "other.py"), str(plugin)]


def test_a_missing_class_names_the_plugins_loaded(tmp_path, capsys, monkeypatch, text_cache):  # noqa: F811
    prepare_in_process_cli(monkeypatch, text_cache)
    (tmp_path / "other.py").write_text("")
    status, _, stderr = run_main(
        [
            "test",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--config",
            f"{{plugins: [{tmp_path / 'other.py'}], model: {{class_path: patch_norm.PatchNorm}}}}",
        ],
        capsys,
    )
    assert status == 2 and "patch_norm.PatchNorm" in stderr and f"(plugins loaded: {tmp_path / 'other.py'})" in stderr


def test_model_help_may_come_before_plugins(capsys, monkeypatch, text_cache):  # noqa: F811
    prepare_in_process_cli(monkeypatch, text_cache)
    status, stdout, stderr = run_main(
        ["test", "--model.help", "patch_norm.PatchNorm", "--plugins", f"[{PATCH_NORM}]"], capsys
    )
    assert status == 0, stderr
    assert "Help for --model.help=patch_norm.PatchNorm" in stdout and "--model.backbone" in stdout


def test_entry_point_plugins_are_imported(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "anovl_fake_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "anovl_fake_plugin-1.0.dist-info" / "METADATA").write_text("Name: anovl-fake-plugin\nVersion: 1.0\n")
    (site / "anovl_fake_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[anovl.plugins]\nfake = anovl_fake_plugin\n"
    )
    (site / "anovl_fake_plugin.py").write_text(
        "from anovl.categories import register_category\nregister_category('fake_felt', 'felt', 'texture')\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "entry_points", importlib.metadata.entry_points)
    assert "anovl_fake_plugin" in plugins.load_plugins()
    from anovl.categories import category_info

    assert category_info("fake_felt").domain == "texture"


def test_registering_again_replaces_with_a_warning(tmp_path):
    plugin = tmp_path / "twice.py"
    plugin.write_text(textwrap.dedent(ADAPTER_PLUGIN))
    plugins.load_plugin(str(plugin))
    first = ADAPTERS["scaled-linear"]
    with pytest.warns(UserWarning, match="'scaled-linear' was registered before"):
        plugins.load_plugin(str(plugin))  # a notebook cell run twice
    assert ADAPTERS["scaled-linear"] is not first


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_plugin_module", "plugin module 'no_such_plugin_module' not found"),
        ("/no/such/plugin.py", "plugin file not found"),
    ],
)
def test_missing_plugins_are_one_line_errors(spec, message, tmp_path, capsys):
    with pytest.raises(AnovlError, match=message):
        plugins.load_plugin(spec)
    status, _, stderr = run_main(
        ["test", "--config", str(REPO / "configs" / "demo.yaml"), "--plugins", f"[{spec}]"], capsys
    )
    assert_one_error_line(status, stderr, message)


def test_a_model_that_is_not_an_anomaly_model_is_refused(tmp_path, capsys):
    status, _, stderr = run_main(
        ["test", "--config", str(REPO / "configs" / "demo.yaml"), "--model.class_path", "torch.nn.Linear"], capsys
    )
    assert status == 2 and "Traceback" not in stderr and "AnomalyModel" in stderr
