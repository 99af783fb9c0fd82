"""``anovl grid``: run variants × datasets from one YAML, each pair as its own ``anovl test`` run, and write one
comparison table.

    anovl grid --config configs/grid.yaml
    anovl grid --config configs/grid.yaml --output runs/my_grid -- --trainer.devices 2

The grid file names LightningCLI configs, nothing new: each variant and each dataset is a list of config files
(paths relative to the grid file) and/or inline config mappings, given to ``anovl test`` as ``--config`` in
the order dataset, then variant; ``args`` (and anything after ``--``) are further ``anovl test`` options
for every run::

    name: tta-variants                # the runs' W&B group and the output folder runs/grid/<name>
                                      # (each run's W&B name and tags carry its variant's name)
    variants:
      TFA: []
      TTA-text: [tta/text.yaml]
      TTA-lowrank: [tta/lowrank.yaml, {model: {init_args: {tta: {adapter_args: {rank: 4}}}}}]
    datasets:
      MVTec: [mvtec.yaml]
      VisA: [visa.yaml]
    args: []
    metrics: [pixel_auroc, pixel_aupro, image_auroc]

Every run is an ``anovl test`` process writing into ``<output>/<dataset>/<variant>/version_<n>/`` (results,
config.yaml, pictures, the CSV/TensorBoard logger's files); with W&B all runs of the grid share the group
``name``. A cell knows what it ran: ``grid-cell.json`` in its version folder records the settings its configs
resolved to (see :func:`cell_settings`: the model, the data, the trainer options that change numbers, the
seed, the plugins and their files' hashes). The grid resumes like ``test``: a version whose record equals
what the configs resolve to now is finished (skipped) or interrupted (continued with ``--resume``), or starts
again if it never finished a category; a cell whose configs changed (``changed: rank 4 → 8``) runs into a new
version folder, and the older versions stay on disk. At the end ``<output>/grid.md`` and ``grid.csv`` compare
the variants per dataset from the versions that match the configs (``anovl compare``'s tables, the first
variant as the baseline).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from anovl.compare import DEFAULT_METRICS, Run, build_tables, comparison_records, load_run, to_csv, to_markdown
from anovl.configs import read_yaml_mapping
from anovl.errors import AnovlError
from anovl.io import make_folder, markdown_cell, parse_json, read_json, read_text, rich_text, write_file
from anovl.io.schemas import GridState
from anovl.results import ALL_METRIC_TITLES

GRID_KEYS = {"name", "variants", "datasets", "args", "metrics"}
CELL_RECORD = "grid-cell.json"  # in a version folder: the settings that version ran with
VERSION = re.compile(r"version_(\d+)")
# Options that change how a run goes, not its numbers (model and data init_args of anovl's classes).
RUNTIME_OPTIONS = frozenset(
    {"batch_size", "num_workers", "decoded_cache_gb", "cache_dir", "use_text_cache", "encoder_chunk_size"}
)
# Trainer options that change the numbers (precision) or which images are seen.
NUMBER_TRAINER_OPTIONS = ("precision", "limit_test_batches", "fast_dev_run")


@dataclass
class Cell:
    dataset: str
    variant: str
    configs: list[str]  # --config values: paths, or inline YAML
    base: Path  # <output>/<dataset>/<variant>; each version of the cell is a folder in it
    folder: Path = field(init=False)  # the version this grid uses: set by plan()
    state: str = "new"  # finished, interrupted (resume it), new, or changed (a new version): set by plan()
    changes: list[str] = field(default_factory=list)  # "rank 4 → 8" against the latest version, where changed

    def __post_init__(self) -> None:
        self.folder = self.base / "version_0"

    def versions(self) -> list[Path]:
        """The cell's version folders, oldest first."""
        folders = [path for path in self.base.glob("version_*") if path.is_dir() and VERSION.fullmatch(path.name)]
        return sorted(folders, key=lambda path: int(path.name.split("_")[1]))

    def plan(self, settings: dict[str, Any]) -> None:
        """Choose the version that ran with ``settings`` (the latest such), or a new one; set its state."""
        versions = self.versions()
        recorded = {path: read_cell_record(path) for path in versions}
        matching = [path for path in versions if recorded[path] == settings]
        if matching:
            self.folder, self.changes = matching[-1], []
            self.state = results_state(self.folder)
            return
        number = int(versions[-1].name.split("_")[1]) + 1 if versions else 0
        self.folder = self.base / f"version_{number}"
        earlier = next((recorded[path] for path in reversed(versions) if recorded[path] is not None), None)
        self.changes = setting_changes(earlier, settings) if earlier is not None else []
        self.state = "changed" if versions else "new"


def results_state(folder: Path) -> str:
    """``finished``, ``interrupted`` (some categories done: resume) or ``new`` (no category finished)."""
    results = folder / "results.json"
    if not results.is_file():
        return "new"
    state = read_json(results, GridState, "the grid cell's results file", "move the folder away to run this cell again")
    return "finished" if state.complete is True else "interrupted"


def read_cell_record(folder: Path) -> dict[str, Any] | None:
    """The settings a version ran with; None where it has no readable record (then it matches nothing)."""
    if not (folder / CELL_RECORD).is_file():
        return None
    try:
        record = parse_json(read_text(folder / CELL_RECORD, "grid cell record"), str(folder / CELL_RECORD))
    except AnovlError:
        return None
    return record.get("settings") if isinstance(record, dict) else None


def _file_hash(path: str | None) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None
    except OSError:
        return None


def plugin_hashes(specs: list[str]) -> dict[str, str | None]:
    """A hash of each plugin's file (a ``.py`` path, or an imported module's source file), so that an edited
    plugin makes its cells run again."""
    hashes = {}
    for spec in specs:
        if spec.endswith(".py") or "/" in spec or os.sep in spec:
            hashes[spec] = _file_hash(str(Path(spec).expanduser()))
        else:
            module = sys.modules.get(spec)
            origin = getattr(module, "__file__", None)
            if origin is None:
                found = importlib.util.find_spec(spec)
                origin = found.origin if found is not None else None
            hashes[spec] = _file_hash(origin)
    return hashes


def _without_runtime_options(section: Any) -> Any:
    if not isinstance(section, dict):
        return section
    init_args = {key: value for key, value in (section.get("init_args") or {}).items() if key not in RUNTIME_OPTIONS}
    return {**section, "init_args": init_args}


def cell_settings(config: dict[str, Any], plugins: list[str]) -> dict[str, Any]:
    """What a cell's numbers depend on, from its resolved configuration (``anovl test --print_config``): the
    model and data (but not batch size, workers or caches), the evaluation options, the seed, the trainer
    options that change numbers, and the plugins with their files' hashes."""
    trainer = config.get("trainer") or {}
    engine = config.get("engine") or {}
    return json.loads(
        json.dumps(
            {
                "model": _without_runtime_options(config.get("model")),
                "data": _without_runtime_options(config.get("data")),
                "evaluation": {
                    "cflow_pro": engine.get("cflow_pro"),
                    "tf32": engine.get("tf32"),
                    "seed_everything": config.get("seed_everything"),
                    **{key: trainer.get(key) for key in NUMBER_TRAINER_OPTIONS},
                },
                "plugins": plugin_hashes(plugins),
            }
        )
    )


def setting_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key old → new`` for each setting that differs (keys as short as unique; ``-`` where absent)."""
    from anovl.models.base import setting_differences, short_value

    before, now = dict(before), dict(now)
    # Plugin keys are file names and module paths, whose dots are not levels of settings.
    plugins_before, plugins_now = before.pop("plugins", {}) or {}, now.pop("plugins", {}) or {}
    new, old = setting_differences(now, before), setting_differences(before, now)
    changes = [
        f"{key} {short_value(old.get(key, '-'))} → {short_value(new.get(key, '-'))}"
        for key in sorted(set(new) | set(old))
    ]
    for spec in sorted(set(plugins_before) | set(plugins_now)):
        if spec not in plugins_before or spec not in plugins_now:
            changes.append(f"plugin {spec} {'added' if spec in plugins_now else 'removed'}")
        elif plugins_before[spec] != plugins_now[spec]:
            changes.append(f"plugin {spec} edited")
    return changes


@dataclass
class Grid:
    name: str
    cells: list[Cell]
    args: list[str]
    metrics: list[str]
    datasets: list[str]
    variants: list[str]


def _name(value: Any, what: str) -> str:
    """A grid, variant or dataset name, validated like a run label: it names a folder, so no separators,
    no control characters, and not ``.``, ``..`` or hidden."""
    if (
        not isinstance(value, str)
        or not value.strip()
        or any(char in value for char in "/\\")
        or not value.strip().isprintable()
        or value.strip().startswith(".")
    ):
        raise AnovlError(
            f"grid {what} name {value!r} must be a non-empty line without '/' or '\\', control "
            "characters or a leading '.' (it names a folder)"
        )
    return unicodedata.normalize("NFC", value.strip())


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
                raise AnovlError(
                    f"{where}: config file {entry} not found (relative paths are relative to the "
                    f"grid file's folder {base})"
                )
            values.append(str(path))
        else:
            raise AnovlError(f"{where}: give config files or config mappings, got {entry!r}")
    return values


def _named_lists(document: dict[str, Any], key: str, path: Path) -> dict[str, list[str]]:
    section = document.get(key)
    if not isinstance(section, dict) or not section:
        example = "{TFA: [], TTA-text: [tta/text.yaml]}" if key == "variants" else "{MVTec: [mvtec.yaml]}"
        raise AnovlError(f"{path}: '{key}' must map names to lists of config files or mappings, e.g. {key}: {example}")
    named = {}
    folded: dict[str, Any] = {}
    for name, entries in section.items():
        clean = _name(name, key[:-1])
        other = folded.setdefault(clean.casefold(), name)
        if other != name:  # one folder for both, on any filesystem that folds case
            raise AnovlError(f"{path}: the {key} {other!r} and {name!r} name the same folder; rename one")
        named[clean] = _config_values(entries, f"{path} {key}.{name}", path.parent)
    return named


def load_grid(path: Path, output: Path | None) -> Grid:
    """The grid of a grid file: cells in dataset-major order, each with its --config values and folder."""
    document = read_yaml_mapping(path, "grid file", "'variants' and 'datasets'")
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
    cells = [
        Cell(dataset, variant, [*dataset_configs, *variant_configs], output / dataset / variant)
        for dataset, dataset_configs in datasets.items()
        for variant, variant_configs in variants.items()
    ]
    return Grid(name, cells, [str(arg) for arg in args], list(metrics), list(datasets), list(variants))


def test_arguments(grid: Grid, cell: Cell, extra: list[str]) -> list[str]:
    """``test`` and the options that configure a cell (its configs, the grid's args and ``extra``)."""
    configs = [item for config in cell.configs for item in ("--config", config)]
    return ["test", *configs, *grid.args, *extra]


def plan_cells(grid: Grid, extra: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """Resolve every cell's configuration (plugins imported first, as ``anovl test`` does) and choose its
    version (:meth:`Cell.plan`). Returns the settings per cell; a cell whose configuration does not resolve
    is left out, with the parser's message printed."""
    from anovl.cli import plugin_specs  # torch and Lightning: only once a grid is run
    from anovl.lightning_cli import resolved_config
    from anovl.plugins import ENVIRONMENT_VARIABLE, load_plugin, load_plugins

    load_plugins()  # the entry points and $ANOVL_PLUGINS, once
    environment = [spec for spec in os.environ.get(ENVIRONMENT_VARIABLE, "").split(":") if spec.strip()]
    imported: set[str] = set()
    settings = {}
    for cell in grid.cells:
        arguments = test_arguments(grid, cell, extra)
        specs = plugin_specs(arguments)
        for spec in specs:
            if spec not in imported:
                load_plugin(spec)
                imported.add(spec)
        try:
            config = resolved_config(arguments)
        except AnovlError as error:
            Console(stderr=True).print(f"{cell.dataset} × {cell.variant}: {error}", highlight=False, markup=False)
            continue
        settings[cell.dataset, cell.variant] = cell_settings(config, [*environment, *specs])
        cell.plan(settings[cell.dataset, cell.variant])
    return settings


def cell_command(grid: Grid, cell: Cell, extra: list[str]) -> list[str]:
    """The ``anovl test`` command line of a cell: a fresh run into its folder, or ``--resume`` of it."""
    where = ["--resume", str(cell.folder)] if cell.state == "interrupted" else ["--run_dir", str(cell.folder)]
    return [
        sys.executable,
        "-m",
        "anovl.cli",
        *test_arguments(grid, cell, extra),
        "--engine.group",
        grid.name,
        "--engine.variant",
        cell.variant,
        *where,
    ]


def comparison_csv(grid: Grid, runs: dict[tuple[str, str], Run]) -> str:
    """One row per dataset, variant and category (the mean last): the metrics in percent."""
    records = []
    for dataset in grid.datasets:
        variants = [variant for variant in grid.variants if (dataset, variant) in runs]
        records += [
            {"dataset": dataset, **record}
            for record in comparison_records([runs[dataset, variant] for variant in variants], variants, grid.metrics)
        ]
    return to_csv(records)


def comparison_markdown(grid: Grid, runs: dict[tuple[str, str], Run]) -> str:
    sections = [f"# Grid {markdown_cell(grid.name)}", ""]
    for dataset in grid.datasets:
        variants = [variant for variant in grid.variants if (dataset, variant) in runs]
        if not variants:
            continue
        tables = build_tables([runs[dataset, variant] for variant in variants], variants, grid.metrics)
        body = to_markdown(tables).replace("# Comparison", f"## {markdown_cell(dataset)}", 1).replace("\n## ", "\n### ")
        sections.append(body)
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="anovl grid",
        description=__doc__.split("\n\n")[0].replace("``", "'"),
        epilog="Options after -- go to every `anovl test` run.",
    )
    parser.add_argument("-c", "--config", type=Path, required=True, help="the grid file (YAML)")
    parser.add_argument("--output", type=Path, help="folder of the runs and tables (default: runs/grid/<name>)")
    parser.add_argument("--dry_run", action="store_true", help="print each run's state and command, run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    grid = load_grid(args.config, args.output)
    console = Console()
    settings = plan_cells(grid, extra)
    failed = [f"{cell.dataset} × {cell.variant}" for cell in grid.cells if (cell.dataset, cell.variant) not in settings]
    for cell in grid.cells:
        if (cell.dataset, cell.variant) not in settings:
            continue
        command = cell_command(grid, cell, extra)
        changes = f": {', '.join(cell.changes)}" if cell.changes else ""
        console.print(
            f"[bold]{rich_text(cell.dataset)} × {rich_text(cell.variant)}[/bold]: {cell.state}"
            f"{rich_text(changes)}{'' if cell.state == 'finished' else ' -> ' + rich_text(' '.join(command[3:]))}",
            highlight=False,
        )
        if cell.state == "finished" or args.dry_run:
            continue
        make_folder(cell.folder)
        # Recorded before the run, so that an interrupted run is recognised (and resumed) next time.
        write_file(cell.folder / CELL_RECORD, json.dumps({"settings": settings[cell.dataset, cell.variant]}, indent=1))
        if subprocess.run(command).returncode != 0:
            failed.append(f"{cell.dataset} × {cell.variant}")
    if args.dry_run:
        return
    runs = {
        (cell.dataset, cell.variant): load_run(cell.folder)
        for cell in grid.cells
        if (cell.dataset, cell.variant) in settings and (cell.folder / "results.json").is_file()
    }
    output = args.output or grid.cells[0].base.parent.parent
    if runs:
        output.mkdir(parents=True, exist_ok=True)
        write_file(output / "grid.md", comparison_markdown(grid, runs), root=output)
        write_file(output / "grid.csv", comparison_csv(grid, runs), root=output)
        console.print(f"Comparison of {len(runs)} runs written to {output}/grid.md and grid.csv")
    if failed:
        raise AnovlError(
            f"{len(failed)} of {len(grid.cells)} runs failed ({', '.join(failed)}); their messages "
            "are above; run the same `anovl grid` command again to retry them (finished runs are kept)"
        )
