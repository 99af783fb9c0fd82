"""Export (ONNX, OpenVINO IR, TorchScript) and the exported-model inferencer against AnoVL's own forward."""

import json
import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from anovl import AnoVL, AnovlError, TTAConfig
from anovl.cli import main
from anovl.data.transforms import normalize, resize_image
from anovl.deploy import ExportClass, ExportedModel, Sidecar, export_model, load_exported, sidecar_path
from anovl.deploy.export_cli import model_from_config
from anovl.models.base import AnomalyModel
from anovl.results import METRIC_TITLES, ResultsTable
from tests.conftest import TINY

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

CLASSES = ["bottle", "macaroni1", "part_a=screw"]  # the registry's prompt name, and one given
PROMPT_NAMES = {"bottle": "bottle", "macaroni1": "macaroni", "part_a": "screw"}
FORMATS = ["onnx", "openvino", "torchscript"]
TOLERANCE = 1e-4


def tiny(num_views: int, **kwargs) -> AnoVL:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AnoVL(TINY, pretrained=None, num_views=num_views, **kwargs)


@pytest.fixture(scope="module", params=[1, 22], ids=["1view", "22views"])
def exported(request, tmp_path_factory):
    """A tiny AnoVL and its three exports for CLASSES, built once per number of views."""
    model = tiny(request.param)
    folder = tmp_path_factory.mktemp(f"export{request.param}")
    paths = {fmt: export_model(model, CLASSES, folder / "tiny", fmt) for fmt in FORMATS}
    return model, paths


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_model_equals_anovl(exported, fmt):
    model, paths = exported
    runner = load_exported(paths[fmt])
    assert isinstance(runner, AnomalyModel)
    # Mixed classes in one batch, a batch size the export never saw, and a single image.
    for batch, categories in ((images(3), ["part_a", "bottle", "macaroni1"]), (images(1, seed=1), ["bottle"])):
        reference = model(batch, categories, [PROMPT_NAMES[category] for category in categories])
        output = runner(batch, categories)
        assert output.anomaly_map.shape == reference.anomaly_map.shape
        assert torch.allclose(output.anomaly_map, reference.anomaly_map, atol=TOLERANCE, rtol=0)
        assert torch.allclose(output.pred_score, reference.pred_score, atol=TOLERANCE, rtol=0)
    # The baked-in classes really differ: the same image under two classes gives two different maps.
    two = runner(images(1).expand(2, -1, -1, -1), ["bottle", "part_a"]).anomaly_map
    assert (two[0] - two[1]).abs().max() > 1e-3


def test_openvino_runs_the_onnx_file_too(exported):
    model, paths = exported
    batch = images(2)
    onnx_on_openvino = ExportedModel(paths["onnx"], backend="openvino")(batch, ["bottle", "bottle"])
    reference = model(batch, ["bottle", "bottle"])
    assert torch.allclose(onnx_on_openvino.anomaly_map, reference.anomaly_map, atol=TOLERANCE, rtol=0)


def test_sidecar_records_preprocessing_classes_and_views(exported):
    model, paths = exported
    record = json.loads(sidecar_path(paths["onnx"]).read_text())
    assert record["preprocessing"] == {
        "image_size": 64,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bilinear",
    }
    assert [(c["category"], c["prompt_name"]) for c in record["classes"]] == [
        ("bottle", "bottle"),
        ("macaroni1", "macaroni"),
        ("part_a", "screw"),
    ]
    assert record["num_views"] == model.num_views and record["settings"]["num_views"] == model.num_views
    assert record["format"] == "onnx" and record["label"].startswith("AnoVL")
    runner = load_exported(paths["onnx"])
    assert runner.preprocessing().image_size == 64 and runner.classes == ["bottle", "macaroni1", "part_a"]
    assert runner.settings() == record["settings"] and runner.label == record["label"]
    assert record["map_range"] == 1.0 and runner.map_range == model.map_range == 1.0  # AnoVL's probabilities


def test_sidecar_map_range_defaults_to_1_and_is_checked(tmp_path):
    """The range of the maps (pictures are coloured on it): a sidecar written before it was recorded means 1."""
    written = Sidecar("onnx", 64, [ExportClass("bottle", "bottle")], 1, "AnoVL", {}, map_range=3.0).to_json()
    path = tmp_path / "m.onnx.json"
    path.write_text(written)
    assert Sidecar.read(path).map_range == 3.0
    old = json.loads(written)
    del old["map_range"]
    path.write_text(json.dumps(old))
    assert Sidecar.read(path).map_range == 1.0
    for bad in (0.0, -1.0, "3", 1e9):
        path.write_text(json.dumps({**old, "map_range": bad}))
        with pytest.raises(AnovlError, match="not an anovl export record"):
            Sidecar.read(path)


def test_fewer_views_than_the_model_are_exported(tmp_path):
    model_22, model_1 = tiny(22), tiny(1)
    path = export_model(model_22, ["bottle"], tmp_path / "one.pt", "torchscript", num_views=1)
    batch = images(2)
    output = load_exported(path)(batch, ["bottle", "bottle"])
    assert torch.allclose(output.pred_score, model_1(batch, ["bottle", "bottle"]).pred_score, atol=TOLERANCE, rtol=0)
    assert not torch.allclose(output.pred_score, model_22(batch, ["bottle", "bottle"]).pred_score, atol=TOLERANCE)
    assert model_22.num_views == 22  # the model itself is left as it was
    assert Sidecar.read(sidecar_path(path)).num_views == 1


def test_predict_applies_the_preprocessing(exported, tmp_path):
    model, paths = exported
    rgb = (np.random.default_rng(0).random((50, 90, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    runner = load_exported(paths["openvino"])
    result = runner.predict(tmp_path / "photo.png", "macaroni1")
    expected = model(normalize(resize_image(rgb, (64, 64))).unsqueeze(0), ["macaroni1"])
    assert result.anomaly_map.shape == (64, 64) and result.image.shape == (64, 64, 3)
    assert np.abs(result.anomaly_map - expected.anomaly_map[0].numpy()).max() < TOLERANCE
    assert abs(result.pred_score - float(expected.pred_score[0])) < TOLERANCE
    assert result.pred_label is None and result.pred_mask is None  # no thresholds recorded


def test_unknown_class_and_other_prompt_name_are_refused(exported):
    _, paths = exported
    runner = load_exported(paths["onnx"])
    with pytest.raises(AnovlError, match="'carpet' was not exported.*bottle, macaroni1, part_a"):
        runner(images(2), ["bottle", "carpet"])
    with pytest.raises(AnovlError, match="exported with the prompt name 'screw'"):
        runner(images(1), ["part_a"], ["part_a"])
    with pytest.raises(AnovlError, match="B×3×64×64"):
        runner(torch.zeros(1, 3, 32, 32), ["bottle"])


def test_tta_cannot_be_exported(tmp_path):
    model = tiny(1, tta=TTAConfig())
    with pytest.raises(AnovlError, match="test-time adaptation .* cannot be exported"):
        export_model(model, ["bottle"], tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "classes, fmt, output, message",
    [
        ([], "onnx", "m.onnx", "at least one class"),
        (["bottle", "bottle"], "onnx", "m.onnx", "repeated: bottle"),
        (["=x"], "onnx", "m.onnx", "has no name"),
        (["bottle"], "tflite", "m.onnx", "unknown export format 'tflite'"),
        (["bottle"], "onnx", "m.xml", r"written as \*.onnx"),
        ([ExportClass("bottle", "bottle", image_threshold=1.5e7)], "onnx", "m.onnx", "must be a number in"),
    ],
)
def test_bad_export_requests(tmp_path, classes, fmt, output, message):
    with pytest.raises(AnovlError, match=message):
        export_model(tiny(1), classes, tmp_path / output, fmt)


def test_bad_exported_files(tmp_path, exported):
    _, paths = exported
    with pytest.raises(AnovlError, match="not found"):
        load_exported(tmp_path / "missing.onnx")
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(paths["onnx"].read_bytes())
    with pytest.raises(AnovlError, match="sidecar .* is missing"):
        load_exported(lonely)
    sidecar_path(lonely).write_text("{not json")
    with pytest.raises(AnovlError, match="not an anovl export record"):
        load_exported(lonely)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"garbage")
    sidecar_path(broken).write_text(sidecar_path(paths["onnx"]).read_text())
    with pytest.raises(AnovlError, match="cannot load .* with onnxruntime"):
        load_exported(broken)
    with pytest.raises(AnovlError, match="torch backend cannot run"):
        ExportedModel(paths["onnx"], backend="torch")


def write_config(tmp_path, **init_args):
    """A config in the layout of configs/demo.yaml."""
    config = {
        "model": {
            "class_path": "anovl.models.AnoVL",
            "init_args": {"backbone": TINY, "pretrained": None, "num_views": 22, "init_seed": 3, **init_args},
        },
        "data": {"class_path": "anovl.data.SyntheticMVTecDataModule", "init_args": {"root": "x"}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_export_command(tmp_path):
    config = write_config(tmp_path)
    results = tmp_path / "run"
    # A test run's results.json, with the F1-max thresholds `anovl test` saves.
    table = ResultsTable(results, "a run", True, 2, "AnoVL-tfa")
    metrics = {name: 0.5 for name in METRIC_TITLES}
    table.add("bottle", {**metrics, "image_f1max_threshold": 0.42, "pixel_f1max_threshold": 0.61}, 4)
    table.add("cable", {**metrics, "image_f1max_threshold": 0.5, "pixel_f1max_threshold": 0.5}, 4)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "export",
                "--config",
                str(config),
                "--classes",
                "bottle",
                "screw",
                "--format",
                "onnx",
                "--num-views",
                "1",
                "--output",
                str(tmp_path / "out" / "m"),
                "--thresholds",
                str(results),
                "--model.init_args.image_size",
                "64",
            ]
        )
    assert exit_info.value.code == 0
    runner = load_exported(tmp_path / "out" / "m.onnx")
    assert runner.thresholds("bottle") == (0.42, 0.61)
    assert runner.thresholds("screw") == pytest.approx((0.46, 0.555))  # a class the run lacks: the run's mean
    # The model is the config's: its random weights come from its init_seed, as in `anovl test`.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = AnoVL(TINY, pretrained=None, num_views=1, init_seed=3)
    batch = images(2)
    assert torch.allclose(
        runner(batch, ["bottle", "screw"]).anomaly_map,
        reference(batch, ["bottle", "screw"]).anomaly_map,
        atol=TOLERANCE,
        rtol=0,
    )
    result = runner.predict(np.full((64, 64, 3), 128, np.uint8), "bottle")
    assert result.pred_label == (result.pred_score >= 0.42)
    assert np.array_equal(result.pred_mask, result.anomaly_map >= 0.61)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--config", "missing.yaml"], "config file not found"),
        (["--model.init_args.tta", "{adapter: text}"], "test-time adaptation"),
        (["--model.init_args.num_view", "3"], "bad model settings"),
        (["--model.init_args.num_views"], "needs a value"),
        (["--modle.pretrained", "x"], "unknown argument '--modle.pretrained'"),
        (["--model.init_args.pretrained", "missing.pt"], "weights file not found"),
        (["--thresholds", "nowhere"], "--thresholds: nowhere not found"),
    ],
)
def test_export_command_errors_are_one_line(tmp_path, capsys, arguments, message):
    config = write_config(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["export", "--config", str(config), "--classes", "bottle", "--output", str(tmp_path / "m.onnx"), *arguments]
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("anovl: error:") and message in error and "\n" not in error
    assert not (tmp_path / "m.onnx").exists()


def test_model_from_config_takes_the_plain_model_class_path():
    model = model_from_config(
        {
            "model": {
                "class_path": "anovl.models.AnoVL",
                "init_args": {"backbone": TINY, "pretrained": None, "num_views": 5},
            }
        }
    )
    assert isinstance(model, AnoVL) and model.num_views == 5
    # Configs saved by earlier anovl versions name the Lightning module, with its framework-only options.
    legacy = model_from_config(
        {
            "model": {
                "class_path": "anovl.models.anovl.lightning_model.AnoVLModule",
                "init_args": {"backbone": TINY, "pretrained": None, "max_pictures": 3},
            }
        }
    )
    assert isinstance(legacy, AnoVL)
    with pytest.raises(AnovlError, match="only AnoVL models can be exported"):
        model_from_config({"model": {"class_path": "torch.nn.Linear", "init_args": {}}})
    with pytest.raises(AnovlError, match="bad model settings"):
        model_from_config({"model": {"class_path": "anovl.models.AnoVL", "init_args": {"max_pictures": 3}}})


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_backbone_parity(tmp_path, fmt):
    """ViT-B-16-plus-240 (random weights: parity does not need real ones), 22 views. Run with -m slow."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AnoVL("ViT-B-16-plus-240", pretrained=None, num_views=22)
    runner = load_exported(export_model(model, ["bottle", "screw"], tmp_path / "vitb", fmt))
    batch = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    reference, output = model(batch, ["screw", "bottle"]), runner(batch, ["screw", "bottle"])
    assert torch.allclose(output.anomaly_map, reference.anomaly_map, atol=TOLERANCE, rtol=0)
    assert torch.allclose(output.pred_score, reference.pred_score, atol=TOLERANCE, rtol=0)


def test_predict_with_an_exported_model_writes_what_predict_writes(tmp_path, capsys, monkeypatch):
    from anovl.data import generate_mvtec_like
    from tests.test_cli import CONFIGS, TINY_MODEL

    monkeypatch.setenv("ANOVL_CACHE_DIR", str(tmp_path / "cache"))
    data = generate_mvtec_like(tmp_path / "data", ("fabric", "widget"), n_good=1, n_defect=1, image_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AnoVL(TINY, pretrained=None, image_size=64, num_views=2)  # the demo config with TINY_MODEL
    exported_file = export_model(model, ["fabric", "widget"], tmp_path / "export" / "tiny", "onnx")
    scores = {}
    for name, extra in (("eager", []), ("exported", ["--exported", str(exported_file)])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main(
                [
                    "predict",
                    "--config",
                    str(CONFIGS / "demo.yaml"),
                    *TINY_MODEL,
                    *extra,
                    "--data.init_args.root",
                    str(data),
                    "--data.init_args.generate",
                    "false",
                    "--predictions.output_dir",
                    str(tmp_path / name),
                    "--trainer.logger.init_args.save_dir",
                    str(tmp_path / "runs"),
                ]
            )
        rows = (tmp_path / name / "scores.csv").read_text().splitlines()
        header = rows[0].split(",")
        scores[name] = {row.split(",")[0]: float(row.split(",")[header.index("score")]) for row in rows[1:]}
    assert scores["eager"].keys() == scores["exported"].keys() and len(scores["eager"]) == 10
    for path, score in scores["eager"].items():
        assert abs(scores["exported"][path] - score) <= TOLERANCE
