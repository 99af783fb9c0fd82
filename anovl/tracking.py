"""Experiment tracking: what every run gives its loggers, through one code path for all of Lightning's loggers.

:class:`RunTracker` (the CLI's config callback) does, for any logger in ``trainer.loggers``:

* the run's **full resolved config** (model, data, trainer, seed, plugins, engine, pictures, predictions: the
  whole LightningCLI configuration) goes to ``log_hyperparams`` (W&B: the run config; CSV: hparams.yaml;
  TensorBoard: hparams), and is saved as ``config.yaml`` in the run's own folder, never over another file;
* per-category and mean **metrics** as ``<category>/<metric>`` and ``mean/<metric>`` (:func:`log_metrics`,
  called by the module as categories finish): W&B gets them as the run's **summary** (one value per run, what
  W&B's run table, bar charts and parallel coordinates compare; no one-point history), other loggers through
  ``log_metrics``;
* at the end, the **results table**: W&B gets a ``wandb.Table`` (key ``results``: a ``label`` and a
  ``variant`` column, then one row per category and the mean, so the tables of several runs concatenate) and
  an artifact of type ``results`` holding results.csv / .json / .md and config.yaml; TensorBoard gets the
  Markdown table as text; other loggers have the config and metrics only.

The config's ``run`` section holds the run's full label, its variant key, its group and the command. W&B runs
are named, grouped and tagged by the Engine (:func:`anovl.engine.engine.name_wandb_run`).

The CSV logger gets no metrics: results.csv already holds one row per category with all its metrics (and the
mean), which a metrics.csv of one sparse row per logging call only repeated less readably.

A run that fails before it wrote any result removes the folder it created (and nothing else).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from anovl.io import make_folder, write_file
from anovl.models.base import json_data
from anovl.results import RESULT_FILES, ResultsTable

CONFIG_FILE = "config.yaml"
RESULTS_KEY = "results"  # the W&B table's key and the TensorBoard text tag
# What a run writes into its folder before its first result; a folder holding nothing else has no results.
STARTUP_FILES = frozenset({CONFIG_FILE, "hparams.yaml"})
TENSORBOARD_EVENTS = "events.out.tfevents."


def run_directory(trainer: Trainer) -> Path:
    """Where a run's files go: the CSV/TensorBoard logger's version folder, else <save_dir>/<name>/<version>
    of the first logger, else the trainer's default_root_dir. Must be called on every process."""
    logger = trainer.logger
    if logger is None or isinstance(logger, (CSVLogger, TensorBoardLogger)):
        directory = str(trainer.log_dir)  # already broadcast from rank 0 (versions are numbered there)
    else:
        parts = [logger.save_dir or trainer.default_root_dir, logger.name, logger.version]
        directory = str(Path(*(str(part) for part in parts if part)))
    return Path(trainer.strategy.broadcast(directory))


def metric_loggers(trainer: Trainer) -> list[Logger]:
    """The loggers that take metrics: all but CSV (its metrics.csv would only repeat results.csv)."""
    return [logger for logger in trainer.loggers if not isinstance(logger, CSVLogger)]


def log_metrics(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Send already-synced metrics straight to the loggers (rank 0 only); Lightning's own end-of-test table
    would only repeat the results table."""
    if not trainer.is_global_zero:
        return
    for logger in metric_loggers(trainer):
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(metrics)
        else:
            logger.log_metrics(metrics, step=trainer.global_step)


def free_config_path(directory: Path, name: str = CONFIG_FILE) -> Path:
    """``config.yaml`` (or ``name``) in ``directory``, or ``config.<n>.yaml`` with the first free n where
    anything (a file, a link, a user's own file) is there: a resumed run keeps the config of its first part."""
    stem, suffix = name.rsplit(".", 1)
    path = directory / name
    index = 1
    while os.path.lexists(path):
        path = directory / f"{stem}.{index}.{suffix}"
        index += 1
    return path


def _plain(value: Any) -> Any:
    """Hyperparameters as plain YAML data (Lightning may pass its AttributeDict or objects)."""
    return json.loads(json.dumps(value, default=str))


def guard_hparams(logger: CSVLogger, root: Path) -> Path:
    """Make the CSV logger write hparams.yaml through :mod:`anovl.io` (atomic, never through a link) and never
    over a file that was there before the run (a user's own, or an earlier part's: then ``hparams.<n>.yaml``).
    Lightning writes it on every ``log_hyperparams``, so its writer is replaced for this run."""
    experiment = logger.experiment
    path = free_config_path(Path(experiment.log_dir), experiment.NAME_HPARAMS_FILE)

    def log_hparams(params: dict[str, Any]) -> None:
        experiment.hparams.update(params)
        write_file(path, yaml.safe_dump(_plain(dict(experiment.hparams)), sort_keys=False), root)

    experiment.log_hparams = log_hparams
    return path


def _remove_if_empty(directory: Path, stop: Path) -> None:
    """Remove ``directory`` and its empty parents up to (not including) ``stop`` while they are empty."""
    while directory != stop and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
        directory = directory.parent


class RunRecorder(Callback):
    """Saves the run's config.yaml in the run's own folder, logs the full config, the results table and the
    results files to every logger, and cleans up after a run that failed before any result (see the module
    docstring). ``config`` is what it records (plain data, nulls kept); the CLI's :class:`RunTracker` records
    the parsed configuration instead."""

    def __init__(self, config: dict[str, Any] | None = None):
        self.record = json_data(config or {})
        self.already_saved = False
        self.run_dir: Path | None = None
        self.written: list[Path] = []  # files this run wrote before its results
        self.created: list[Path] = []  # folders this run created, outermost first
        self.run_info: dict[str, Any] = {}
        self.existing: set[Path] | None = None  # folders that existed before the run, where known

    def before_run(self, trainer: Trainer) -> None:
        """Note which folders exist before the trainer starts: Lightning lets a CSV or TensorBoard logger create
        its folder before any callback runs. (Other loggers' run folders are named by a new run id.)"""
        if isinstance(trainer.logger, (CSVLogger, TensorBoardLogger)):
            directory = Path(str(trainer.log_dir)).resolve()
            self.existing = {folder for folder in [directory, *directory.parents] if folder.exists()}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        self.run_info = {key: getattr(pl_module, key, None) for key in ("label", "variant", "group")}
        # The folder of the run's results (engine.results_dir where set), where --resume looks for its config.
        results_dir = getattr(pl_module, "results_dir", None)
        self.run_dir = Path(results_dir).resolve() if results_dir else run_directory(trainer).resolve()
        self.already_saved = True
        if not trainer.is_global_zero:
            return
        folders = [*reversed(self.run_dir.parents), self.run_dir]
        existing = self.existing if self.existing is not None else {folder for folder in folders if folder.exists()}
        self.created = [folder for folder in folders if folder not in existing]
        make_folder(self.run_dir)
        path = free_config_path(self.run_dir)
        self.write_config(path)
        self.written.append(path)
        if path.name != CONFIG_FILE:
            rank_zero_info(
                f"{self.run_dir / CONFIG_FILE} exists (an earlier part of this run); this part's "
                f"config is saved as {path.name}"
            )
        config = self.full_config(str(getattr(stage, "value", stage)))  # "test" or "predict"
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                # hparams.yaml now, so that a failed run's folder is recognisably its own
                self.written.append(guard_hparams(logger, self.run_dir))
            logger.log_hyperparams(config)

    def write_config(self, path: Path) -> None:
        assert self.run_dir is not None  # set by setup
        write_file(path, yaml.safe_dump(self.record, sort_keys=False), self.run_dir)

    def configuration(self) -> dict[str, Any]:
        """The recorded configuration as plain data (every value, nulls included)."""
        return dict(self.record)

    def full_config(self, command: str) -> dict[str, Any]:
        """The whole configuration, plus the run's label and command: what the loggers get."""
        return {**self.configuration(), "run": {**self.run_info, "command": command}}

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results: ResultsTable | None = getattr(pl_module, "results", None)
        if not trainer.is_global_zero or results is None:
            return
        directory = results.directory or self.run_dir
        assert directory is not None  # setup has set the run's folder
        files = [*(Path(directory) / name for name in RESULT_FILES), *self.written]
        for logger in metric_loggers(trainer):
            if isinstance(logger, WandbLogger):
                log_wandb_results(
                    logger, results, [path for path in files if path.is_file()], getattr(pl_module, "variant", "")
                )
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(RESULTS_KEY, results.to_markdown(), global_step=trainer.global_step)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """End the W&B run: its summary and config files are written then, and the next run in this process
        (``anovl grid``, tests) gets a run of its own."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
                logger.experiment.finish()
                logger._experiment = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A run that failed before any result leaves nothing behind: its startup files and the folders it
        created go; a folder with anything else in it (results, pictures, the user's files) stays."""
        if not trainer.is_global_zero or self.run_dir is None or self.run_dir not in self.created:
            return
        contents = [path for path in self.run_dir.rglob("*") if path.is_file()]
        if any(
            path not in self.written and path.name not in STARTUP_FILES and not path.name.startswith(TENSORBOARD_EVENTS)
            for path in contents
        ):
            return
        shutil.rmtree(self.run_dir)
        outermost = self.created[0]
        _remove_if_empty(self.run_dir.parent, outermost.parent)


def log_wandb_results(logger: WandbLogger, results: ResultsTable, files: list[Path], variant: str) -> None:
    """The results as a ``wandb.Table`` (the run's label and variant, then one row per category and the mean)
    and ``files`` as an artifact."""
    import wandb  # a dependency, but only needed here

    records = [{"label": results.label, "variant": variant, **record} for record in results.records()]
    columns = list(records[0])
    logger.log_table(
        key=RESULTS_KEY, columns=columns, data=[[record[column] for column in columns] for record in records]
    )
    run = logger.experiment
    artifact = wandb.Artifact(
        f"results-{run.id}",
        type="results",
        description=results.title,
        metadata={"label": results.label, "complete": results.complete, "random_weights": results.random_weights},
    )
    for path in files:
        artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact)


class RunTracker(RunRecorder, SaveConfigCallback):
    """The CLI's config callback: a :class:`RunRecorder` of the whole parsed configuration. Nulls are kept
    (``pretrained: null`` among them), so that ``anovl test --config RUN/config.yaml`` repeats the run."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["overwrite"] = False  # a run's config is never overwritten (config.<n>.yaml beside it instead)
        SaveConfigCallback.__init__(self, *args, **kwargs)
        RunRecorder.__init__(self)

    def write_config(self, path: Path) -> None:
        assert self.run_dir is not None  # set by setup
        write_file(path, self.parser.dump(self.config, skip_unset=False), self.run_dir)

    def configuration(self) -> dict[str, Any]:
        config = yaml.safe_load(self.parser.dump(self.config, skip_unset=False))
        config.pop("config", None)  # the config files' paths; their content is what follows
        return config
