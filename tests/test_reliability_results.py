"""Results files that survive failures, keep normal permissions, read back strictly, and allow any category name."""

import csv
import errno
import io
import json
import math
import os
import re
import stat

import numpy as np
import pytest
from rich.console import Console

from anovl import compare
from anovl.io import files as io_files
from anovl.errors import AnovlError
from anovl.results import METRIC_TITLES, RESULT_FILES, ResultsTable

METRICS = dict.fromkeys(METRIC_TITLES, 0.5)


def written_table(directory, categories=("bottle", "cable")) -> ResultsTable:
    table = ResultsTable(directory, "run", False, len(categories) + 1, "tfa", config={"model": {"a": 1}})
    for index, category in enumerate(categories):
        table.add(category, {**METRICS, "pixel_auroc": 0.1 * (index + 1)}, index + 1)
    return table


def file_contents(directory):
    return {name: (directory / name).read_bytes() for name in RESULT_FILES}


@pytest.mark.parametrize("failing_call", ["write", "fsync", "replace"])
def test_full_disk_is_one_error_and_keeps_the_previous_files(tmp_path, monkeypatch, failing_call):
    table = written_table(tmp_path)
    before = file_contents(tmp_path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_files.os, failing_call, no_space)
    with pytest.raises(AnovlError) as error:
        table.add("carpet", METRICS, 3)
    message = str(error.value)
    assert "No space left on device" in message and "\n" not in message
    monkeypatch.undo()
    assert file_contents(tmp_path) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(RESULT_FILES)  # no temporary files left
    assert list(ResultsTable.read(tmp_path).rows) == ["bottle", "cable"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_results_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        written_table(tmp_path)
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~umask
    assert {stat.S_IMODE((tmp_path / name).stat().st_mode) for name in RESULT_FILES} == {expected}


def test_unwritable_folder_is_one_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(AnovlError, match="cannot create the results folder"):
        ResultsTable(target / "run").add("bottle", METRICS, 1)


def test_a_category_named_mean_round_trips_and_compares(tmp_path, capsys):
    names = ["mean", "mean (all categories)", "**mean (all categories)**", "a|b", "[bold red]x_y_"]
    table = written_table(tmp_path, names)
    read = ResultsTable.read(tmp_path)
    assert list(read.rows) == names and read.image_counts == table.image_counts
    assert read.mean()["pixel_auroc"] == pytest.approx(np.mean([10, 20, 30, 40, 50]))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert [row["category"] for row in rows] == [*names, "mean (all categories)"]  # the mean is the last row
    markdown = (tmp_path / "results.md").read_text()
    bold_rows = [line for line in markdown.splitlines() if line.startswith("| **")]
    assert bold_rows == ["| **mean (all categories)** | **15** | **30.0** | " + " | ".join(["**50.0**"] * 6) + " |"]
    assert "| a\\|b |" in markdown and "| \\*\\*mean (all categories)\\*\\* |" in markdown

    printed = io.StringIO()
    read.print(Console(file=printed, width=300))
    assert "[bold red]x_y_" in printed.getvalue()

    other = tmp_path / "other"
    written_table(other, ["mean"])
    output = tmp_path / "comparison.md"
    compare.main([str(tmp_path), str(other), "--metrics", "pixel_auroc", "--output", str(output)])
    lines = output.read_text().splitlines()
    assert "| mean | 10.0 | 10.0 (+0.0) |" in lines  # the category, not the mean of either run
    assert "| **mean (all categories)** | **30.0** | **10.0 (-20.0)** |" in lines


def record(category="bottle", **fields):
    return {"category": category, "images": 3, **dict.fromkeys(METRIC_TITLES, 50.0), **fields}


def document(**fields):
    return {
        "title": "t",
        "label": "AnoVL-tfa",
        "random_weights": False,
        "categories": [record()],
        "config": {},
        "skipped_files": [],
        **fields,
    }


@pytest.mark.parametrize(
    "broken, fragment",
    [
        ([1, 2], "the top level: Input should be a valid dictionary"),
        (document(title=None), "title: Input should be a valid string (got None)"),
        (document(random_weights="no"), "random_weights: Input should be a valid boolean (got 'no')"),
        (document(categories={"bottle": {}}), "categories: Input should be a valid list"),
        (document(config=[1]), "config: Input should be a valid dictionary (got [1])"),
        (document(skipped_files=[1]), "skipped_files[0]: Input should be a valid string"),
        (document(categories=["bottle"]), "categories[0]: Input should be a valid dictionary"),
        (document(categories=[record(category=None)]), "categories[0].category: Input should be a valid string"),
        (document(categories=[record(category="")]), "categories[0].category: String should have at least 1"),
        (document(categories=[record(), record()]), "categories: categories listed more than once: 'bottle'"),
        (document(categories=[record(images=-1)]), "categories[0].images: Input should be greater than or equal to 0"),
        (document(categories=[record(images=2.5)]), "categories[0].images: Input should be a valid integer (got 2.5)"),
        (
            document(categories=[record(images=True)]),
            "categories[0].images: Input should be a valid integer (got True)",
        ),
        (document(categories=[record(pixel_auroc="90")]), "categories[0].pixel_auroc: Input should be a valid number"),
        (document(categories=[record(pixel_auroc=1e9)]), "pixel_auroc: Input should be less than or equal to 100"),
        (document(categories=[record(pixel_auroc=-0.5)]), "pixel_auroc: Input should be greater than or equal to 0"),
        (document(categories=[record(pixel_auroc=True)]), "pixel_auroc: Input should be a valid number (got True)"),
        (document(categories=[record(image_ap=math.inf)]), "image_ap: Input should be a finite number"),
        (document(categories=[record(invented_metric=1.0)]), "invented_metric: is not a field of this record"),
        # Caught since the schema: a finished flag that is not a boolean, a negative threshold.
        (document(complete="false"), "complete: Input should be a valid boolean (got 'false')"),
        (
            document(thresholds={"categories": {"bottle": {"image": -1.0}}, "mean": {"image": 0.5}}),
            "thresholds.categories.bottle.image: Input should be greater than or equal to 0",
        ),
    ],
)
def test_structurally_wrong_results_json_is_one_clear_error(tmp_path, broken, fragment):
    (tmp_path / "results.json").write_text(json.dumps(broken))
    with pytest.raises(AnovlError) as error:
        ResultsTable.read(tmp_path)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_the_row_schema_knows_every_metric_a_table_writes():
    from anovl.io.schemas import ResultsRow
    from anovl.results import ALL_METRIC_TITLES

    assert set(ResultsRow.model_fields) == {"category", "images", *ALL_METRIC_TITLES}


@pytest.mark.parametrize("text", ["{", "\xff\xfe", "NaN", '{"title": NaN}'])
def test_unparsable_results_json_is_one_clear_error(tmp_path, text):
    (tmp_path / "results.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(AnovlError, match="not a results file"):
        ResultsTable.read(tmp_path)


def test_fuzzed_results_json_reads_or_fails_cleanly(tmp_path):
    # Random type swaps in a valid document: read() either accepts it with sane rows or raises AnovlError.
    rng = np.random.default_rng(0)
    replacements = [None, True, -1, 2.5, "x", [], {}, [1], {"a": 1}, math.inf, 1e300]
    for trial in range(300):
        broken = document(categories=[record("a"), record("b", pixel_auroc=None)])
        target = broken if rng.random() < 0.4 else broken["categories"][int(rng.integers(2))]
        key = list(target)[int(rng.integers(len(target)))]
        target[key] = replacements[int(rng.integers(len(replacements)))]
        (tmp_path / "results.json").write_text(json.dumps(broken))
        try:
            table = ResultsTable.read(tmp_path)
        except AnovlError:
            continue
        assert all(isinstance(count, int) and count >= 0 for count in table.image_counts.values())
        assert all(math.isnan(value) or 0 <= value <= 100 for row in table.rows.values() for value in row.values())


def test_rows_of_unknown_categories_are_refused(tmp_path):
    table = written_table(tmp_path, ["bottle", "invented"])
    read = ResultsTable.read(tmp_path)
    read.check_categories(["bottle", "invented", "cable"])
    with pytest.raises(AnovlError, match="'invented'"):
        read.check_categories(["bottle", "cable"])
    assert table.rows  # the check reads, never drops rows


def test_compare_never_cuts_labels_short_in_a_120_column_terminal(tmp_path, capsys, monkeypatch):
    labels = [
        "AnoVL-tfa[backbone=anovl-small-vit;image_size=224;init_seed=0;pretrained=None]",
        "AnoVL-tta-text[backbone=anovl-small-vit;image_size=224;init_seed=0;pretrained=None]",
        "AnoVL-tta-lowrank[backbone=anovl-small-vit;image_size=224;init_seed=0;lr=0.01;pretrained=None;rank=16]",
    ]
    folders = []
    for index, label in enumerate(labels):
        table = ResultsTable(tmp_path / str(index), "run", False, 1, label, config={"model": {"a": 1}})
        table.add("bottle", {**METRICS, "pixel_auroc": 0.1 * (index + 1)}, 1)
        folders.append(str(tmp_path / str(index)))
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich takes stdout for a terminal of COLUMNS columns
    monkeypatch.setenv("COLUMNS", "120")
    compare.main([*folders, "--metrics", "pixel_auroc"])
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # bold
    assert "…" not in out and max(map(len, out.splitlines())) <= 120
    for number, label in enumerate(labels, 1):
        assert f"run {number}: {label}" in out  # named in full above the tables, which number the runs
    assert "run 3" in next(line for line in out.splitlines() if "category" in line)
    # Where the labels fit, they are the column names.
    monkeypatch.setenv("COLUMNS", "400")
    compare.main([*folders, "--metrics", "pixel_auroc"])
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert labels[2] in next(line for line in out.splitlines() if "category" in line) and "run 1:" not in out
