"""Compare finished runs (e.g. TFA vs TFA+TTA variants) category by category.

    anovl compare runs/mvtec/version_0 runs/mvtec/version_1 --metrics pixel_auroc pixel_aupro
    anovl compare runs/mvtec/version_* --output comparison.md

Each run directory holds the results.json that ``anovl test`` writes. The first run is the
baseline: the other columns show their difference to it.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from anovl.errors import AnovlError
from anovl.results import (MEAN_ROW, METRIC_TITLES, OPTIONAL_METRIC_TITLES, RANDOM_WEIGHTS_WARNING,
                           atomic_write_text)

DEFAULT_METRICS = ("pixel_auroc", "pixel_aupro", "image_auroc")
ALL_TITLES = {**METRIC_TITLES, **OPTIONAL_METRIC_TITLES}


@dataclass
class Run:
    label: str
    rows: dict[str, dict[str, float | None]]  # category (and "mean") -> metric -> percent
    random_weights: bool = False


def load_run(directory: str | Path) -> Run:
    path = Path(directory)
    path = path if path.suffix == ".json" else path / "results.json"
    try:
        document = json.loads(path.read_text())
        rows = {row["category"]: row for row in document["categories"]}
        rows[MEAN_ROW] = document["mean"]
    except FileNotFoundError:
        raise AnovlError(f"no results.json in {path.parent}; give the run directories of finished `anovl test` runs") from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise AnovlError(f"{path} is not an anovl results file ({type(error).__name__}: {error})") from None
    label = document.get("variant") or path.parent.name
    return Run(label=label, rows=rows, random_weights=bool(document.get("random_weights")))


def _unique_labels(runs: list[Run], directories: list[str]) -> list[str]:
    labels = [run.label for run in runs]
    if len(set(labels)) < len(labels):  # same variant twice: fall back to the directories
        labels = [str(Path(directory)) for directory in directories]
    return labels


def comparison_rows(runs: list[Run], metric: str) -> list[list[float | None]]:
    """Per category (sorted, mean last): each run's value; None where a run lacks it."""
    categories = sorted({category for run in runs for category in run.rows if category != MEAN_ROW})
    return [[run.rows.get(category, {}).get(metric) for run in runs] for category in categories + [MEAN_ROW]]


def _cell(value: float | None, baseline: float | None, with_delta: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if not with_delta or baseline is None:
        return f"{value:.1f}"
    return f"{value:.1f} ({value - baseline:+.1f})"


def build_tables(runs: list[Run], labels: list[str], metrics: list[str]) -> list[tuple[str, list[str], list[list[str]]]]:
    categories = sorted({category for run in runs for category in run.rows if category != MEAN_ROW}) + [MEAN_ROW]
    tables = []
    for metric in metrics:
        rows = [[category] + [_cell(value, values[0], index > 0) for index, value in enumerate(values)]
                for category, values in zip(categories, comparison_rows(runs, metric))]
        tables.append((ALL_TITLES.get(metric, metric), ["category", *labels], rows))
    return tables


def to_markdown(tables) -> str:
    lines = ["# Comparison", "", "Metrics × 100; in brackets the difference to the first run.", ""]
    for title, headers, rows in tables:
        lines += [f"## {title}", "", "| " + " | ".join(headers) + " |",
                  "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anovl compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (or results.json files); the first is the baseline")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), choices=sorted(ALL_TITLES))
    parser.add_argument("--output", type=Path, help="also write the comparison as Markdown")
    args = parser.parse_args(argv)
    runs = [load_run(directory) for directory in args.runs]
    tables = build_tables(runs, _unique_labels(runs, args.runs), args.metrics)
    console = Console(width=max(100, Console().width))
    for title, headers, rows in tables:
        table = Table(title=title)
        for index, header in enumerate(headers):
            table.add_column(header, justify="left" if index == 0 else "right")
        for index, row in enumerate(rows):
            table.add_row(*row, style="bold" if index == len(rows) - 1 else None)
        console.print(table)
    if any(run.random_weights for run in runs):
        console.print(RANDOM_WEIGHTS_WARNING, style="bold red")
    if args.output:
        atomic_write_text(args.output, to_markdown(tables))
        console.print(f"Comparison written to {args.output}")
