"""Hostile and faulty cases through the CLI (`anovl test / predict / export / compare / grid`), exported models
and the app: planted links in run folders, run folders of other runs, hostile results.json, non-UTF-8 and
formula file names, unsupported files, file-size limits during export, sidecars that do not fit their graph,
decompression bombs and parallel requests. Each asserts one `anovl: error:` line (no traceback), no write
outside the run, no partial file and no silent drop, where it applies. The API cases are in test_hostile_io.py.
"""

import csv
import json
import os
import resource
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anovl import AnovlError
from anovl.data import generate_mvtec_like
from anovl.deploy import export_model, load_exported
from anovl.deploy.app import Analyzer
from anovl.deploy.sidecar import sidecar_path
from tests.conftest import TINY
from tests.test_app import model  # noqa: F401 (a fixture: the tiny AnoVL with one view)
from tests.test_cli import CONFIGS, TINY_MODEL
from tests.test_hostile_io import leftovers, outside_untouched
from tests.test_reliability_input import (
    _cli_in_process,
    assert_one_error_line,
    cli_args,  # noqa: F401 (fixtures)
    run_main,
    text_cache,
)

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_mvtec_like(
        tmp_path_factory.mktemp("hostile-data"), ("widget",), n_good=2, n_defect=1, image_size=64
    )


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.txt").write_text("precious")
    return folder


# ------------------------------------------------------------------ run folders


def test_planted_links_and_a_users_files_in_a_run_dir_are_never_written_through(data, tmp_path, outside, capsys):
    run_dir = tmp_path / "runs" / "mine"
    run_dir.mkdir(parents=True)
    (run_dir / "hparams.yaml").symlink_to(outside / "precious.txt")  # a downloaded run's planted link
    (run_dir / "config.yaml").symlink_to(outside / "created.yaml")  # dangling: would create a file outside
    (run_dir / "notes.yaml").write_text("mine")
    status, _, err = run_main(cli_args(data, tmp_path / "runs", "--run_dir", run_dir), capsys)
    assert status == 0, err
    outside_untouched(outside)
    assert (run_dir / "notes.yaml").read_text() == "mine"
    assert (run_dir / "config.1.yaml").is_file() and (run_dir / "hparams.1.yaml").is_file()
    assert json.loads((run_dir / "results.json").read_text())["complete"] is True
    assert leftovers(run_dir) == []


def test_a_users_hparams_file_in_a_run_dir_is_kept(data, tmp_path, capsys):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "hparams.yaml").write_text("my: own\n")
    status, _, err = run_main(cli_args(data, tmp_path / "runs", "--run_dir", run_dir), capsys)
    assert status == 0, err
    assert (run_dir / "hparams.yaml").read_text() == "my: own\n"
    assert "model" in (run_dir / "hparams.1.yaml").read_text()


def test_a_linked_pictures_folder_is_refused_in_one_line(data, tmp_path, outside, capsys):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "pictures").symlink_to(outside, target_is_directory=True)
    status, _, err = run_main(
        cli_args(data, tmp_path / "runs", "--run_dir", run_dir, "--pictures.max_per_category", "1"), capsys
    )
    assert_one_error_line(status, err, "symbolic link", "pictures")
    outside_untouched(outside)
    assert (run_dir / "results.json").is_file()  # the finished category's results are kept


def test_run_dir_onto_a_finished_run_with_other_settings_refuses(data, tmp_path, capsys):
    run_dir = tmp_path / "mine"
    status, _, err = run_main(cli_args(data, tmp_path / "runs", "--run_dir", run_dir), capsys)
    assert status == 0, err
    before = (run_dir / "results.json").read_bytes()
    status, _, err = run_main(
        cli_args(data, tmp_path / "runs", "--run_dir", run_dir, "--model.init_args.num_views", "3"), capsys
    )
    assert_one_error_line(status, err, "holds the results of another run", "num_views")
    assert (run_dir / "results.json").read_bytes() == before


@pytest.mark.parametrize(
    "document, fragment",
    [
        ("[" * 200_000 + "]" * 200_000, "nested more than"),
        (
            json.dumps({"title": "t", "label": "x", "random_weights": False, "categories": [], "config": [1]}),
            "config: Input should be a valid dictionary",
        ),
        (
            json.dumps(
                {"title": "t", "label": "x", "random_weights": False, "categories": [], "config": {"model": [1, 2]}}
            ),
            "config.model",
        ),
        ('{"title": "t", "title": "u"}', "the key title twice"),
    ],
)
def test_resume_of_a_hostile_results_json_is_one_line(data, tmp_path, capsys, document, fragment):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(document)
    status, _, err = run_main(cli_args(data, tmp_path / "runs", "--resume", run_dir), capsys)
    assert_one_error_line(status, err, fragment)


# ------------------------------------------------------------------ predict inputs


def predict_args(photos, tmp_path, *extra):
    return [
        "predict",
        "--config",
        REPO / "configs" / "folder.yaml",
        "--data.init_args.path",
        photos,
        *TINY_MODEL,
        "--trainer.logger.init_args.save_dir",
        tmp_path / "runs",
        "--predictions.output_dir",
        tmp_path / "out",
        "--predictions.pixel_threshold",
        "0.5",
        *extra,
    ]


def test_predict_takes_non_utf8_and_formula_names_and_names_every_skipped_file(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    names = [b"caf\xe9.png", b"=HYPERLINK(1).png", b"plain.png"]
    for name in names:
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(os.fsdecode(bytes(photos) + b"/" + name))
    (photos / "anim.gif").write_bytes(b"GIF89a")
    with pytest.warns(UserWarning, match=r"skipped: anim\.gif"):
        status, _, err = run_main(predict_args(photos, tmp_path), capsys)
    assert status == 0, err
    raw = (tmp_path / "out" / "scores.csv").read_bytes()
    assert b"caf\xe9.png" in raw  # the file's own bytes (surrogate escapes), so the row names the file
    rows = list(csv.reader(raw.decode("utf-8", "surrogateescape").splitlines()))
    assert len(rows) == 1 + len(names)
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)
    written = sorted(path.name for path in (tmp_path / "out").rglob("*_map.npy"))
    assert len(written) == len(names) and all(name.isprintable() for name in written)
    assert leftovers(tmp_path / "out") == []


def test_a_float_image_with_an_infinite_pixel_is_refused_in_one_line(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    values = np.ones((40, 40), dtype=np.float32)
    values[5, 5] = np.inf
    Image.fromarray(values, mode="F").save(photos / "scan.tiff")
    status, _, err = run_main(predict_args(photos, tmp_path), capsys)
    assert_one_error_line(status, err, "non-finite", "scan.tiff")


@pytest.mark.parametrize("value", ["1e308", "-5", "1.5e7"])
def test_predict_thresholds_out_of_range_are_one_line(tmp_path, capsys, value):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 40)).save(photos / "a.png")
    status, _, err = run_main(predict_args(photos, tmp_path, "--predictions.image_threshold", value), capsys)
    assert_one_error_line(status, err, "a number in [0, 1e+06]")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ exports


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_model(model, ["bottle", "screw"], tmp_path_factory.mktemp("export") / "m.pt", "torchscript")


def test_export_refuses_zero_views_in_one_line(tmp_path, capsys):
    status, _, err = run_main(
        [
            "export",
            "--config",
            CONFIGS / "demo.yaml",
            "--classes",
            "bottle",
            "--format",
            "torchscript",
            "--num-views",
            "0",
            "--output",
            tmp_path / "m.pt",
            "--model.init_args.backbone",
            TINY,
            "--model.init_args.image_size",
            "64",
        ],
        capsys,
    )
    assert_one_error_line(status, err, "num_views must be between 1 and")
    assert list(tmp_path.iterdir()) == []


EXPORT_UNDER_LIMIT = """
import resource, sys, warnings
import torch
from anovl import AnoVL
from anovl.cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
main(["export", "--config", sys.argv[3], "--classes", "bottle", "--format", "torchscript", "--output", sys.argv[1],
      "--model.init_args.backbone", "anovl-tiny-vit", "--model.init_args.image_size", "64",
      "--model.init_args.num_views", "1"])
"""


def test_a_re_export_over_the_file_size_limit_keeps_the_earlier_pair(exported, tmp_path):
    target = tmp_path / "m.pt"
    target.write_bytes(exported.read_bytes())
    sidecar_path(target).write_bytes(sidecar_path(exported).read_bytes())
    before = (target.read_bytes(), sidecar_path(target).read_bytes())
    limit = 64 * 1024  # far below the tiny model's size
    result = subprocess.run(
        [sys.executable, "-c", EXPORT_UNDER_LIMIT, str(target), str(limit), str(CONFIGS / "demo.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("anovl: error: cannot write")
    assert (target.read_bytes(), sidecar_path(target).read_bytes()) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.pt", "m.pt.json"]


def test_an_export_through_a_planted_link_is_refused(exported, tmp_path, outside, model):
    (tmp_path / "m.pt.json").symlink_to(outside / "precious.txt")
    with pytest.raises(AnovlError, match="symbolic link"):
        export_model(model, ["bottle"], tmp_path / "m.pt", "torchscript")
    outside_untouched(outside)
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("change", [{"image_size": 32}, {"classes": 3}])
def test_a_sidecar_that_does_not_fit_its_graph_is_one_line(exported, tmp_path, change):
    target = tmp_path / "m.pt"
    target.write_bytes(exported.read_bytes())
    record = json.loads(sidecar_path(exported).read_text())
    if "image_size" in change:
        record["preprocessing"]["image_size"] = change["image_size"]
    else:
        record["classes"] += [{"category": f"extra{index}"} for index in range(change["classes"])]
    sidecar_path(target).write_text(json.dumps(record))
    with pytest.raises(AnovlError) as error:
        load_exported(target)
    assert "does not fit the graph" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "images, fragment",
    [
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float tensors"),
        (torch.zeros(0, 3, 64, 64), "the batch is empty"),
        (torch.zeros(1, 3, 32, 32), "B×3×64×64"),
    ],
)
def test_the_inferencer_refuses_what_anovl_refuses(exported, model, images, fragment):
    exported_model = load_exported(exported)
    for refusing in (exported_model, model):
        with pytest.raises(AnovlError) as error:
            refusing(images, ["bottle"] * images.shape[0])
        assert "\n" not in str(error.value)
    with pytest.raises(AnovlError, match=fragment):
        exported_model(images, ["bottle"] * images.shape[0])


def test_the_inferencer_refuses_an_image_without_pixels(exported):
    with pytest.raises(AnovlError, match="0×0 pixels"):
        load_exported(exported).predict(np.zeros((0, 0, 3), dtype=np.uint8), "bottle")


# ------------------------------------------------------------------ the app


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares ``width × height`` (a decompression bomb's first bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_the_app_checks_the_declared_size_before_decoding(model, tmp_path, monkeypatch):
    bomb = png_declaring(tmp_path / "bomb.png", 12_000, 12_000)  # 144 MP in a few bytes
    assert bomb.stat().st_size < 1000

    def never(*args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr("anovl.deploy.app.load_rgb", never)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # Pillow's default (this module lowers it)
    with pytest.raises(AnovlError) as error:
        Analyzer(model, output_dir=tmp_path / "out")(str(bomb), "bottle")
    assert "12000×12000 pixels" in str(error.value)


def test_the_app_gives_each_request_its_own_output(model, tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), "grey").save(photo)
    analyzer = Analyzer(model, output_dir=tmp_path / "out")
    (tmp_path / "out").mkdir()
    files = {analyzer(str(photo), "bottle")["mask_file"] for _ in range(3)}
    assert len(files) == 3 and all(Path(file).is_file() for file in files)


def test_the_janitor_deletes_an_upload_when_its_last_request_ends(tmp_path):
    from anovl.deploy.app import UploadJanitor

    shared = tmp_path / "0a1b" / "photo.png"  # Gradio's layout: <upload dir>/<content hash>/<name>
    shared.parent.mkdir()
    shared.write_bytes(b"x")
    janitor = UploadJanitor(orphan_s=600)
    janitor.uploaded(str(shared))
    janitor.uploaded(str(shared))  # a stranger uploads the same bytes under the same name: one file
    janitor.used(str(shared))
    assert shared.is_file()  # the second request, still queued, needs it
    janitor.used(str(shared))
    assert not shared.parent.exists()
    orphan = tmp_path / "2c3d" / "never_used.png"
    orphan.parent.mkdir()
    orphan.write_bytes(b"x")
    UploadJanitor(orphan_s=0).uploaded(str(orphan))
    assert not orphan.parent.exists()


def test_twenty_parallel_requests_on_loopback_are_all_answered(model, tmp_path, monkeypatch):
    gradio_client = pytest.importorskip("gradio_client")
    from anovl.deploy.app import build_app
    from tests.test_app import free_port

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))

    def in_place(*args, **kwargs):
        # Gradio's writer of array outputs truncates and rewrites the content-hashed file that an identical
        # earlier picture is still being downloaded from: the client then sees "peer closed connection".
        raise AssertionError("a picture went through Gradio's in-place cache writer")

    monkeypatch.setattr("gradio.processing_utils.save_pil_to_cache", in_place)
    uploads_seen: list[str] = []
    masks_written: list[str] = []

    class Recording(Analyzer):
        def __call__(self, path, category):
            uploads_seen.append(path)
            result = super().__call__(path, category)
            masks_written.append(result["mask_file"])
            return result

    (tmp_path / "served").mkdir()
    demo = build_app(Recording(model, pixel_threshold=0.5, output_dir=tmp_path / "served"), ["bottle"])
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        # Five images, each sent by four requests at once: Gradio keeps identical uploads under one path. Every
        # fourth request names no class and is refused.
        photos = []
        for index in range(5):
            photos.append(tmp_path / f"photo{index}.png")
            Image.new("RGB", (40, 40), (index * 40, 0, 0)).save(photos[-1])
        requests = [(photos[index % 5], "" if index % 4 == 3 else "bottle") for index in range(20)]
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        answers: list = [None] * 20

        def collect(index: int) -> None:
            photo, category = requests[index]
            try:
                job = client.submit(gradio_client.handle_file(str(photo)), category, fn_index=0)
                answers[index] = job.result(timeout=300)
            except Exception as error:  # noqa: BLE001 - shown in the assertion below
                answers[index] = (f"{type(error).__name__}: {error}",)

        threads = [threading.Thread(target=collect, args=(index,)) for index in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=700)
        rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    finally:
        demo.close()
    expected = ["pick or type the class" if category == "" else "image score" for _, category in requests]
    failed = [(answer, want) for answer, want in zip(answers, expected) if answer is None or want not in answer[0]]
    assert failed == [], failed
    # Every request reached the app once and wrote its own mask; no upload (nor its hash folder) is left.
    assert len(uploads_seen) == 20 and len(set(uploads_seen)) == 5
    assert len(masks_written) == len(set(masks_written)) == 15
    assert [path for path in uploads_seen if os.path.exists(Path(path).parent)] == []
    assert rss_growth_mb < 500, rss_growth_mb  # bounded: requests are queued, not all decoded at once


# ------------------------------------------------------------------ compare and grid


def test_compare_prints_hostile_labels_escaped(tmp_path, capsys):
    from anovl.results import METRIC_TITLES, ResultsTable

    for name, label in (("a", "=1+1\x1b[2J"), ("b", "x|y\nz")):
        ResultsTable(tmp_path / name, "t", label=label).add("bottle\x1b[31m", dict.fromkeys(METRIC_TITLES, 0.5), 1)
    status, out, err = run_main(["compare", tmp_path / "a", tmp_path / "b", "--output", tmp_path / "c.md"], capsys)
    assert status == 0, err
    assert "\x1b" not in out and "\x1b" not in (tmp_path / "c.md").read_text()
    table = [line for line in (tmp_path / "c.md").read_text().splitlines() if line.startswith("| category")]
    assert table and all(line.count(" | ") == 2 for line in table)


@pytest.mark.parametrize("name", ["..", "."])
def test_a_grid_named_dot_dot_writes_nothing_above_its_output(tmp_path, capsys, name):
    grid = tmp_path / "deep" / "grid.yaml"
    grid.parent.mkdir()
    grid.write_text(json.dumps({"variants": {name: []}, "datasets": {"d": []}}))
    status, _, err = run_main(["grid", "--config", grid, "--output", tmp_path / "deep" / "out"], capsys)
    assert_one_error_line(status, err, "leading '.'")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["deep"]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("model:\n  init_args:\n    num_views: 1\n    num_views: 22\n", "the key 'num_views' appears twice"),
        ("data: " + "[" * 100 + "]" * 100 + "\n", "nested more than"),
    ],
)
def test_a_config_file_with_a_repeated_key_or_deep_nesting_is_one_line(data, tmp_path, capsys, text, fragment):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    status, _, err = run_main(cli_args(data, tmp_path / "runs", "--config", config), capsys)
    assert_one_error_line(status, err, fragment)
    assert not (tmp_path / "runs").exists()
