"""Hostile and faulty cases against the I/O layer (anovl.io) and the readers and writers built on it, through
the API: planted links, full disks, file-size limits, read-only folders, hostile JSON / YAML, hostile names.

Every case asserts the same four things where they apply: one AnovlError line (no traceback, no other
exception type), nothing written outside the folder, no partial or temporary file left, earlier good files
intact, and nothing dropped silently. test_hostile_runs.py runs the cases that need the CLI, the app or a model.
"""

import errno
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from anovl.data import (
    FolderDataModule,
    MVTecDataModule,
    VisADataModule,
    generate_mvtec_like,
    generate_visa_like,
    load_rgb,
)
from anovl.data.image_io import BadImageError
from anovl.deploy.sidecar import Sidecar
from anovl.errors import AnovlError
from anovl.grid import load_grid, results_state
from anovl.io import (
    append_text,
    csv_cell,
    html_text,
    make_folder,
    markdown_cell,
    parse_json,
    parse_yaml,
    read_json,
    replace_together,
    terminal,
    write_file,
    write_texts,
)
from anovl.io import files as io_files
from anovl.io.schemas import GridState
from anovl.models.base import check_label
from anovl.models.text_cache import TextEmbeddingCache
from anovl.plugins import load_plugin
from anovl.results import METRIC_TITLES, ResultsTable
from anovl.thresholds import RunThresholds, check_threshold

ESC = "\x1b[31m"


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def leftovers(folder: Path) -> list[str]:
    """Temporary or empty files anovl may have left below ``folder``."""
    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and (".tmp" in path.name or path.stat().st_size == 0)
    )


@pytest.fixture
def run(tmp_path):
    """A run folder with one good file in it, and a folder outside it that must stay untouched."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text('{"good": true}')
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("precious")
    return folder, outside


def outside_untouched(outside: Path) -> None:
    assert sorted(path.name for path in outside.iterdir()) == ["precious.txt"]
    assert (outside / "precious.txt").read_text() == "precious"


# ------------------------------------------------------------------ planted links

WRITERS = {
    "write_file": lambda path, root: write_file(path, "new", root),
    "write_texts": lambda path, root: write_texts({path: "new"}, root),
    "replace_together": lambda path, root: replace_together({path: b"new", path.with_name("other"): "x"}, root),
    "pillow": lambda path, root: write_file(path, Image.new("L", (4, 4)).save, root),
    "numpy": lambda path, root: write_file(path, lambda target: np.save(target, np.zeros(3)), root),
}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("link", ["to_file", "dangling", "folder"])
def test_writes_never_follow_planted_links(run, writer, link):
    folder, outside = run
    if link == "to_file":
        target = folder / "hparams.yaml"
        target.symlink_to(outside / "precious.txt")
    elif link == "dangling":
        target = folder / "config.yaml"
        target.symlink_to(outside / "created.txt")
    else:
        (folder / "pictures").symlink_to(outside, target_is_directory=True)
        target = folder / "pictures" / "panel.png"
    with pytest.raises(AnovlError) as error:
        WRITERS[writer](target, folder)
    assert "symbolic link" in one_line(error)
    outside_untouched(outside)
    assert leftovers(folder) == []


def test_a_link_in_a_folder_to_create_is_refused(run):
    folder, outside = run
    (folder / "pictures").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AnovlError) as error:
        make_folder(folder / "pictures" / "bottle", folder)
    assert "pictures is a symbolic link" in one_line(error)
    outside_untouched(outside)


def test_appending_to_a_linked_scores_file_is_refused(run):
    folder, outside = run
    (folder / "scores.csv").symlink_to(outside / "precious.txt")
    with pytest.raises(AnovlError, match="symbolic link"):
        append_text(folder / "scores.csv", "a,b\n", folder)
    outside_untouched(outside)


# ------------------------------------------------------------------ failures part-way

FAILURES = {
    errno.ENOSPC: "No space left on device",
    errno.EFBIG: "File too large",
    errno.EROFS: "Read-only file system",
    errno.EACCES: "Permission denied",
    errno.EDQUOT: "Disk quota exceeded",
}


@pytest.mark.parametrize("code", FAILURES, ids=[errno.errorcode[code] for code in FAILURES])
@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_a_failed_write_is_one_line_and_keeps_the_earlier_file(run, monkeypatch, code, failing):
    folder, _ = run
    target = folder / "results.json"

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(io_files.os, failing, fail)
    with pytest.raises(AnovlError) as error:
        write_texts({target: '{"new": true}', folder / "results.csv": "new"}, folder)
    monkeypatch.undo()
    message = one_line(error)
    assert FAILURES[code] in message and str(folder) in message and "no partial file" in message
    assert target.read_text() == '{"good": true}' and not (folder / "results.csv").exists()
    assert leftovers(folder) == []


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_group_replaces_together_or_not_at_all(run, monkeypatch, failing_call):
    """An export and its sidecar: if renaming the second fails, the first is put back."""
    folder, _ = run
    model, sidecar = folder / "m.onnx", folder / "m.onnx.json"
    model.write_bytes(b"old model")
    sidecar.write_text("old sidecar")
    real_replace, renamed_in = os.replace, []

    def flaky(source, target):
        if Path(target) in (model, sidecar):  # renaming a new file in (or, after the failure, an old one back)
            renamed_in.append(target)
            if len(renamed_in) == failing_call:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, target)

    monkeypatch.setattr(io_files.os, "replace", flaky)
    with pytest.raises(AnovlError):
        replace_together({model: b"new model", sidecar: "new sidecar"}, folder)
    monkeypatch.undo()
    assert (model.read_bytes(), sidecar.read_text()) == (b"old model", "old sidecar")
    assert leftovers(folder) == [] and sorted(path.name for path in folder.iterdir()) == [
        "m.onnx",
        "m.onnx.json",
        "results.json",
    ]


def test_a_new_group_that_fails_half_way_leaves_neither_file(run, monkeypatch):
    folder, _ = run
    model, sidecar = folder / "m.pt", folder / "m.pt.json"
    real_replace = os.replace

    def flaky(source, target):
        if Path(target) == sidecar:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_replace(source, target)

    monkeypatch.setattr(io_files.os, "replace", flaky)
    with pytest.raises(AnovlError) as error:
        replace_together({model: b"model", sidecar: "{}"}, folder)
    monkeypatch.undo()
    assert "Read-only file system" in one_line(error)
    assert not model.exists() and not sidecar.exists() and leftovers(folder) == []


def test_a_writer_that_raises_a_foreign_error_leaves_nothing(run):
    folder, _ = run

    def exporter(path):
        Path(path).write_bytes(b"half a graph")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nC++ frames ...")

    with pytest.raises(AnovlError) as error:
        write_file(folder / "model.pt", exporter, folder)
    assert "RuntimeError: [enforce fail" in one_line(error)
    assert leftovers(folder) == [] and not (folder / "model.pt").exists()


def test_a_failed_append_cuts_back_to_whole_rows(run, monkeypatch):
    folder, _ = run
    scores = folder / "scores.csv"
    scores.write_text("header\nrow 1\n")
    real_write = os.write

    def half(descriptor, data):
        real_write(descriptor, bytes(data[:3]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_files.os, "write", half)
    with pytest.raises(AnovlError, match="rows written before are kept"):
        append_text(scores, "row 2\nrow 3\n", folder)
    monkeypatch.undo()
    assert scores.read_text() == "header\nrow 1\n"


FSIZE_SCRIPT = """
import resource, sys
from pathlib import Path
from anovl.errors import AnovlError
from anovl.io import write_file
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write_file(Path(sys.argv[1]), b"x" * 100_000)
except AnovlError as error:
    print(error)
"""


def run_python(script: str, *args: object) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter (where an rlimit may be set), importing this checkout's anovl."""
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )


def test_a_real_file_size_limit_is_one_line_and_keeps_the_earlier_file(run):
    folder, _ = run
    target = folder / "map.npy"
    target.write_bytes(b"earlier good map")
    result = run_python(FSIZE_SCRIPT, target)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "File too large" in result.stdout and str(target) in result.stdout
    assert target.read_bytes() == b"earlier good map" and leftovers(folder) == []


# ------------------------------------------------------------------ bounded reading


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[" * 200_000 + "]" * 200_000, "nested more than"),
        ('{"a": {"b": ' * 100 + "1" + "}" * 200, "nested more than"),
        ('{"title": "a", "title": "b"}', "the key title twice"),
        ("{", "not valid JSON"),
        ('{"a": 1} trailing', "not valid JSON"),
    ],
)
def test_hostile_json_is_one_line(text, fragment):
    with pytest.raises(AnovlError) as error:
        parse_json(text, "results.json")
    assert fragment in one_line(error)


def test_deep_strings_do_not_count_as_nesting():
    assert parse_json(json.dumps({"a": "[" * 10_000}), "x") == {"a": "[" * 10_000}


def test_a_huge_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "results.json"
    with open(path, "wb") as handle:
        handle.truncate(4 * 2**30)  # a sparse 4 GB file: reading it whole would take 4 GB of memory
    with pytest.raises(AnovlError) as error:
        ResultsTable.read(tmp_path)
    assert "4096.0 MiB" in one_line(error)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("variants: {a: []}\nvariants: {b: []}\n", "the key 'variants' appears twice"),
        ("variants:\n  TFA: []\n  TFA: [x.yaml]\n", "the key 'TFA' appears twice"),
        ("a: " + "[" * 100 + "]" * 100, "nested more than"),
        ("a: [1, 2\n", "not valid YAML"),
        ("a: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
    ],
)
def test_hostile_yaml_is_one_line(text, fragment):
    with pytest.raises(AnovlError) as error:
        parse_yaml(text, "grid file")
    assert fragment in one_line(error)


def test_non_utf8_files_are_one_line(tmp_path):
    (tmp_path / "results.json").write_bytes(b'{"title": "\xff"}')
    with pytest.raises(AnovlError) as error:
        ResultsTable.read(tmp_path)
    assert "not UTF-8" in one_line(error)


def results_document(**fields):
    row = {"category": "bottle", "images": 3, **dict.fromkeys(METRIC_TITLES, 50.0)}
    return {
        "title": "t",
        "label": "x",
        "random_weights": False,
        "categories": [row],
        "config": {"model": {}},
        "skipped_files": [],
        **fields,
    }


@pytest.mark.parametrize(
    "config, fragment",
    [
        ([1, 2], "config: Input should be a valid dictionary"),
        ({"model": [1, 2]}, "config.model"),
        ({"model": "AnoVL"}, "config.model"),
    ],
)
def test_a_config_record_that_is_not_sections_is_refused(tmp_path, config, fragment):
    (tmp_path / "results.json").write_text(json.dumps(results_document(config=config)))
    with pytest.raises(AnovlError) as error:
        ResultsTable.read(tmp_path)
    assert fragment in one_line(error)


def thresholds_document(value):
    return results_document(
        thresholds={"categories": {"bottle": {"image": value, "pixel": 0.5}}, "mean": {"image": 0.5, "pixel": 0.5}}
    )


@pytest.mark.parametrize("value", [1e308, -5, True, "0.3", [0.3], float("nan"), float("inf"), 1.0000001e7])
def test_thresholds_out_of_range_are_refused_when_read(tmp_path, value):
    (tmp_path / "results.json").write_text(json.dumps(thresholds_document(value)))
    with pytest.raises(AnovlError) as error:
        RunThresholds.read(tmp_path)
    assert "thresholds.categories.bottle.image" in one_line(error)


@pytest.mark.parametrize("value", [1e308, -5, True, float("nan"), "0.5"])
def test_thresholds_out_of_range_are_refused_when_given(value):
    with pytest.raises(AnovlError) as error:
        check_threshold("predictions.image_threshold", value)
    assert "a number in [0, 1e+06]" in one_line(error)


@pytest.mark.parametrize(
    "value, state",
    [(True, "finished"), (False, "interrupted"), ("false", None), ("true", None), (1, None), (None, None), ([], None)],
)
def test_only_boolean_true_means_a_grid_cell_finished(tmp_path, value, state):
    (tmp_path / "results.json").write_text(json.dumps({"complete": value}))
    if state is None:
        with pytest.raises(AnovlError) as error:
            results_state(tmp_path)
        assert "complete" in one_line(error)
    else:
        assert results_state(tmp_path) == state


def test_a_grid_state_that_is_a_list_is_one_line(tmp_path):
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(AnovlError) as error:
        read_json(tmp_path / "results.json", GridState, "grid state")
    assert "the top level" in one_line(error)


def sidecar_record(**changes):
    record = {
        "version": 1,
        "format": "onnx",
        "preprocessing": {
            "image_size": 64,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.2, 0.2, 0.2],
            "interpolation": "bilinear",
        },
        "classes": [{"category": "bottle", "prompt_name": "bottle", "image_threshold": None, "pixel_threshold": None}],
        "num_views": 1,
        "label": "AnoVL",
        "settings": {},
    }
    for key, value in changes.items():
        if key in record["preprocessing"]:
            record["preprocessing"][key] = value
        elif key in ("image_threshold", "pixel_threshold", "category"):
            record["classes"][0][key] = value
        else:
            record[key] = value
    return record


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"image_size": 0}, "preprocessing.image_size"),
        ({"image_size": -64}, "preprocessing.image_size"),
        ({"image_size": 60000}, "preprocessing.image_size"),
        ({"image_size": "64"}, "preprocessing.image_size"),
        ({"image_size": 64.0}, "preprocessing.image_size"),
        ({"image_threshold": "0.5"}, "classes[0].image_threshold"),
        ({"image_threshold": float("nan")}, "classes[0].image_threshold"),
        ({"pixel_threshold": 2e7}, "classes[0].pixel_threshold"),
        ({"category": ""}, "classes[0].category"),
        ({"category": "a\x1b[2J"}, "control characters"),
        ({"classes": [{"category": "a"}, {"category": "a"}]}, "classes repeated: 'a'"),
        ({"classes": []}, "classes"),
        ({"num_views": 0}, "num_views"),
        ({"num_views": True}, "num_views"),
        ({"std": [0, 1, 1]}, "preprocessing.std"),
        ({"format": "exe"}, "format 'exe'"),
        ({"version": 2}, "version 2"),
        ({"settings": []}, "settings"),
    ],
)
def test_hostile_sidecars_are_one_line(tmp_path, changes, fragment):
    path = tmp_path / "m.onnx.json"
    path.write_text(json.dumps(sidecar_record(**changes)))
    with pytest.raises(AnovlError) as error:
        Sidecar.read(path)
    assert fragment in one_line(error) and "export the model again" in str(error.value)


# ------------------------------------------------------------------ text-embedding cache entries


class _Tokenizer:
    def __call__(self, sentences):
        return torch.tensor([[len(sentence) % 7, 1] for sentence in sentences])


class _Clip(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(8.0))

    def encode_text(self, tokens):
        return tokens.float().sum(1, keepdim=True) * self.weight + 1


class _Backbone:
    name = "toy"
    weights_fingerprint = "w"

    def __init__(self):
        self.clip = _Clip()
        self.tokenizer = _Tokenizer()


@pytest.mark.parametrize("tamper", ["width", "nan", "inf", "rows", "integer"])
def test_tampered_cache_entries_are_re_encoded_with_a_warning(tmp_path, tamper, caplog):
    from safetensors.torch import load_file, save_file

    sentences = ["a good photo", "a bad photo", "a flawed photo"]
    cache = TextEmbeddingCache(_Backbone(), tmp_path)
    fresh = cache.sentence_embeddings(sentences)
    path = cache.path(sentences)
    stored = load_file(str(path))["embeddings"]
    tampered = {
        "width": torch.zeros(3, 5),
        "nan": stored.clone().fill_(math.nan),
        "inf": stored * math.inf,
        "rows": stored[:2],
        "integer": stored.to(torch.int64),
    }[tamper]
    save_file({"embeddings": tampered.contiguous()}, str(path), metadata=cache.key(sentences))
    again = TextEmbeddingCache(_Backbone(), tmp_path)
    with caplog.at_level("WARNING"):
        embeddings = again.sentence_embeddings(sentences)
    assert torch.equal(embeddings, fresh)
    assert str(path) in caplog.text and "re-encoding" in caplog.text


# ------------------------------------------------------------------ sanitisers per sink


@pytest.mark.parametrize(
    "text, shown",
    [
        (f"{ESC}red", "\\x1b[31mred"),
        ("a\rb", "a\\x0db"),
        ("bell\x07", "bell\\x07"),
        ("x\x9b2J", "x\\x9b2J"),
        (os.fsdecode(b"caf\xe9"), "caf\\xe9"),
        ("plain name", "plain name"),
    ],
)
def test_terminal_text_has_no_control_characters(text, shown):
    assert terminal(text) == shown and terminal(text).isprintable()


@pytest.mark.parametrize("cell", ['=HYPERLINK("x")', "+1", "-2+3", "@SUM(A1)", "\tx", "\rx"])
def test_csv_cells_never_start_a_formula(cell):
    assert csv_cell(cell) == "'" + cell and csv_cell(0.5) == 0.5 and csv_cell("bottle") == "bottle"


@pytest.mark.parametrize(
    "text, escaped",
    [
        ("a|b", "a\\|b"),
        ("line\nbreak", "line break"),
        ("**bold**", "\\*\\*bold\\*\\*"),
        (f"{ESC}x", "\\\\x1b\\[31mx"),
    ],
)
def test_markdown_cells_stay_in_their_cell(text, escaped):
    assert markdown_cell(text) == escaped


@pytest.mark.parametrize("text", ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "\"quoted\" & 'single'"])
def test_html_text_has_no_markup(text):
    shown = html_text(text)
    assert "<" not in shown and ">" not in shown and '"' not in shown


@pytest.mark.parametrize("label", [f"run{ESC}", "run\x00", "tab\there", "bell\x07"])
def test_labels_refuse_control_characters(label):
    with pytest.raises(AnovlError) as error:
        check_label(label)
    one_line(error)


HOSTILE_CATEGORIES = ["=cmd|' /C calc'!A0", f"red{ESC}", "a|b\nc", "@SUM(1)"]


def test_a_results_table_of_hostile_names_is_safe_in_every_sink(tmp_path):
    table = ResultsTable(tmp_path, "t", label="x")
    for category in HOSTILE_CATEGORIES:
        table.add(category, dict.fromkeys(METRIC_TITLES, 0.5), 1)
    csv_text = (tmp_path / "results.csv").read_text()
    assert all(not line.startswith(("=", "@", "+", "-")) for line in csv_text.splitlines())
    markdown = (tmp_path / "results.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(HOSTILE_CATEGORIES) + 1 and all(line.count(" | ") == 8 for line in rows[2:])
    printed = io.StringIO()
    table.print(Console(file=printed, width=400, force_terminal=False))
    assert "\x1b" not in printed.getvalue() and "red\\x1b[31m" in printed.getvalue()
    assert list(ResultsTable.read(tmp_path).rows) == HOSTILE_CATEGORIES  # the names themselves are kept


# ------------------------------------------------------------------ grid names


@pytest.mark.parametrize(
    "variants, fragment",
    [
        ({".": []}, "leading '.'"),
        ({"..": []}, "leading '.'"),
        ({".hidden": []}, "leading '.'"),
        ({f"v{ESC}": []}, "control"),
        ({"a/b": []}, "without '/'"),
        ({"TFA": [], "tfa": []}, "name the same folder"),
        ({"TFA": [], "TFA ": []}, "name the same folder"),
    ],
)
def test_grid_names_are_validated_like_labels(tmp_path, variants, fragment):
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps({"variants": variants, "datasets": {"d": []}}))
    with pytest.raises(AnovlError) as error:
        load_grid(path, tmp_path / "out")
    assert fragment in one_line(error)


def test_a_repeated_grid_key_is_refused_not_dropped(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("variants:\n  TFA: []\n  TFA: []\ndatasets:\n  d: []\n")
    with pytest.raises(AnovlError) as error:
        load_grid(path, tmp_path / "out")
    assert "'TFA' appears twice" in one_line(error)


# ------------------------------------------------------------------ plugins


def write_plugin(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def test_a_plugin_named_like_an_installed_module_does_not_replace_it(tmp_path):
    import yaml

    plugin = write_plugin(tmp_path, "yaml.py", "MARK = 'plugin'\n")
    with pytest.warns(UserWarning, match="'yaml' is an installed module"):
        load_plugin(str(plugin))
    assert sys.modules["yaml"] is yaml and hasattr(yaml, "safe_load")


def test_two_plugin_files_of_one_stem_do_not_collide(tmp_path):
    first = write_plugin(tmp_path / "a", "same_stem_plugin.py", "WHICH = 'a'\n")
    second = write_plugin(tmp_path / "b", "same_stem_plugin.py", "WHICH = 'b'\n")
    load_plugin(str(first))
    with pytest.warns(UserWarning, match="another plugin's"):
        load_plugin(str(second))
    unique = [name for name in sys.modules if name.startswith("anovl_plugin_same_stem_plugin_")]
    assert sys.modules["same_stem_plugin"].WHICH == "a" and [sys.modules[name].WHICH for name in unique] == ["b"]


@pytest.mark.parametrize("as_module", [False, True])
def test_a_plugins_missing_dependency_is_one_line_naming_it(tmp_path, monkeypatch, as_module):
    plugin = write_plugin(tmp_path, "needs_dep_plugin.py", "import surely_not_installed_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AnovlError) as error:
        load_plugin("needs_dep_plugin" if as_module else str(plugin))
    assert "'surely_not_installed_dep'" in one_line(error) and "not installed" in str(error.value)


def test_a_missing_dependency_named_like_a_prefix_of_the_plugin_is_not_called_plugin_not_found(tmp_path, monkeypatch):
    write_plugin(tmp_path, "toolkit_plugin.py", "import toolkit\n")  # 'toolkit' is a prefix of the plugin's name
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AnovlError) as error:
        load_plugin("toolkit_plugin")
    assert "needs the module 'toolkit'" in one_line(error)


# ------------------------------------------------------------------ predict inputs


def test_non_finite_pixels_are_refused_in_one_line(tmp_path):
    values = np.zeros((8, 8), dtype=np.float32)
    values[3, 3] = np.inf
    Image.fromarray(values, mode="F").save(tmp_path / "inf.tiff")
    with pytest.raises(BadImageError) as error:
        load_rgb(tmp_path / "inf.tiff")
    assert "non-finite" in one_line(error)


@pytest.mark.parametrize("name", ["anim.gif", "photo.webp", "notes.txt", "scan.heic"])
def test_every_skipped_file_is_named_in_a_warning(tmp_path, name):
    Image.new("RGB", (8, 8)).save(tmp_path / "kept.png")
    (tmp_path / name).write_bytes(b"GIF89a" if name.endswith("gif") else b"x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = FolderDataModule(tmp_path).samples
    assert [sample.image_path.name for sample in samples] == ["kept.png"]
    assert any(name in str(warning.message) and "skipped" in str(warning.message) for warning in caught)


@pytest.mark.parametrize(
    "generate, size, datamodule, folder",
    [
        (generate_mvtec_like, 32, MVTecDataModule, "widget/test/scratch"),
        (generate_visa_like, (32, 32), VisADataModule, "widget/Data/Images/Anomaly"),
    ],
)
def test_every_layout_names_every_skipped_file(tmp_path, generate, size, datamodule, folder):
    root = generate(tmp_path, ["widget"], n_good=1, n_defect=1, n_train=0, image_size=size)
    (tmp_path / folder / "anim.gif").write_bytes(b"GIF89a")
    (tmp_path / folder / "notes.txt").write_text("x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = datamodule(root).samples
    assert not any(sample.image_path.suffix in (".gif", ".txt") for sample in samples) and samples
    named = [str(warning.message) for warning in caught if "skipped" in str(warning.message)]
    assert len(named) == 1 and "anim.gif" in named[0] and "notes.txt" in named[0], named
