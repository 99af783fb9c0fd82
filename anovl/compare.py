"""Compare finished runs (methods, TTA variants, settings) category by category.

    anovl compare runs/mvtec/version_0 runs/mvtec/version_1 --metrics pixel_auroc pixel_aupro
    anovl compare runs/mvtec/version_* --output comparison.md --labels TFA TTA-text WinCLIP
    anovl compare runs/mvtec/version_* --output comparison.csv

Each run directory holds the results.json that ``anovl test`` writes. The first run is the
baseline: the other columns show their difference to it. Columns are named by each run's label
(the method plus what differs from its reference settings), or by ``--labels``. ``--output`` writes the
tables as Markdown, or as CSV (one row per run and category, the metrics in percent) for a ``.csv`` name.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from anovl.errors import AnovlError
from anovl.io import csv_cell, markdown_cell, rich_text, write_file
from anovl.results import ALL_METRIC_TITLES, MEAN_ROW, RANDOM_WEIGHTS_WARNING, ResultsTable, console_for, markdown_table

DEFAULT_METRICS = ("pixel_auroc", "pixel_aupro", "image_auroc")


@dataclass
class Run:
    label: str
    rows: dict[str, dict[str, float]]  # category -> metric -> percent (NaN: undefined)
    mean: dict[str, float]  # kept apart: a category may be called "mean"
    random_weights: bool = False


def load_run(directory: str | Path) -> Run:
    path = Path(directory)
    folder = path.parent if path.suffix == ".json" else path
    if not (folder / "results.json").is_file():
        raise AnovlError(f"no results.json in {folder}; give the run directories of finished `anovl test` runs")
    table = ResultsTable.read(folder)
    return Run(
        label=table.label or folder.name, rows=table.rows, mean=table.mean(), random_weights=table.random_weights
    )


def _unique_labels(runs: list[Run], directories: list[str], given: list[str] | None) -> list[str]:
    if given is not None:
        if len(given) != len(runs) or len(set(given)) < len(given):
            raise AnovlError(f"--labels needs {len(runs)} different labels, one per run, got {len(given)}: {given}")
        return given
    labels = [run.label for run in runs]
    if len(set(labels)) < len(labels):  # the same settings run twice: the directories tell them apart
        labels = [f"{run.label} ({Path(directory)})" for run, directory in zip(runs, directories)]
    return labels


def _categories(runs: list[Run]) -> list[str]:
    """Every run's categories, sorted."""
    return sorted({category for run in runs for category in run.rows})


def comparison_rows(runs: list[Run], metric: str) -> list[list[float]]:
    """Per category (sorted), then the mean: each run's value; NaN where a run lacks it or it is undefined."""
    rows = [[run.rows.get(category, {}).get(metric, math.nan) for run in runs] for category in _categories(runs)]
    return rows + [[run.mean.get(metric, math.nan) for run in runs]]


def _cell(value: float, baseline: float, with_delta: bool) -> str:
    if math.isnan(value):
        return "n/a"
    if not with_delta or math.isnan(baseline):
        return f"{value:.1f}"
    return f"{value:.1f} ({value - baseline:+.1f})"


def build_tables(
    runs: list[Run], labels: list[str], metrics: list[str]
) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    for metric in metrics:
        rows = [
            [category] + [_cell(value, values[0], index > 0) for index, value in enumerate(values)]
            for category, values in zip([*_categories(runs), MEAN_ROW], comparison_rows(runs, metric))
        ]
        tables.append((ALL_METRIC_TITLES.get(metric, metric), ["category", *labels], rows))
    return tables


def comparison_records(runs: list[Run], labels: list[str], metrics: list[str]) -> list[dict[str, object]]:
    """One record per run and category (sorted, the mean last): variant (the column name), the run's own
    label, the category and each metric in percent (NaN where missing or undefined)."""
    return [
        {
            "variant": name,
            "label": run.label,
            "category": category,
            **{metric: values.get(metric, math.nan) for metric in metrics},
        }
        for name, run in zip(labels, runs)
        for category, values in [
            *((category, run.rows.get(category, {})) for category in _categories(runs)),
            (MEAN_ROW, run.mean),
        ]
    ]


def to_csv(records: list[dict[str, object]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(
        {key: repr(value) if isinstance(value, float) else csv_cell(value) for key, value in record.items()}
        for record in records
    )
    return buffer.getvalue()


def to_markdown(tables) -> str:
    lines = ["# Comparison", "", "Metrics × 100; in brackets the difference to the first run.", ""]
    for title, headers, rows in tables:
        # Escaped category names cannot pose as the mean row, which is last and bold.
        rows = [[markdown_cell(row[0]), *row[1:]] for row in rows[:-1]] + [[f"**{cell}**" for cell in rows[-1]]]
        lines += [f"## {title}", "", *markdown_table([markdown_cell(header) for header in headers], rows), ""]
    return "\n".join(lines)


def _rich_tables(tables: list[tuple[str, list[str], list[list[str]]]]) -> list[Table]:
    rich_tables = []
    for title, headers, rows in tables:
        table = Table(title=title)
        for index, header in enumerate(headers):
            table.add_column(rich_text(header), justify="left" if index == 0 else "right")
        for index, row in enumerate(rows):
            table.add_row(rich_text(row[0]), *row[1:], style="bold" if index == len(rows) - 1 else None)
        rich_tables.append(table)
    return rich_tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anovl compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (or results.json files); the first is the baseline")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), choices=sorted(ALL_METRIC_TITLES))
    parser.add_argument("--output", type=Path, help="also write the comparison: Markdown, or CSV for a .csv name")
    parser.add_argument("--labels", nargs="+", help="column names, one per run (default: each run's own label)")
    args = parser.parse_args(argv)
    runs = [load_run(directory) for directory in args.runs]
    labels = _unique_labels(runs, args.runs, args.labels)
    tables = build_tables(runs, labels, args.metrics)
    rich_tables = _rich_tables(tables)
    console = console_for(*rich_tables)
    options = console.options.update_width(10_000)
    if max(console.measure(table, options=options).maximum for table in rich_tables) > console.width:
        # Labels as wide as the terminal would be cut short in the headers: number the runs, name them above.
        keys = [f"run {index}" for index in range(1, len(labels) + 1)]
        for key, label in zip(keys, labels):
            console.print(f"[bold]{key}[/bold]: {rich_text(label)}", overflow="fold", highlight=False)
        rich_tables = _rich_tables(build_tables(runs, keys, args.metrics))
    for table in rich_tables:
        console.print(table)
    if any(run.random_weights for run in runs):
        console.print(RANDOM_WEIGHTS_WARNING, style="bold red")
    if args.output:
        text = (
            to_csv(comparison_records(runs, labels, args.metrics))
            if args.output.suffix.lower() == ".csv"
            else to_markdown(tables)
        )
        write_file(args.output, text)
        console.print(f"Comparison written to {rich_text(args.output)}")
