"""``anovl test`` and ``anovl predict``: LightningCLI without ``fit``, run by the console script :mod:`anovl.cli`.

    anovl test --config configs/mvtec.yaml --data.init_args.root /data/mvtec
    anovl test --config runs/mvtec/version_0/config.yaml --resume runs/mvtec/version_0
    anovl predict --config configs/folder.yaml --data.init_args.path my_images/
    anovl test --config configs/demo.yaml --print_config
    anovl compare runs/mvtec/version_0 runs/mvtec/version_1

The model (``model.class_path``: any :class:`~anovl.models.base.AnomalyModel`, e.g. ``anovl.models.AnoVL`` or
``anovl.models.WinCLIP``) and the datamodule (MVTec, VisA, Folder, SyntheticMVTec) are chosen by ``class_path``;
:class:`~anovl.engine.AnomalyModule` runs the model, with its options under ``engine``. The data's image size
is linked to the model's, so it is set once. ``--plugins`` (or ``plugins:`` in a config) imports a user's own
modules first (:mod:`anovl.plugins`). Every run logs its whole config, results table and results files
to its loggers and keeps its config.yaml in its own folder (:mod:`anovl.tracking`).

``anovl test --help`` lists anovl's options first and the trainer's last; the trainer's training-only flags
(epochs, gradient clipping, validation, checkpointing) are accepted, so that older configs still load, but not
listed, since ``test`` and ``predict`` never train.

``anovl test --resume RUN_DIR`` continues an interrupted run: the categories finished in RUN_DIR/results.json
are not run again, the others are, and everything (results, pictures, config, a CSV/TensorBoard logger's
files) goes into RUN_DIR. It refuses a configuration that differs from the run's in what the metrics depend on.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

import yaml
from jsonargparse import get_loader, set_loader
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from anovl.callbacks import AnomalyMapWriter, PanelWriter
from anovl.commands import COMMANDS, DESCRIPTION
from anovl.configs import chooses_model_first, method_path, model_settings_by_class, with_class_paths

# The datamodules are imported so that their short class names resolve (jsonargparse looks among loaded subclasses).
from anovl.data import (  # noqa: F401
    AnomalyDataModule,
    FolderDataModule,
    MVTecDataModule,
    SyntheticMVTecDataModule,
    VisADataModule,
)
from anovl.engine import AnomalyModule, Engine
from anovl.engine.engine import RUNS_DIR, model_input_size, run_folders
from anovl.engine.engine import TRAINER_DEFAULTS as ENGINE_TRAINER_DEFAULTS
from anovl.errors import AnovlError
from anovl.io import terminal
from anovl.models.base import AnomalyModel
from anovl.models.checkpoints import (
    METADATA_KEY,
    check_compatible,
    read_checkpoint,
    trained_prefix,
)
from anovl.plugins import load_plugins, loaded_note
from anovl.tracking import RunTracker

TRAINER_DEFAULTS = {
    **ENGINE_TRAINER_DEFAULTS,
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": RUNS_DIR, "name": "anovl"},
    },
}
# `fit` trains: checkpoints at every epoch's end; the authors' 3 epochs of APRIL-GAN on MVTec unless set.
FIT_ONLY_ENGINE_OPTIONS = ("engine.mosaic_rate", "engine.validation")
FIT_TRAINER_DEFAULTS = {"enable_checkpointing": True, "max_epochs": 3}
STAGE_ARGUMENTS = {"model", "dataloaders", "datamodule"}  # given by the CLI itself, not by the user
RUN_DIR_LOGGERS = ("CSVLogger", "TensorBoardLogger")  # loggers whose folder is <save_dir>/<name>/<version>
DEFAULT_MODEL = "anovl.models.AnoVL"
# Trainer flags that only `fit`/`validate` use: accepted (older configs list them) but left out of the help.
TRAINING_ONLY_TRAINER_FLAGS = frozenset(
    {
        "max_epochs",
        "min_epochs",
        "max_steps",
        "min_steps",
        "max_time",
        "limit_train_batches",
        "limit_val_batches",
        "overfit_batches",
        "val_check_interval",
        "check_val_every_n_epoch",
        "num_sanity_val_steps",
        "log_every_n_steps",
        "enable_checkpointing",
        "enable_model_summary",
        "accumulate_grad_batches",
        "gradient_clip_val",
        "gradient_clip_algorithm",
        "sync_batchnorm",
        "reload_dataloaders_every_n_epochs",
        "model_registry",
    }
)


class AnovlParser(LightningArgumentParser):
    """LightningCLI's parser; a class that cannot be imported names the plugins that were loaded."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if "class_path" in message:
            message += loaded_note()
        super().error(message, ex)


class AnovlCLI(LightningCLI):
    """LightningCLI without ``fit``/``validate`` (the methods are zero-shot) and with anovl's defaults.

    ``plugins``: what was imported from the command line and its configs (every ``--config``, file or inline);
    the saved config records them all, where a later config's ``plugins:`` would replace an earlier one's."""

    def __init__(self, args: Any = None, run: bool = True, plugins: Sequence[str] = ()):
        self.plugin_specs = list(plugins)
        super().__init__(
            AnomalyModel,  # type: ignore[arg-type]  # a plain nn.Module; add_core_arguments_to_parser handles it
            AnomalyDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            save_config_callback=RunTracker,
            parser_class=AnovlParser,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "anovl", "description": DESCRIPTION, "parser_mode": PARSER_MODE},
            args=args,
            run=run,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is None:  # LightningCLI reads sys.argv (given both, it warns)
            sys.argv[1:] = method_arguments(with_default_model(sys.argv[1:]))
            self.model_settings_given = model_settings_by_class(sys.argv[1:])
        elif isinstance(args, list):
            args = method_arguments(with_default_model(args))
            self.model_settings_given = model_settings_by_class(args)
        super().parse_arguments(parser, args)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # As LightningCLI's, but the model is a plain AnomalyModel (not a LightningModule): AnomalyModule wraps it.
        # The trainer comes last (add_arguments_to_parser), so that the help leads with anovl's own options.
        parser.add_subclass_arguments(AnomalyModel, "model", fail_untyped=False, required=True)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=True)
        _retitle(
            parser,
            "model",
            "The method (--model NAME or CLASS_PATH): anovl (default), winclip, a plugin's; "
            "`--model.help CLASS` lists its options",
        )
        _retitle(
            parser,
            "data",
            "The data (data.class_path): anovl.data.MVTecDataModule, VisADataModule, "
            "FolderDataModule, SyntheticMVTecDataModule; `--data.help CLASS` lists its options",
        )

    def add_trainer_arguments(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{key}": value for key, value in self.trainer_defaults.items()})
        if self._preparing == "fit":
            parser.set_defaults({f"trainer.{key}": value for key, value in FIT_TRAINER_DEFAULTS.items()})
            _retitle(parser, "trainer", "Lightning's Trainer (max_epochs, devices, strategy, precision, logger, ...)")
            return
        for action in parser._actions:
            if action.dest.removeprefix("trainer.") in TRAINING_ONLY_TRAINER_FLAGS:
                action.help = argparse.SUPPRESS
        _retitle(
            parser,
            "trainer",
            "Lightning's Trainer (devices, precision, logger, ...); its training-only flags "
            "are accepted but not listed",
        )

    _preparing = ""  # the subcommand whose parser is being built

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        self._preparing = subcommand
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # The options are listed below, grouped; a usage line of every option would be ~100 lines.
        parser.usage = f"anovl {subcommand} [-c CONFIG ...] [--exported FILE] [--print_config] [options]"
        # --exported is read by the dispatcher (anovl.cli.exported_model_arguments), so it is described here.
        parser.description = (
            f"{COMMANDS[subcommand]}. --exported FILE runs a model written by `anovl export` "
            "(short for --model anovl.deploy.ExportedModel --model.init_args.path FILE)."
        )
        if subcommand == "test":
            parser.add_argument(
                "--resume",
                type=Optional[str],
                default=None,
                help="continue the interrupted run in this folder (the one holding its results.json): "
                "finished categories are kept, the others run; the settings must be the run's",
            )
            parser.add_argument(
                "--run_dir",
                type=Optional[str],
                default=None,
                help="write this run into this folder (results, config.yaml, pictures, a CSV/"
                "TensorBoard logger's files) instead of a new <save_dir>/<name>/version_N",
            )
        return parser

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would turn a checkpoint's hyperparameters into config; anovl's record the model's settings,
        # not its arguments. The run's config says what to build; fit and test check that the checkpoint fits it.
        return

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "test": set(STAGE_ARGUMENTS),
            "predict": set(STAGE_ARGUMENTS),
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--plugins",
            type=list[str],
            default=[],
            help="modules or .py files to import first (your own models, adapters, datasets)",
        )
        parser.add_class_arguments(AnomalyModule, "engine", instantiate=False, skip={"model"}, fail_untyped=False)
        if self._preparing != "fit":  # fit's engine options are accepted everywhere but listed by `fit --help` only
            for action in parser._actions:
                if action.dest.startswith(FIT_ONLY_ENGINE_OPTIONS):
                    action.help = argparse.SUPPRESS
        # The data is resized to what the model expects: the size is set once, on the model.
        parser.link_arguments("model", "data.init_args.image_size", compute_fn=model_input_size, apply_on="instantiate")
        parser.add_lightning_class_args(PanelWriter, "pictures")  # acts in `test`
        parser.add_lightning_class_args(AnomalyMapWriter, "predictions")  # acts in `predict`
        self.add_trainer_arguments(parser)

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        config.plugins = list(dict.fromkeys([*self.plugin_specs, *(config.get("plugins") or [])]))
        config.engine.group = config.engine.get("group") or default_group(config)  # saved: a rerun keeps it
        self.resume_dir, self.given_run_dir = run_folders(config.get("resume"), config.get("run_dir"))
        if self.given_run_dir is not None:
            write_into_run(config, self.given_run_dir)
        self.data_size_given = data_size_given(config.data)
        note = settings_of_another_class(getattr(self, "model_settings_given", {}), config.model)
        if note:
            logging.getLogger("anovl").warning(note)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        model_size = model_input_size(self.model)
        if self.data_size_given not in (None, model_size):
            raise AnovlError(
                f"data.init_args.image_size is {self.data_size_given} but the model expects {model_size} "
                "px; the data is resized to the model's size, so set model.init_args.image_size only"
            )
        engine = config.engine.as_dict()
        if engine.get("validation"):  # fit's validation data: a datamodule of its own (engine is not instantiated)
            engine["validation"] = instantiate_datamodule(engine["validation"])
        # The Engine runs it; preparing now turns a wrong root or an unresumable run into a clear error before the
        # trainer starts (and, under DDP, launches its processes); synthetic data is generated here, once.
        self.engine = Engine(
            self.trainer,
            resume=self.resume_dir,
            run_dir=self.given_run_dir if self.resume_dir is None else None,
            **engine,
        )
        self.model = self.engine.prepare(self.model, self.datamodule, str(self.subcommand), config.get("ckpt_path"))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        # The tracker first: it records which folders the run creates before the other callbacks write there.
        trainer.callbacks.sort(key=lambda callback: not isinstance(callback, RunTracker))  # type: ignore[attr-defined]
        return trainer

    def fit(self, **kwargs: Any) -> None:
        model = self.model.model
        trained_prefix(model)  # a training-free method: one line before anything runs
        if kwargs.get("ckpt_path") not in (None, "last", "hpc", "registry"):
            check_checkpoint_file(kwargs["ckpt_path"], model)
        with self.engine.running(reuses_folder=bool(kwargs.get("ckpt_path"))):
            self.trainer.fit(**kwargs)
        callback = self.trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", None)  # a ModelCheckpoint's
        if last:
            rank_zero_info(f"Trained {model.label}: {last}; test it with anovl test --config ... --ckpt_path {last}")

    def test(self, **kwargs: Any) -> None:
        self.engine.test(**kwargs)  # prepare (after_instantiate_classes) has loaded a ckpt_path

    def predict(self, **kwargs: Any) -> None:
        self.engine.predict(**kwargs)


def with_default_model(arguments: list[str]) -> list[str]:
    """A command line with ``--model`` AnoVL first (after the subcommand) unless the model's class is chosen before
    any of its settings (jsonargparse takes no setting before a class). Not a parser default: jsonargparse would
    carry that class's defaults (backbone, layers, ...) over to a class chosen later where the names match, in
    place of the chosen class's own; an argument carries over only the settings given."""
    if chooses_model_first(arguments):
        return arguments
    head = 1 if arguments[:1] in (["fit"], ["test"], ["predict"]) else 0
    return [*arguments[:head], "--model", DEFAULT_MODEL, *arguments[head:]]


def settings_of_another_class(given: dict[str, str | None], model: Any) -> str | None:
    """A note naming the model settings that were given while another class was chosen (e.g. AnoVL's backbone in
    a dataset config, then ``--model aprilgan``): jsonargparse keeps those the final class takes, in place of
    its own defaults, and drops the others. None where none is kept."""
    final = _class_of(model.class_path)
    earlier = {key: chosen for key, chosen in given.items() if chosen is not None and _class_of(chosen) != final}
    if not earlier:
        return None
    settings = model.get("init_args") or {}
    final_name = str(model.class_path).rpartition(".")[2]
    before = ", ".join(
        sorted({str(method_path(chosen, strict=False)).rpartition(".")[2] for chosen in earlier.values()})
    )
    kept = ", ".join(f"{key}={settings[key]}" for key in sorted(earlier) if key in settings)
    dropped = ", ".join(sorted(key for key in earlier if key not in settings))
    if not kept:  # settings of the earlier method alone, as when a method config follows a dataset config
        return None
    note = f"settings given for {before} carry over to {final_name}: {kept}"
    if dropped:
        note += f"; dropped ({final_name} takes none of them): {dropped}"
    return terminal(note + ". Give settings after choosing the method to change them.")


def _class_of(path: Any) -> Any:
    """The class a class path or method name names (the text itself where it names none)."""
    path = method_path(path, strict=False)
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return path


def method_arguments(arguments: list[str]) -> list[str]:
    """A command line with ``--model NAME`` (or ``--model.class_path NAME``, ``--model.help NAME``) given as the
    method's class path."""
    arguments = list(arguments)
    for index, argument in enumerate(arguments):
        option, equals, value = argument.partition("=")
        if option not in ("--model", "--model.class_path", "--model.help"):
            continue
        if equals:
            arguments[index] = f"{option}={method_path(value)}"
        elif index + 1 < len(arguments) and not arguments[index + 1].startswith("-"):  # --model.help needs none
            arguments[index + 1] = method_path(arguments[index + 1])
    return arguments


# Configs are read as YAML with method names resolved (--config files, and values given as YAML/JSON).
PARSER_MODE = "anovl-yaml"
_read_yaml = get_loader("yaml")
set_loader(PARSER_MODE, lambda text: with_class_paths(_read_yaml(text)), exceptions=(yaml.YAMLError,))


def instantiate_datamodule(spec: dict[str, Any]) -> AnomalyDataModule:
    """A datamodule from ``{class_path, init_args}`` (fit's ``engine.validation``)."""
    module, _, name = str(spec.get("class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise AnovlError(
            f"engine.validation: unknown datamodule {spec.get('class_path')!r}; give e.g. anovl.data.MVTecDataModule"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, AnomalyDataModule)):
        raise AnovlError(f"engine.validation: {spec.get('class_path')} is not an anovl datamodule")
    return cls(**(spec.get("init_args") or {}))


def check_checkpoint_file(path: str, model: AnomalyModel) -> None:
    """A --ckpt_path that cannot be read, or is of another method or backbone: one line before the trainer starts."""
    trained_prefix(model)
    check_compatible(read_checkpoint(path).get(METADATA_KEY), model, str(path))


def _retitle(parser: LightningArgumentParser, key: str, title: str) -> None:
    """Give a group of the help a title that says what to put there (the default is a class docstring)."""
    group = getattr(parser, "groups", {}).get(key)
    if group is not None:
        group.title = title


def data_size_given(data: Any) -> int | None:
    """The data's image size if the configuration sets it to other than its default (the link overrides it)."""
    given = data.init_args.get("image_size") if data.get("init_args") else None
    try:
        module, _, name = str(data.class_path).rpartition(".")
        # A datamodule may take the shared arguments as **kwargs: the first class of its MRO naming it has it.
        default = next(
            parameters["image_size"].default
            for cls in getattr(importlib.import_module(module), name).__mro__
            if "image_size" in (parameters := inspect.signature(cls.__init__).parameters)
        )
    except (ImportError, StopIteration, ValueError, AttributeError):
        return given
    return None if given == default else given


def write_into_run(config: Any, run_dir: Path) -> None:
    """Point a run's results, pictures and (CSV/TensorBoard) logger folder at ``run_dir`` (the folder of the run
    it resumes, or the one ``--run_dir`` gives)."""
    config.engine.results_dir = str(run_dir)
    config.pictures.output_dir = config.pictures.output_dir or str(run_dir / "pictures")
    logger = config.trainer.get("logger")
    if logger and str(getattr(logger, "class_path", "")).endswith(RUN_DIR_LOGGERS):
        logger.init_args.save_dir = str(run_dir.parent.parent)
        logger.init_args.name = run_dir.parent.name
        logger.init_args.version = run_dir.name


def default_group(config: Any) -> str:
    """The experiment a run belongs to when ``engine.group`` is not given: the stem of its first config file
    (``mvtec`` for ``--config configs/mvtec.yaml --config configs/tta/text.yaml``), else its dataset."""
    files = [Path(str(path)) for path in (config.get("config") or []) if path is not None]
    return files[0].stem if files else dataset_key(config)


def dataset_key(config: Any) -> str:
    """The dataset in run names and tags: the datamodule's class without ``DataModule``, lower case."""
    return str(config.data.class_path).rsplit(".", 1)[-1].removesuffix("DataModule").lower()


# Third-party messages that say nothing to an anovl user (anovl's own warnings stay).
NOISE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's _pytree on recent torch
)
NOISE_LOG_LINES = {
    "root": "No pretrained weights loaded",  # open_clip; anovl warns about random weights itself
    "lightning.pytorch.utilities.rank_zero": "litlogger",  # Lightning's advertisement of its cloud logger
}


class _DropMessages(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def filter_third_party_noise() -> None:
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for logger_name, fragment in NOISE_LOG_LINES.items():
        logger = logging.getLogger(None if logger_name == "root" else logger_name)
        if not any(isinstance(item, _DropMessages) and item.fragment == fragment for item in logger.filters):
            logger.addFilter(_DropMessages(fragment))


def missing_package_error(error: BaseException | None) -> AnovlError | None:
    """A logger (or other class) of the config that needs a package which is not installed, as one line;
    jsonargparse wraps the ImportError of a class it instantiates, so the chain of causes is searched."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ImportError):
            for name in ("tensorboard", "mlflow", "comet_ml", "neptune", "litlogger"):
                if name in str(error) or error.name == name:
                    return AnovlError(
                        f"the configured logger needs the package {name!r}, which is not installed: "
                        f"pip install {name.replace('_', '-')} (or choose another trainer.logger)"
                    )
        error = error.__cause__ or error.__context__
    return None


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes (not as it was when the handler was made: a caller
    that redirects stderr, pytest's capture say, may close the old one)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def show_anovl_info() -> None:
    """anovl's own informational log lines (e.g. that text embeddings came from the cache) on stderr, as
    Lightning's are, on the first process only."""
    logger = logging.getLogger("anovl")
    if logger.handlers or any(os.environ.get(name, "0") != "0" for name in ("RANK", "LOCAL_RANK")):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler (set up by a library) would print it again


def run_lightning_cli(args: list[str] | None, plugins: list[str]) -> None:
    """Run ``anovl test`` / ``anovl predict`` (``args``: the command line; None reads sys.argv) with the user's
    plugins imported first."""
    filter_third_party_noise()
    # The seed is fixed by default (seed_everything: 0) and recorded in the saved config.yaml.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    show_anovl_info()
    load_plugins(plugins)
    try:
        AnovlCLI(args=args, plugins=plugins)
    except Exception as error:
        user_error = missing_package_error(error) or unknown_name_error(error)
        if user_error is None:
            raise
        raise user_error from error


def unknown_name_error(error: BaseException | None) -> AnovlError | None:
    """An "unknown ..." AnovlError (a backbone, say, that a plugin should have registered), however wrapped,
    with the plugins that were loaded added; None where there is none or no plugin was named."""
    seen = set()
    while error is not None and id(error) not in seen and loaded_note():
        seen.add(id(error))
        if isinstance(error, AnovlError):
            return AnovlError(f"{error}{loaded_note()}") if str(error).startswith("unknown ") else None
        error = error.__cause__ or error.__context__
    return None


def resolved_config(args: list[str]) -> dict[str, Any]:
    """The configuration that ``anovl ARGS`` (``test ...``) resolves to, as plain data, without building any
    model or data (its ``--print_config``, in this process); the plugins it names must be imported first."""
    output = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(output):
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter")  # sys.argv is the caller's
        try:
            AnovlCLI(args=[*args, "--print_config"])
        except SystemExit as exit_info:
            if exit_info.code:  # the parser has printed why
                raise AnovlError(
                    f"the configuration of `anovl {' '.join(args[:1])}` does not parse (the parser's message is above)"
                ) from None
    return yaml.safe_load(output.getvalue())
