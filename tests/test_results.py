"""The per-category results table: values, mean, files and the random-weights warning."""

import csv
import io
import json
import math

import pytest
from rich.console import Console

from anovl.results import RANDOM_WEIGHTS_WARNING, ResultsTable

NAMES = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "image_auroc", "image_ap", "image_f1max")


def metrics(value: float, **overrides: float) -> dict[str, float]:
    return {**dict.fromkeys(NAMES, value), **overrides}


def test_rows_are_percent_and_mean_skips_undefined(tmp_path):
    table = ResultsTable(tmp_path, expected_categories=2)
    table.add("bottle", metrics(0.9, image_auroc=math.nan), 10)
    table.add("cable", metrics(0.5), 4)
    assert table.rows["bottle"]["pixel_auroc"] == pytest.approx(90.0)
    mean = table.mean()
    assert mean["pixel_auroc"] == pytest.approx(70.0)
    assert mean["image_auroc"] == pytest.approx(50.0)  # bottle's NaN is left out
    assert table.records()[-1]["images"] == 14


def test_files_are_written_after_every_category(tmp_path):
    table = ResultsTable(tmp_path, title="run", random_weights=True, expected_categories=2)
    table.add("bottle", metrics(0.123456789, image_ap=math.nan), 3)
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["complete"] is False
    assert "1 of 2 categories" in (tmp_path / "results.md").read_text()

    table.add("cable", metrics(0.5), 2)
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["complete"] is True and document["random_weights"] is True
    assert [row["category"] for row in document["categories"]] == ["bottle", "cable"]
    assert document["categories"][0]["pixel_auroc"] == 100 * 0.123456789  # full precision
    assert document["categories"][0]["image_ap"] is None  # NaN is not valid JSON
    assert document["mean"]["images"] == 5

    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert [row["category"] for row in rows] == ["bottle", "cable", "mean (all categories)"]
    assert float(rows[0]["pixel_auroc"]) == 100 * 0.123456789
    assert list(rows[0]) == ["category", "images", *NAMES]

    markdown = (tmp_path / "results.md").read_text()
    assert RANDOM_WEIGHTS_WARNING in markdown
    assert "| bottle | 3 | 12.3 |" in markdown and "n/a" in markdown
    assert "| **mean (all categories)** | **5** |" in markdown
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.csv", "results.json", "results.md"]


def test_optional_cflow_column_and_printing():
    table = ResultsTable(title="demo", random_weights=True)
    table.add("bottle", metrics(0.5, pixel_aupro_cflow=0.25), 1)
    assert table.metric_names[-1] == "pixel_aupro_cflow"
    assert table.mean()["pixel_aupro_cflow"] == pytest.approx(25.0)
    buffer = io.StringIO()
    table.print(Console(file=buffer, width=200))
    printed = buffer.getvalue()
    assert "AUPRO (cflow-style)" in printed and "25.0" in printed
    assert "scores mean nothing" in printed


def test_no_warning_for_real_weights(tmp_path):
    table = ResultsTable(tmp_path, random_weights=False)
    table.add("bottle", metrics(0.5), 1)
    assert "WARNING" not in (tmp_path / "results.md").read_text()
