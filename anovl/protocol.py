"""``anovl protocol``: the cross-dataset zero-shot protocol of methods trained on auxiliary data, as one command.

    anovl protocol --config configs/protocol.yaml
    anovl protocol --config configs/protocol.yaml --output runs/my_protocol -- --trainer.devices 2

Methods with trained parts (APRIL-GAN, AnomalyCLIP) are trained on one dataset's labelled test split and tested
on another (MVTec AD → VisA, then VisA → MVTec AD); training-free methods (AnoVL, WinCLIP) are only tested.
The protocol file names LightningCLI configs, as a grid file does (paths relative to the file, or inline)::

    name: cross-dataset
    datasets:                                  # the data of fit and test
      MVTec: [mvtec.yaml, {data: {init_args: {root: data/mvtec}}}]
      VisA: [visa.yaml, {data: {init_args: {mode: resize}}}]
    pairs: [[MVTec, VisA], [VisA, MVTec]]      # train on the first, test on the second
    methods:
      AnoVL: {configs: []}
      WinCLIP: {configs: [winclip.yaml]}
      APRIL-GAN:
        configs: [aprilgan.yaml]
        fit:                                   # trained: fit's extra configs per training dataset
          MVTec: [{engine: {mosaic_rate: 0.2}, trainer: {max_epochs: 3}}]
          VisA: [{trainer: {max_epochs: 15}}]
    metrics: [pixel_auroc, pixel_aupro, image_auroc]
    args: []                                   # further options of every fit and test

Every run is its own ``anovl fit`` / ``anovl test`` process: fits go to ``<output>/fit/<train>/<method>/``, tests
to ``<output>/test/<train>-to-<test>/<method>/``; a test of a trained method loads its fit's ``last.ckpt``. A
finished fit or test (its checkpoint, its complete results.json) is not run again. At the end
``<output>/protocol.md`` and ``protocol.csv`` hold one table: a row per pair, the methods' mean metrics side by
side.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from anovl.compare import DEFAULT_METRICS, load_run
from anovl.errors import AnovlError
from anovl.grid import _config_values, _name, results_state
from anovl.io import read_yaml, write_file
from anovl.results import ALL_METRIC_TITLES

PROTOCOL_KEYS = {"name", "datasets", "pairs", "methods", "metrics", "args"}


@dataclass
class Method:
    configs: list[str]
    fit: dict[str, list[str]] | None = None  # training dataset -> fit's extra configs; None: training-free


@dataclass
class Protocol:
    name: str
    datasets: dict[str, list[str]]
    pairs: list[tuple[str, str]]
    methods: dict[str, Method]
    metrics: list[str]
    args: list[str]
    output: Path
    log: list[str] = field(default_factory=list)


def load_protocol(path: Path, output: Path | None) -> Protocol:
    if not path.is_file():
        raise AnovlError(f"protocol file {path} not found")
    document = read_yaml(path, "protocol file")
    if not isinstance(document, dict):
        raise AnovlError(f"{path} must be a mapping with datasets, pairs and methods")
    unknown = sorted(set(document) - PROTOCOL_KEYS)
    if unknown:
        raise AnovlError(f"{path}: unknown keys {unknown}; a protocol file has {sorted(PROTOCOL_KEYS)}")
    base = path.parent
    datasets = document.get("datasets")
    if not isinstance(datasets, dict) or len(datasets) < 2:
        raise AnovlError(
            f"{path}: 'datasets' must name at least two datasets, e.g. {{MVTec: [mvtec.yaml], VisA: [visa.yaml]}}"
        )
    datasets = {
        _name(name, "dataset"): _config_values(entries, f"{path} datasets.{name}", base)
        for name, entries in datasets.items()
    }
    pairs = document.get("pairs") or [[first, second] for first in datasets for second in datasets if first != second]
    checked_pairs = []
    for pair in pairs:
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(name in datasets for name in pair) and pair[0] != pair[1]
        ):
            raise AnovlError(
                f"{path}: each pair is [train dataset, test dataset] of two different names among "
                f"{sorted(datasets)}, got {pair!r}"
            )
        checked_pairs.append((pair[0], pair[1]))
    methods = document.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise AnovlError(f"{path}: 'methods' must map names to {{configs: [...], fit: {{dataset: [...]}}}}")
    parsed = {}
    for name, entry in methods.items():
        name = _name(name, "method")
        if not isinstance(entry, dict) or set(entry) - {"configs", "fit"}:
            raise AnovlError(
                f"{path}: methods.{name} takes 'configs' (its model) and, if trained, 'fit' "
                "(extra configs per training dataset)"
            )
        fit = entry.get("fit")
        if fit is not None:
            if not isinstance(fit, dict):
                raise AnovlError(f"{path}: methods.{name}.fit maps training datasets to configs, e.g. {{MVTec: []}}")
            missing = sorted({train for train, _ in checked_pairs} - set(fit))
            extra = sorted(set(fit) - set(datasets))
            if missing or extra:
                raise AnovlError(
                    f"{path}: methods.{name}.fit must name every training dataset of the pairs "
                    f"(missing {missing or 'none'}, unknown {extra or 'none'})"
                )
            fit = {
                train: _config_values(configs, f"{path} methods.{name}.fit.{train}", base)
                for train, configs in fit.items()
            }
        parsed[name] = Method(_config_values(entry.get("configs"), f"{path} methods.{name}", base), fit)
    metrics = document.get("metrics") or list(DEFAULT_METRICS)
    unknown_metrics = sorted(set(metrics) - set(ALL_METRIC_TITLES))
    if unknown_metrics:
        raise AnovlError(f"{path}: unknown metrics {unknown_metrics}; known: {sorted(ALL_METRIC_TITLES)}")
    args = document.get("args") or []
    if not isinstance(args, list):
        raise AnovlError(f"{path}: 'args' must be a list of command-line options")
    name = _name(document.get("name") or path.stem, "protocol")
    return Protocol(
        name,
        datasets,
        checked_pairs,
        parsed,
        list(metrics),
        [str(arg) for arg in args],
        output or Path("runs") / "protocol" / name,
    )


def _configs(*groups: list[str]) -> list[str]:
    return [argument for group in groups for value in group for argument in ("--config", value)]


def _run(command: list[str], what: str) -> None:
    print(f"anovl protocol: {what}", flush=True)
    result = subprocess.run([sys.executable, "-m", "anovl.cli", *command], check=False)
    if result.returncode:
        raise AnovlError(f"{what} failed (exit {result.returncode}); see its output above")


def _logger(folder: Path) -> list[str]:
    # Each run's files in its own folder: a CSV logger at <folder>/version_N.
    return [
        "--trainer.logger",
        "CSVLogger",
        "--trainer.logger.init_args.save_dir",
        str(folder.parent),
        "--trainer.logger.init_args.name",
        folder.name,
    ]


def fit_checkpoint(protocol: Protocol, method: str, train: str, extra: list[str]) -> Path:
    """The checkpoint of ``method`` trained on ``train``: an earlier fit's, or a new fit's."""
    folder = protocol.output / "fit" / train / method
    found = sorted(folder.glob("version_*/checkpoints/last.ckpt"))
    if found:
        return found[-1]
    entry = protocol.methods[method]
    assert entry.fit is not None, "called for trained methods only"
    _run(
        [
            "fit",
            *_configs(protocol.datasets[train], entry.configs, entry.fit[train]),
            *_logger(folder),
            "--engine.group",
            protocol.name,
            *protocol.args,
            *extra,
        ],
        f"fit {method} on {train}",
    )
    found = sorted(folder.glob("version_*/checkpoints/last.ckpt"))
    if not found:
        raise AnovlError(f"fit {method} on {train} wrote no checkpoint under {folder}")
    return found[-1]


def test_run(protocol: Protocol, method: str, train: str, test: str, checkpoint: Path | None, extra: list[str]) -> Path:
    """The finished test run of ``method`` on ``test`` (trained on ``train`` where it trains)."""
    folder = protocol.output / "test" / f"{train}-to-{test}" / method
    for version in sorted(folder.glob("version_*")):
        if results_state(version) == "finished":  # only a boolean true counts (anovl.io.schemas.GridState)
            return version
    entry = protocol.methods[method]
    loaded = ["--ckpt_path", str(checkpoint)] if checkpoint is not None else []
    _run(
        [
            "test",
            *_configs(protocol.datasets[test], entry.configs),
            *_logger(folder),
            *loaded,
            "--engine.group",
            protocol.name,
            *protocol.args,
            *extra,
        ],
        f"test {method}: {train} → {test}",
    )
    versions = sorted(folder.glob("version_*"))
    if not versions:
        raise AnovlError(f"test {method} ({train} → {test}) wrote no run under {folder}")
    return versions[-1]


def protocol_table(protocol: Protocol, runs: dict[tuple[str, str, str], Path]) -> tuple[str, str]:
    """Markdown and CSV: a row per pair, per method its mean metrics (percent)."""
    methods = list(protocol.methods)
    titles = [f"{method} {ALL_METRIC_TITLES[metric]}" for method in methods for metric in protocol.metrics]
    note = (
        "Trained methods learn on the first dataset and are tested on the second; training-free methods are "
        "tested only. Mean over the test dataset's categories, × 100."
    )
    lines = [
        f"# Protocol {protocol.name}",
        "",
        note,
        "",
        "| train → test | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(titles),
    ]
    csv = ["train,test,method,metric,value"]
    for train, test in protocol.pairs:
        cells = []
        for method in methods:
            run = load_run(runs[train, test, method])
            for metric in protocol.metrics:
                value = run.mean.get(metric, float("nan"))
                cells.append(f"{value:.1f}")
                csv.append(f"{train},{test},{method},{metric},{value:.4f}")
        lines.append(f"| {train} → {test} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", "\n".join(csv) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anovl protocol", description=__doc__.split("\n\n")[0].replace("``", "'"))
    parser.add_argument("--config", required=True, type=Path, help="the protocol file (see configs/protocol.yaml)")
    parser.add_argument("--output", type=Path, default=None, help="folder of its runs (default runs/protocol/<name>)")
    parser.add_argument("extra", nargs="*", help="after --: options for every fit and test")
    arguments = parser.parse_args(argv)
    protocol = load_protocol(arguments.config.expanduser().resolve(), arguments.output)
    runs: dict[tuple[str, str, str], Path] = {}
    for train, test in protocol.pairs:
        for method, entry in protocol.methods.items():
            checkpoint = fit_checkpoint(protocol, method, train, arguments.extra) if entry.fit is not None else None
            runs[train, test, method] = test_run(protocol, method, train, test, checkpoint, arguments.extra)
    markdown, csv = protocol_table(protocol, runs)
    protocol.output.mkdir(parents=True, exist_ok=True)
    write_file(protocol.output / "protocol.md", markdown, protocol.output)
    write_file(protocol.output / "protocol.csv", csv, protocol.output)
    Console().print(markdown)
    print(f"Written to {protocol.output}/protocol.md and protocol.csv")
