"""The per-category results table of a test run: printed with rich, written as CSV / JSON / Markdown.

Values are percentages (metric × 100, the papers' convention): full precision in CSV and JSON, one decimal
in Markdown and on screen. The "mean" row averages each metric over the categories where it is defined
(a metric is NaN where undefined, e.g. image AUROC of a category without anomalous images), and sums the
image counts. The files are rewritten atomically after every category, so they are readable at any time: a
failed write (a full disk) is one clear error and leaves the previous files as they were. In CSV, Markdown and
on screen the mean is the last row, labelled ``mean (all categories)`` (Markdown escapes category names, so
only the real mean row is bold); in JSON it is a separate record, so a category may be called ``mean``.

results.json also records the run's configuration (what its metrics depend on) and the files that
``on_bad_image: skip`` left out, so that ``anovl test --resume`` can check and continue an interrupted run.

It also keeps the F1-max thresholds (raw score values, not percentages) of each category and their mean
under ``thresholds``, which ``anovl predict --predictions.thresholds results.json`` applies
(:mod:`anovl.thresholds`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from anovl.errors import AnovlError
from anovl.io import csv_cell, markdown_cell, read_text, rich_text, validate, write_texts
from anovl.io.reading import parse_json
from anovl.io.schemas import ResultsRecord

METRIC_TITLES = {
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_f1max": "pixel F1-max",
    "pixel_aupro": "AUPRO",
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "image_f1max": "image F1-max",
}
OPTIONAL_METRIC_TITLES = {"pixel_aupro_cflow": "AUPRO (cflow-style)"}
ALL_METRIC_TITLES = {**METRIC_TITLES, **OPTIONAL_METRIC_TITLES}
MEAN_ROW = "mean (all categories)"
# compute() keys that are score thresholds, not metrics: kept apart from the rows (which are in percent).
THRESHOLD_KEYS = {"image_f1max_threshold": "image", "pixel_f1max_threshold": "pixel"}
THRESHOLD_MEAN = "mean"
THRESHOLD_RULE = "F1-max thresholds (score values): anomalous where score >= threshold; mean: over categories"
RESULT_FILES = ("results.csv", "results.json", "results.md")
RANDOM_WEIGHTS_WARNING = (
    "WARNING: the backbone has random weights (pretrained: null), so these scores mean nothing; "
    "they only show that the pipeline runs. Set model.init_args.pretrained to real CLIP weights."
)


def _finite_mean(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else math.nan


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a Markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def console_for(*tables: Table) -> Console:
    """A console that prints ``tables`` whole.

    Off a terminal (logs, CI) rich assumes 80 columns and would truncate the headers; nothing wraps the lines
    there, so the tables are printed at their natural width.
    """
    console = Console()
    if not console.is_terminal:
        options = console.options.update_width(1000)
        natural = max(console.measure(table, options=options).maximum for table in tables)
        console = Console(width=max(console.width, natural))
    return console


def _one_decimal(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def _read_error(path: Path, problem: str) -> AnovlError:
    return AnovlError(
        f"{path} is not a results file that anovl test wrote: {problem}; "
        "start a new run, or give the folder of another run"
    )


class ResultsTable:
    """Per-category metrics of one run, and their mean.

    Args:
        directory: where results.csv / .json / .md are written (None: keep them in memory only).
        title: a line naming the run (model and data), shown above the table.
        random_weights: the backbone has random weights; the printed table and the Markdown say the scores
            mean nothing.
        expected_categories: how many categories the run will report, to mark partial files.
        label: the run's label (the method plus what differs from its reference settings, or the user's own),
            which ``anovl compare`` and the loggers use.
        config: JSON-like settings that the metrics depend on, recorded for ``anovl test --resume``.
        skipped_files: one message per file that ``on_bad_image: skip`` left out or used without its mask.
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        title: str = "",
        random_weights: bool = False,
        expected_categories: int | None = None,
        label: str = "",
        config: Mapping[str, Any] | None = None,
        skipped_files: Sequence[str] = (),
    ):
        self.directory = Path(directory) if directory is not None else None
        self.title = title
        self.label = label
        self.random_weights = random_weights
        self.expected_categories = expected_categories
        self.config = dict(config) if config is not None else None
        self.skipped_files = list(skipped_files)
        self.rows: dict[str, dict[str, float]] = {}
        self.image_counts: dict[str, int] = {}
        self.thresholds: dict[str, dict[str, float]] = {}  # category -> {"image": t, "pixel": t} (NaN: undefined)

    @classmethod
    def read(cls, directory: str | os.PathLike) -> ResultsTable:
        """The table that a run wrote to ``directory`` (its results.json), e.g. to continue the run; how many
        categories the run has is not recorded there (``expected_categories`` is None)."""
        path = Path(directory) / "results.json"
        if not path.is_file():
            raise AnovlError(
                f"{path} not found: give the folder of a run that finished at least one category "
                "(runs/<name>/version_N), or start a new run without --resume"
            )
        try:
            document = parse_json(read_text(path, "results file"), "the file")
        except AnovlError as error:
            raise _read_error(path, str(error)) from None
        record = validate(
            document,
            ResultsRecord,
            f"{path} (not a results file that anovl test wrote)",
            "start a new run, or give the folder of another run",
        )
        table = cls(
            path.parent,
            record.title,
            record.random_weights,
            label=record.label,
            config=record.config,
            skipped_files=record.skipped_files or [],
        )
        for row in record.categories:
            metrics = row.model_dump(exclude_unset=True, exclude={"category", "images"})
            table.rows[row.category] = {name: math.nan if value is None else value for name, value in metrics.items()}
            table.image_counts[row.category] = row.images
        for category, pair in (record.thresholds.categories if record.thresholds else {}).items():
            table.thresholds[category] = {
                kind: math.nan if getattr(pair, kind) is None else getattr(pair, kind)
                for kind in THRESHOLD_KEYS.values()
            }
        return table

    def check_categories(self, known: Sequence[str]) -> None:
        """Refuse rows of categories that the dataset does not have (an edited or foreign results.json), which
        would otherwise enter the mean."""
        unknown = [category for category in self.rows if category not in set(known)]
        if unknown:
            raise AnovlError(
                f"{self.directory}/results.json has rows for categories that the dataset does not have: "
                f"{', '.join(map(repr, unknown))}; it belongs to another dataset or was edited; "
                "start a new run"
            )

    def include(self, earlier: ResultsTable) -> None:
        """Take over the finished categories and skipped files of an earlier, interrupted part of this run."""
        self.rows = {**earlier.rows, **self.rows}
        self.image_counts = {**earlier.image_counts, **self.image_counts}
        self.thresholds = {**earlier.thresholds, **self.thresholds}
        self.skipped_files = list(dict.fromkeys([*earlier.skipped_files, *self.skipped_files]))

    @property
    def metric_names(self) -> list[str]:
        present = {name for row in self.rows.values() for name in row}
        return list(METRIC_TITLES) + [name for name in OPTIONAL_METRIC_TITLES if name in present]

    @property
    def complete(self) -> bool:
        return self.expected_categories is None or len(self.rows) >= self.expected_categories

    def add(self, category: str, metrics: Mapping[str, float], num_images: int) -> None:
        """Record a finished category (metrics as fractions in [0, 1], as AnomalyMetrics gives them, with its
        F1-max thresholds if present) and rewrite the files."""
        self.rows[category] = {
            name: 100.0 * float(value) for name, value in metrics.items() if name not in THRESHOLD_KEYS
        }
        thresholds = {kind: float(metrics[key]) for key, kind in THRESHOLD_KEYS.items() if key in metrics}
        if thresholds:
            self.thresholds[category] = thresholds
        self.image_counts[category] = int(num_images)
        if self.directory is not None:
            self.write()

    def mean(self) -> dict[str, float]:
        return {
            name: _finite_mean([row.get(name, math.nan) for row in self.rows.values()]) for name in self.metric_names
        }

    def mean_thresholds(self) -> dict[str, float]:
        """Each threshold's mean over the categories where it is defined (the run's threshold)."""
        return {
            kind: _finite_mean([values.get(kind, math.nan) for values in self.thresholds.values()])
            for kind in THRESHOLD_KEYS.values()
        }

    def records(self) -> list[dict[str, Any]]:
        """One dict per category, then the mean row: category, images, and the metrics in percent."""
        rows = [(category, self.image_counts[category], row) for category, row in self.rows.items()]
        rows.append((MEAN_ROW, sum(self.image_counts.values()), self.mean()))
        return [
            {"category": category, "images": count, **{name: row.get(name, math.nan) for name in self.metric_names}}
            for category, count, row in rows
        ]

    def _status(self) -> str:
        if self.complete:
            return ""
        return f"in progress: {len(self.rows)} of {self.expected_categories} categories done"

    def _skipped_note(self) -> str:
        return (
            f"on_bad_image skip: {len(self.skipped_files)} files left out or used without their mask; "
            "results.json lists them"
        )

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["category", "images", *self.metric_names], lineterminator="\n")
        writer.writeheader()
        writer.writerows(
            {key: repr(value) if isinstance(value, float) else csv_cell(value) for key, value in record.items()}
            for record in self.records()
        )
        return buffer.getvalue()

    def to_json(self) -> str:
        def clean(value: object) -> object:
            return None if isinstance(value, float) and math.isnan(value) else value

        document = {
            "title": self.title,
            "label": self.label,
            "random_weights": self.random_weights,
            "complete": self.complete,
            "units": "percent (metric x 100); null where undefined",
            "columns": {name: ALL_METRIC_TITLES[name] for name in self.metric_names},
            "categories": [{key: clean(value) for key, value in record.items()} for record in self.records()[:-1]],
            "mean": {key: clean(value) for key, value in self.records()[-1].items() if key != "category"},
            "skipped_files": self.skipped_files,
            "config": self.config,
        }
        if self.thresholds:
            document["thresholds"] = {
                "rule": THRESHOLD_RULE,
                "categories": {
                    category: {kind: clean(value) for kind, value in values.items()}
                    for category, values in self.thresholds.items()
                },
                THRESHOLD_MEAN: {kind: clean(value) for kind, value in self.mean_thresholds().items()},
            }
        return json.dumps(document, indent=2) + "\n"

    def _headers(self) -> list[str]:
        return ["category", "images", *(ALL_METRIC_TITLES[name] for name in self.metric_names)]

    def _display_rows(self, escape=lambda text: text) -> list[list[str]]:
        records = self.records()
        return [
            [
                escape(str(record["category"])) if index < len(records) - 1 else MEAN_ROW,
                str(record["images"]),
                *(_one_decimal(record[name]) for name in self.metric_names),
            ]
            for index, record in enumerate(records)
        ]

    def to_markdown(self) -> str:
        lines = [f"# Results{': ' + self.title if self.title else ''}", ""]
        if self.random_weights:
            lines += [f"**{RANDOM_WEIGHTS_WARNING}**", ""]
        if self._status():
            lines += [f"_{self._status()}_", ""]
        if self.skipped_files:
            lines += [f"_{self._skipped_note()}_", ""]
        rows = self._display_rows(markdown_cell)
        rows[-1] = [f"**{cell}**" for cell in rows[-1]]
        lines += markdown_table(self._headers(), rows)
        lines += ["", "Metrics × 100; the mean is over categories (n/a: undefined, left out of the mean)."]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        """(Re)write results.csv, results.json and results.md in the directory."""
        if self.directory is None:
            raise ValueError("this results table has no directory to write to")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise AnovlError(
                f"cannot create the results folder {self.directory} ({error.strerror}); choose another output folder"
            ) from None
        write_texts(
            {
                self.directory / name: text
                for name, text in zip(RESULT_FILES, (self.to_csv(), self.to_json(), self.to_markdown()))
            }
        )

    def to_rich(self) -> Table:
        table = Table(
            title=rich_text(self.title) if self.title else None, caption="metrics × 100, mean over categories"
        )
        for index, header in enumerate(self._headers()):
            table.add_column(header, justify="left" if index == 0 else "right")
        rows = self._display_rows(rich_text)  # a category named "[bold]x" or holding ESC is shown as it is
        for index, row in enumerate(rows[:-1]):
            table.add_row(*row, end_section=index == len(rows) - 2)
        table.add_row(*rows[-1], style="bold")
        return table

    def print(self, console: Console | None = None) -> None:
        table = self.to_rich()
        console = console or console_for(table)
        console.print(table)
        if self.random_weights:
            console.print(RANDOM_WEIGHTS_WARNING, style="bold red")
        if self.skipped_files:
            console.print(self._skipped_note(), style="yellow")
        if self.directory is not None:
            console.print(f"Results written to {rich_text(self.directory)}/{{{','.join(RESULT_FILES)}}}")
