"""``anovl grid``: run variants × datasets from one YAML, each pair as its own ``anovl test`` run, and write one
comparison table.

    anovl grid --config configs/grid.yaml
    anovl grid --config configs/grid.yaml --output runs/my_grid -- --trainer.devices 2

The grid file names LightningCLI configs, nothing new: each variant and each dataset is a list of config files
(paths relative to the grid file) and/or inline config mappings, given to ``anovl test`` as ``--config`` in
the order dataset, then variant; ``args`` (and anything after ``--``) are further ``anovl test`` options
for every run::

    name: tta-variants                # the runs' W&B group and the output folder runs/grid/<name>
    variants:
      TFA: []
      TTA-text: [tta/text.yaml]
      TTA-lowrank: [tta/lowrank.yaml, {model: {init_args: {tta: {adapter_args: {rank: 4}}}}}]
    datasets:
      MVTec: [mvtec.yaml]
      VisA: [visa.yaml]
    args: []
    metrics: [pixel_auroc, pixel_aupro, image_auroc]

Every run is an ``anovl test`` process writing into ``<output>/<dataset>/<variant>/`` (results, config.yaml,
pictures, the CSV/TensorBoard logger's files); with W&B all runs of the grid share the group ``name``. The
grid resumes like ``test``: a finished run is skipped, an interrupted one continues with ``--resume``, one
that never finished a category starts again. At the end ``<output>/grid.md`` and ``grid.csv`` compare the
variants per dataset (``anovl compare``'s tables, the first variant as the baseline).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from anovl.compare import DEFAULT_METRICS, Run, build_tables, comparison_records, load_run, to_csv, to_markdown
from anovl.errors import AnovlError
from anovl.results import ALL_METRIC_TITLES, atomic_write_text

GRID_KEYS = {"name", "variants", "datasets", "args", "metrics"}


@dataclass
class Cell:
    dataset: str
    variant: str
    configs: list[str]  # --config values: paths, or inline YAML
    folder: Path

    @property
    def state(self) -> str:
        """``finished``, ``interrupted`` (some categories done: resume) or ``new``."""
        results = self.folder / "results.json"
        if not results.is_file():
            return "new"
        try:
            complete = json.loads(results.read_text(encoding="utf-8")).get("complete")
        except (OSError, ValueError) as error:
            raise AnovlError(f"cannot read {results} ({error}); move the folder away to run this cell again") from None
        return "finished" if complete else "interrupted"


@dataclass
class Grid:
    name: str
    cells: list[Cell]
    args: list[str]
    metrics: list[str]
    datasets: list[str]
    variants: list[str]


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(char in value for char in "/\\\n"):
        raise AnovlError(f"grid {what} name {value!r} must be a non-empty line without '/' or '\\' "
                         "(it names a folder)")
    return value.strip()


def _config_values(entries: Any, where: str, base: Path) -> list[str]:
    """A variant's or dataset's configs as ``--config`` values: existing files, inline mappings as YAML."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        entries = [entries]
    values = []
    for entry in entries:
        if isinstance(entry, dict):
            values.append(yaml.safe_dump(entry, sort_keys=False))
        elif isinstance(entry, str):
            path = Path(entry).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise AnovlError(f"{where}: config file {entry} not found (relative paths are relative to the "
                                 f"grid file's folder {base})")
            values.append(str(path))
        else:
            raise AnovlError(f"{where}: give config files or config mappings, got {entry!r}")
    return values


def _named_lists(document: dict[str, Any], key: str, path: Path) -> dict[str, list[str]]:
    section = document.get(key)
    if not isinstance(section, dict) or not section:
        example = "{TFA: [], TTA-text: [tta/text.yaml]}" if key == "variants" else "{MVTec: [mvtec.yaml]}"
        raise AnovlError(f"{path}: '{key}' must map names to lists of config files or mappings, e.g. "
                         f"{key}: {example}")
    return {_name(name, key[:-1]): _config_values(entries, f"{path} {key}.{name}", path.parent)
            for name, entries in section.items()}


def load_grid(path: Path, output: Path | None) -> Grid:
    """The grid of a grid file: cells in dataset-major order, each with its --config values and folder."""
    if not path.is_file():
        raise AnovlError(f"grid file {path} not found")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise AnovlError(f"{path} is not valid YAML ({type(error).__name__})") from None
    if not isinstance(document, dict):
        raise AnovlError(f"{path} must be a mapping with 'variants' and 'datasets'")
    unknown = set(document) - GRID_KEYS
    if unknown:
        raise AnovlError(f"{path}: unknown keys {sorted(unknown)}; a grid file has {sorted(GRID_KEYS)}")
    name = _name(document.get("name", path.stem), "grid")
    variants = _named_lists(document, "variants", path)
    datasets = _named_lists(document, "datasets", path)
    args = document.get("args") or []
    if not isinstance(args, list):
        raise AnovlError(f"{path}: 'args' must be a list of anovl test options, e.g. [--trainer.devices, '2']")
    metrics = document.get("metrics") or list(DEFAULT_METRICS)
    unknown_metrics = [metric for metric in metrics if metric not in ALL_METRIC_TITLES]
    if unknown_metrics:
        raise AnovlError(f"{path}: unknown metrics {unknown_metrics}; choose from {sorted(ALL_METRIC_TITLES)}")
    output = output or Path("runs") / "grid" / name
    cells = [Cell(dataset, variant, [*dataset_configs, *variant_configs], output / dataset / variant)
             for dataset, dataset_configs in datasets.items() for variant, variant_configs in variants.items()]
    return Grid(name, cells, [str(arg) for arg in args], list(metrics), list(datasets), list(variants))


def cell_command(grid: Grid, cell: Cell, extra: list[str]) -> list[str]:
    """The ``anovl test`` command line of a cell: a fresh run into its folder, or ``--resume`` of it."""
    state = cell.state
    where = ["--resume", str(cell.folder)] if state == "interrupted" else ["--run_dir", str(cell.folder)]
    configs = [item for config in cell.configs for item in ("--config", config)]
    return [sys.executable, "-m", "anovl.cli", "test", *configs, *grid.args, *extra, "--engine.group", grid.name,
            *where]


def comparison_csv(grid: Grid, runs: dict[tuple[str, str], Run]) -> str:
    """One row per dataset, variant and category (the mean last): the metrics in percent."""
    records = []
    for dataset in grid.datasets:
        variants = [variant for variant in grid.variants if (dataset, variant) in runs]
        records += [{"dataset": dataset, **record} for record in
                    comparison_records([runs[dataset, variant] for variant in variants], variants, grid.metrics)]
    return to_csv(records)


def comparison_markdown(grid: Grid, runs: dict[tuple[str, str], Run]) -> str:
    sections = [f"# Grid {grid.name}", ""]
    for dataset in grid.datasets:
        variants = [variant for variant in grid.variants if (dataset, variant) in runs]
        if not variants:
            continue
        tables = build_tables([runs[dataset, variant] for variant in variants], variants, grid.metrics)
        body = to_markdown(tables).replace("# Comparison", f"## {dataset}", 1).replace("\n## ", "\n### ")
        sections.append(body)
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anovl grid", description=__doc__.split("\n\n")[0].replace("``", "'"),
                                     epilog="Options after -- go to every `anovl test` run.")
    parser.add_argument("-c", "--config", type=Path, required=True, help="the grid file (YAML)")
    parser.add_argument("--output", type=Path, help="folder of the runs and tables (default: runs/grid/<name>)")
    parser.add_argument("--dry_run", action="store_true", help="print each run's state and command, run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    grid = load_grid(args.config, args.output)
    console = Console()
    failed = []
    for cell in grid.cells:
        state = cell.state
        command = cell_command(grid, cell, extra)
        console.print(f"[bold]{cell.dataset} × {cell.variant}[/bold]: {state}"
                      f"{'' if state == 'finished' else ' -> ' + ' '.join(command[3:])}", highlight=False)
        if state == "finished" or args.dry_run:
            continue
        if subprocess.run(command).returncode != 0:
            failed.append(f"{cell.dataset} × {cell.variant}")
    if args.dry_run:
        return
    runs = {(cell.dataset, cell.variant): load_run(cell.folder) for cell in grid.cells
            if (cell.folder / "results.json").is_file()}
    output = args.output or grid.cells[0].folder.parent.parent
    if runs:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / "grid.md", comparison_markdown(grid, runs))
        atomic_write_text(output / "grid.csv", comparison_csv(grid, runs))
        console.print(f"Comparison of {len(runs)} runs written to {output}/grid.md and grid.csv")
    if failed:
        raise AnovlError(f"{len(failed)} of {len(grid.cells)} runs failed ({', '.join(failed)}); their messages "
                         "are above; run the same `anovl grid` command again to retry them (finished runs are kept)")
