"""Several methods behind one interface: AnoVL TFA, AnoVL with TTA and WinCLIP run on the same data through
`anovl test`, and `anovl compare` shows them side by side under distinct labels."""

import json

import pytest
import torch

from anovl.cli import main
from anovl.data import generate_mvtec_like
from anovl.engine import AnomalyModule
from anovl.errors import AnovlError
from anovl.io import markdown_cell
from anovl.models import AnoVL, WinCLIP
from anovl.models.base import AnomalyModel, ModelOutput, make_label, setting_differences
from tests.test_cli import CONFIGS, TINY_MODEL

METHODS = {
    "tfa": [*TINY_MODEL],
    "tta": ["--config", str(CONFIGS / "tta" / "text.yaml"), *TINY_MODEL],
    # WinCLIP takes over the demo's backbone settings; it has no views.
    "winclip": [
        "--model",
        "anovl.models.WinCLIP",
        "--model.init_args.backbone",
        "anovl-tiny-vit",
        "--model.init_args.image_size",
        "64",
        "--trainer.enable_progress_bar",
        "false",
    ],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = generate_mvtec_like(
        tmp_path_factory.mktemp("data"), ("fabric", "widget"), n_good=2, n_defect=1, image_size=64
    )
    save_dir = tmp_path_factory.mktemp("runs")
    folders = {}
    for name, extra in METHODS.items():
        main(
            [
                "test",
                "--config",
                str(CONFIGS / "demo.yaml"),
                *extra,
                "--data.init_args.root",
                str(data),
                "--data.init_args.generate",
                "false",
                "--trainer.logger.init_args.save_dir",
                str(save_dir),
                "--trainer.logger.init_args.name",
                name,
            ]
        )
        (folders[name],) = (save_dir / name).iterdir()
    return folders


def test_three_methods_run_and_compare_under_distinct_labels(runs, tmp_path, capsys):
    documents = {name: json.loads((folder / "results.json").read_text()) for name, folder in runs.items()}
    labels = {name: document["label"] for name, document in documents.items()}
    assert labels["tfa"].startswith("AnoVL-tfa[") and labels["tta"].startswith("AnoVL-tta-text[")
    assert labels["winclip"].startswith("WinCLIP[")
    assert len(set(labels.values())) == 3
    for name, document in documents.items():
        assert document["title"].startswith(labels[name]) and document["complete"]
    assert documents["winclip"]["config"]["model"]["method"] == "winclip"

    output = tmp_path / "comparison.md"
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *(str(folder) for folder in runs.values()), "--output", str(output)])
    assert exit_info.value.code == 0
    table = output.read_text()
    shown = {name: markdown_cell(label) for name, label in labels.items()}  # brackets escaped in Markdown
    assert f"| category | {shown['tfa']} | {shown['tta']} | {shown['winclip']} |" in table

    with pytest.raises(SystemExit):
        main(
            [
                "compare",
                *(str(folder) for folder in runs.values()),
                "--labels",
                "TFA",
                "TTA",
                "WinCLIP",
                "--output",
                str(output),
            ]
        )
    assert "| category | TFA | TTA | WinCLIP |" in output.read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *(str(folder) for folder in runs.values()), "--labels", "TFA", "TFA", "WinCLIP"])
    assert exit_info.value.code == 2 and "--labels needs 3 different labels" in capsys.readouterr().err


def test_labels_name_every_setting_that_differs():
    reference = {"layers": [-1], "tta": {"lr": 0.001, "adapter_args": {}}, "num_views": 22}
    assert setting_differences(reference, reference) == {}
    # a method that keeps tuples (as its JSON record will not) names no difference for them
    assert setting_differences({**reference, "layers": (-1,)}, reference) == {}
    changed = {"layers": [0, 1, 2], "tta": {"lr": 0.01, "adapter_args": {"rank": 4}}, "num_views": 22}
    assert setting_differences(changed, reference) == {"layers": [0, 1, 2], "lr": 0.01, "rank": 4}
    assert (
        make_label("AnoVL", "tta-lowrank", setting_differences(changed, reference))
        == "AnoVL-tta-lowrank[layers=0,1,2;lr=0.01;rank=4]"
    )
    # Keys that end alike keep as much of their path as tells them apart.
    clash = setting_differences({"a": {"lr": 1}, "b": {"lr": 2}}, {"a": {"lr": 0}, "b": {"lr": 0}})
    assert clash == {"a.lr": 1, "b.lr": 2}
    # A long value is shortened to a stable hash, never dropped.
    long = setting_differences({"prompts": {"templates": ["x" * 40]}}, {"prompts": {"templates": ["y"]}})
    label = make_label("M", "", long)
    assert label.startswith("M[templates=#") and label == make_label("M", "", long)


def test_the_baseline_and_a_changed_run_never_share_a_label():
    with pytest.warns(UserWarning):
        models = [
            AnoVL("anovl-tiny-vit", pretrained=None, **kwargs)
            for kwargs in ({}, {"layers": [0, 1, 2]}, {"num_views": 1})
        ]
    labels = [model.label for model in models]
    assert len(set(labels)) == 3 and "layers=0,1,2" in labels[1] and "num_views=1" in labels[2]


class Constant(AnomalyModel):
    """A method of a few lines: every pixel scores the same."""

    method = "Constant"
    image_size = 32

    def __init__(self, value: float = 0.5):
        super().__init__()
        self.value = value

    def settings(self):
        return {"value": self.value}

    def forward(self, images, categories, prompt_names=None):
        images, _ = self.check_inputs(images, categories, prompt_names)
        return ModelOutput(
            torch.full(images.shape[:1] + images.shape[2:], self.value), torch.full(images.shape[:1], self.value)
        )


def test_a_minimal_method_gets_the_framework(tmp_path):
    module = AnomalyModule(Constant(0.25), label="const")
    assert module.label == "const" and Constant(0.25).label == "Constant[value=0.25]"
    maps, scores = module.anomaly_maps(
        {"image": torch.zeros(2, 3, 32, 48), "category": ["a", "a"], "prompt_name": ["a", "a"]}
    )
    assert maps.shape == (2, 32, 48) and torch.all(maps == 0.25) and torch.all(scores == 0.25)  # tiled for it
    with pytest.raises(AnovlError, match="must be an anovl.models.base.AnomalyModel"):
        AnomalyModule(torch.nn.Linear(2, 2))
    with pytest.raises(AnovlError, match="without '/'"):
        AnomalyModule(Constant(), label="a/b")


def test_winclip_is_a_method_like_the_others():
    assert issubclass(WinCLIP, AnomalyModel) and WinCLIP.method == "WinCLIP"
