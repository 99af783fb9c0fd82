"""The ``anovl`` console script: LightningCLI with the subcommands ``test`` and ``predict``, plus ``compare``.

    anovl test --config configs/mvtec.yaml --data.init_args.root /data/mvtec
    anovl test --config runs/mvtec/version_0/config.yaml --resume runs/mvtec/version_0
    anovl predict --config configs/folder.yaml --data.init_args.path my_images/
    anovl test --config configs/demo.yaml --print_config
    anovl compare runs/mvtec/version_0 runs/mvtec/version_1

The model (``model.class_path``: any :class:`~anovl.models.base.AnomalyModel`, e.g. ``anovl.models.AnoVL`` or
``anovl.models.WinCLIP``) and the datamodule (MVTec, VisA, Folder, SyntheticMVTec) are chosen by ``class_path``;
:class:`~anovl.engine.AnomalyModule` runs the model, with its options under ``engine``. The data's image size
is linked to the model's, so it is set once. ``--plugins`` (or ``plugins:`` in a config) imports a user's own
modules first (:mod:`anovl.plugins`). Errors in the user's input (AnovlError) end with one line
``anovl: error: <message>`` on stderr and exit code 2, like argument errors.

``anovl test --resume RUN_DIR`` continues an interrupted run: the categories finished in RUN_DIR/results.json
are not run again, the others are, and everything (results, pictures, config, a CSV/TensorBoard logger's
files) goes into RUN_DIR. It refuses a configuration that differs from the run's in what the metrics depend on.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from anovl.callbacks import AnomalyMapWriter, PanelWriter
from anovl.compare import main as compare_main
from anovl.data import AnomalyDataModule
from anovl.deploy import main as deploy_main
from anovl.engine import AnomalyModule
from anovl.errors import AnovlError
from anovl.models.base import AnomalyModel
from anovl.plugins import load_plugins
from anovl.results import ResultsTable

RUNS_DIR = "runs"
TRAINER_DEFAULTS = {
    "inference_mode": False,  # test-time adaptation needs autograd
    "accelerator": "auto",
    "devices": 1,
    "enable_checkpointing": False,
    "default_root_dir": RUNS_DIR,
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": RUNS_DIR, "name": "anovl"},
    },
}
STAGE_ARGUMENTS = {"model", "dataloaders", "datamodule"}  # given by the CLI itself, not by the user
RUN_DIR_LOGGERS = ("CSVLogger", "TensorBoardLogger")  # loggers whose folder is <save_dir>/<name>/<version>
DEFAULT_MODEL = "anovl.models.AnoVL"


class AnovlCLI(LightningCLI):
    """LightningCLI without ``fit``/``validate`` (the methods are zero-shot) and with anovl's defaults."""

    def __init__(self, args: Any = None, run: bool = True):
        super().__init__(
            AnomalyModel,
            AnomalyDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "anovl", "description": "Zero-shot anomaly localisation with vision-language models."},
            args=args,
            run=run,
        )

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # As LightningCLI's, but the model is a plain AnomalyModel (not a LightningModule): AnomalyModule wraps it.
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{key}": value for key, value in self.trainer_defaults.items()})
        parser.add_subclass_arguments(AnomalyModel, "model", fail_untyped=False, required=True)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=True)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "test":
            parser.add_argument("--resume", type=Optional[str], default=None,
                                help="continue the interrupted run in this folder (the one holding its results.json): "
                                     "finished categories are kept, the others run; the settings must be the run's")
        return parser

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"test": set(STAGE_ARGUMENTS), "predict": set(STAGE_ARGUMENTS)}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}})
        parser.add_argument("--plugins", type=list[str], default=[],
                            help="modules or .py files to import first (your own models, adapters, datasets)")
        parser.add_class_arguments(AnomalyModule, "engine", instantiate=False, skip={"model"}, fail_untyped=False)
        # The data is resized to what the model expects: the size is set once, on the model.
        parser.link_arguments("model", "data.init_args.image_size", compute_fn=model_input_size,
                              apply_on="instantiate")
        parser.add_lightning_class_args(PanelWriter, "pictures")  # acts in `test`
        parser.add_lightning_class_args(AnomalyMapWriter, "predictions")  # acts in `predict`

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.resume_dir = Path(config.resume).expanduser().resolve() if config.get("resume") else None
        self.finished_run: ResultsTable | None = None  # set when --resume finds nothing left to run
        if self.resume_dir is not None:
            write_into_run(config, self.resume_dir)
        self.data_size_given = data_size_given(config.data)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        model_size = model_input_size(self.model)
        if self.data_size_given not in (None, model_size):
            raise AnovlError(f"data.init_args.image_size is {self.data_size_given} but the model expects {model_size} "
                             "px; the data is resized to the model's size, so set model.init_args.image_size only")
        self.model = AnomalyModule(self.model, **config.engine.as_dict())
        name_wandb_run(self.trainer, self.model, config)
        # Listing the data here turns a wrong root into a clear error before the trainer starts (and, under
        # DDP, launches its processes); synthetic data is generated here, once.
        categories = getattr(self.datamodule, "categories", None)
        if categories is not None:
            rank_zero_info(f"{len(categories)} categories: {', '.join(categories)}")
        if self.resume_dir is not None:
            earlier = continue_run(self.model, self.trainer, self.datamodule, self.resume_dir)
            if not self.datamodule.categories:
                self.finished_run = earlier

    def test(self, **kwargs: Any) -> None:
        if self.finished_run is not None:
            rank_zero_info(f"All categories of {self.resume_dir} are finished; nothing to resume.")
            self.finished_run.print()
            return
        with warnings.catch_warnings():
            if self.resume_dir is not None:
                # A resumed run reuses its logger folder on purpose (results, config and pictures stay in one place).
                warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            self.trainer.test(**kwargs)

    def predict(self, **kwargs: Any) -> None:
        # The writer saves every map; keeping them all in memory as well would only cost RAM.
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)


def model_input_size(model: AnomalyModel) -> int:
    return model.preprocessing().image_size


def data_size_given(data: Any) -> int | None:
    """The data's image size if the configuration sets it to other than its default (the link overrides it)."""
    given = data.init_args.get("image_size") if data.get("init_args") else None
    try:
        module, _, name = str(data.class_path).rpartition(".")
        default = inspect.signature(getattr(importlib.import_module(module), name)).parameters["image_size"].default
    except (ImportError, KeyError, ValueError, AttributeError):
        return given
    return None if given == default else given


def write_into_run(config: Any, run_dir: Path) -> None:
    """Point a resumed run's results, pictures and (CSV/TensorBoard) logger folder at the run it continues."""
    config.engine.results_dir = str(run_dir)
    config.pictures.output_dir = config.pictures.output_dir or str(run_dir / "pictures")
    logger = config.trainer.get("logger")
    if logger and str(getattr(logger, "class_path", "")).endswith(RUN_DIR_LOGGERS):
        logger.init_args.save_dir = str(run_dir.parent.parent)
        logger.init_args.name = run_dir.parent.name
        logger.init_args.version = run_dir.name


def continue_run(module: AnomalyModule, trainer: Any, datamodule: AnomalyDataModule, run_dir: Path) -> ResultsTable:
    """Check that ``run_dir`` was run with this configuration and set the module and data up to finish it:
    the categories already in its results are left out. Returns the earlier table."""
    if module.model.order_dependent:
        raise AnovlError(f"a run of {module.label} cannot be resumed: its results depend on the images that came "
                         "before (e.g. tta.mode 'reference' carries optimiser state and random draws from image to "
                         "image); run it again from the start without --resume")
    earlier = ResultsTable.read(run_dir)
    if earlier.config is None:
        raise AnovlError(f"{run_dir}/results.json has no record of the run's configuration (an older anovl wrote "
                         "it), so it cannot be resumed safely; start a new run without --resume")
    earlier.check_categories(datamodule.categories)
    module.trainer = trainer  # run_config reads the trainer's precision
    current = module.run_config(datamodule)
    differences = config_differences(earlier.config, current)
    if differences:
        raise AnovlError(f"cannot resume {run_dir}: its configuration differs in {'; '.join(differences)}; resume "
                         f"with the run's own settings (anovl test --config {run_dir}/config.yaml --resume "
                         f"{run_dir}) or start a new run without --resume")
    module.resume(earlier)
    datamodule.exclude_categories(earlier.rows)
    rank_zero_info(f"Resuming {run_dir}: {len(earlier.rows)} categories finished, "
                   f"{len(datamodule.categories)} to run: {', '.join(datamodule.categories) or 'none'}")
    return earlier


def config_differences(earlier: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``section.key: <earlier> in the run, <current> now`` for every setting that differs."""
    differences = []
    for section in sorted(set(earlier) | set(current)):
        before, now = earlier.get(section) or {}, current.get(section) or {}
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                differences.append(f"{section}.{key}: {json.dumps(before.get(key))} in the run, "
                                   f"{json.dumps(now.get(key))} now")
    return differences


def name_wandb_run(trainer: Any, module: AnomalyModule, config: Any) -> None:
    """Name, group and tag W&B runs by label, so runs of one variant group together and different settings
    never share a name; the user's own name, group and tags win."""
    data = str(config.data.class_path).rsplit(".", 1)[-1].removesuffix("DataModule").lower()
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        init = logger._wandb_init  # read when the W&B run starts, which is later (on first use)
        init["name"] = init.get("name") or f"{data}-{module.label}"
        init["group"] = init.get("group") or module.label
        backbone = module.model.settings().get("backbone")
        init["tags"] = sorted({*(init.get("tags") or []), module.model.method or module.label, data,
                               *([str(backbone)] if backbone else [])})


def exported_model_arguments(command_line: list[str]) -> list[str]:
    """``--exported FILE`` is short for running an exported model (anovl.deploy.ExportedModel) as the model, with
    the same data, preprocessing and outputs as any other ``predict`` (or ``test``)."""
    arguments = list(command_line)
    for index, argument in enumerate(arguments):
        option, equals, value = argument.partition("=")
        if option == "--exported":
            if not equals:
                if index + 1 >= len(arguments):
                    raise AnovlError("--exported needs the path of a file written by anovl export")
                value = arguments.pop(index + 1)
            del arguments[index]
            return [*arguments, "--model", "anovl.deploy.ExportedModel", "--model.init_args.path", value]
    return arguments


def plugin_specs(command_line: list[str]) -> list[str]:
    """The plugins named on a command line: ``--plugins`` values and ``plugins:`` in its ``--config`` files.

    They must be imported before the configuration is parsed, since it may name their classes."""
    specs: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str):
            specs.append(value)
        elif isinstance(value, list):
            specs.extend(str(item) for item in value)

    for index, argument in enumerate(command_line):
        option, _, inline = argument.partition("=")
        value = inline if inline else (command_line[index + 1] if index + 1 < len(command_line) else None)
        if value is None:
            continue
        if option in ("--plugins", "--plugins+"):
            add(yaml.safe_load(value))
        elif option == "--config" and Path(value).is_file():
            try:
                document = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                continue  # the CLI's own parser reports a broken config with its own message
            if isinstance(document, dict):
                add(document.get("plugins"))
    return list(dict.fromkeys(specs))


def _one_line(error: BaseException) -> str:
    """The message of an error as one line (a DataLoader worker re-raises with the worker's traceback)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and "Traceback" in str(error):
        # The last line is "<module>.<Class>: <message>" of the original exception.
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


def _user_error(error: BaseException) -> AnovlError | None:
    """The user error behind an exception (jsonargparse wraps errors raised while instantiating classes):
    an AnovlError; Lightning's refusal of a setting (an accelerator the machine lacks, say); or a file-system
    error on a path the user gave (an output folder that is a file, a read-only folder, a full disk)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, AnovlError):
            return error
        if isinstance(error, MisconfigurationException):
            return AnovlError(f"{_one_line(error)} (a trainer setting; see anovl test --help)")
        if isinstance(error, OSError) and error.filename is not None and error.strerror:
            return AnovlError(f"cannot use {error.filename}: {error.strerror}; give another path or free the disk")
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _run_user_command(command: Callable[[], Any]) -> int:
    """Run ``command``; a user error (AnovlError, possibly wrapped) becomes one stderr line and exit code 2."""
    try:
        command()
    except Exception as error:
        user_error = _user_error(error)
        if user_error is None:
            raise
        print(f"anovl: error: {_one_line(user_error)}", file=sys.stderr)
        return 2
    return 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopSignals:
    """SIGTERM and SIGINT stop a run at once, as an interrupt: Lightning tears the run down, the results files
    keep every category finished before (they are written as each one ends), and the exit status is
    128 + the signal, so that a scheduler never takes a pre-empted run for a finished one."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self.received is not None and kind is not None and issubclass(kind, (KeyboardInterrupt, SystemExit)):
            print(f"anovl: error: stopped by {signal.Signals(self.received).name}; the results of finished "
                  "categories are kept; continue with anovl test --config RUN/config.yaml --resume RUN",
                  file=sys.stderr)
            raise SystemExit(128 + self.received) from None
        return False


def main(args: list[str] | None = None) -> None:
    command_line = sys.argv[1:] if args is None else args
    if command_line[:1] == ["compare"]:
        raise SystemExit(_run_user_command(lambda: compare_main(command_line[1:])))
    if command_line[:1] in (["export"], ["app"]):
        raise SystemExit(_run_user_command(lambda: deploy_main(command_line[0], command_line[1:])))
    # The seed is fixed by default (seed_everything: 0) and recorded in the saved config.yaml.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)

    def run() -> None:
        arguments = exported_model_arguments(command_line)
        load_plugins(plugin_specs(arguments))
        if args is None:  # from the console: LightningCLI reads sys.argv (given both, it warns)
            sys.argv[1:] = arguments
            AnovlCLI()
        else:
            AnovlCLI(args=arguments)

    with _StopSignals():
        status = _run_user_command(run)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
