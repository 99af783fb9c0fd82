"""The ``anovl`` console script: LightningCLI with the subcommands ``test`` and ``predict``, plus ``compare``.

    anovl test --config configs/mvtec.yaml --data.init_args.root /data/mvtec
    anovl test --config runs/mvtec/version_0/config.yaml --resume runs/mvtec/version_0
    anovl predict --config configs/folder.yaml --data.init_args.path my_images/
    anovl test --config configs/demo.yaml --print_config
    anovl compare runs/mvtec/version_0 runs/mvtec/version_1

The datamodule is chosen by ``class_path`` (MVTec, VisA, Folder, SyntheticMVTec), the model is
:class:`~anovl.models.anovl.lightning_model.AnoVLModule`. Errors in the user's input (AnovlError) end with
one line ``anovl: error: <message>`` on stderr and exit code 2, like argument errors.

``anovl test --resume RUN_DIR`` continues an interrupted run: the categories finished in RUN_DIR/results.json
are not run again, the others are, and everything (results, pictures, config, a CSV/TensorBoard logger's
files) goes into RUN_DIR. It refuses a configuration that differs from the run's in what the metrics depend on.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from anovl.callbacks import AnomalyMapWriter
from anovl.compare import main as compare_main
from anovl.data import AnomalyDataModule
from anovl.errors import AnovlError
from anovl.models.anovl.lightning_model import AnoVLModule
from anovl.models.anovl.tta import TTAConfig, variant_name
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


class AnovlCLI(LightningCLI):
    """LightningCLI without ``fit``/``validate`` (AnoVL is training-free) and with anovl's defaults."""

    def __init__(self, args: Any = None, run: bool = True):
        super().__init__(
            AnoVLModule,
            AnomalyDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "anovl", "description": "Zero-shot anomaly localisation with AnoVL."},
            args=args,
            run=run,
        )

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
        parser.set_defaults({"model": {"class_path": f"{AnoVLModule.__module__}.{AnoVLModule.__name__}"}})
        # Always present; it only acts in `predict` (--predictions.output_dir, .overlays, .raw_maps).
        parser.add_lightning_class_args(AnomalyMapWriter, "predictions")

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        name_wandb_run(config)
        self.resume_dir = Path(config.resume).expanduser().resolve() if config.get("resume") else None
        self.finished_run: ResultsTable | None = None  # set when --resume finds nothing left to run
        if self.resume_dir is not None:
            write_into_run(config, self.resume_dir)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        # Listing the data here turns a wrong root into a clear error before the trainer starts (and, under
        # DDP, launches its processes); synthetic data is generated here, once.
        categories = getattr(self.datamodule, "categories", None)
        if categories is not None:
            rank_zero_info(f"{len(categories)} categories: {', '.join(categories)}")
        if self.resume_dir is not None:
            earlier = continue_run(self.model, self.datamodule, self.resume_dir)
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


def write_into_run(config: Any, run_dir: Path) -> None:
    """Point a resumed run's results, pictures and (CSV/TensorBoard) logger folder at the run it continues."""
    model = config.model.init_args
    model.results_dir = str(run_dir)
    model.picture_dir = model.picture_dir or str(run_dir / "pictures")
    logger = config.trainer.get("logger")
    if logger and str(getattr(logger, "class_path", "")).endswith(RUN_DIR_LOGGERS):
        logger.init_args.save_dir = str(run_dir.parent.parent)
        logger.init_args.name = run_dir.parent.name
        logger.init_args.version = run_dir.name


def continue_run(model: AnoVLModule, datamodule: AnomalyDataModule, run_dir: Path) -> ResultsTable:
    """Check that ``run_dir`` was run with this configuration and set the model and data up to finish it:
    the categories already in its results are left out. Returns the earlier table."""
    tta = model.model.tta_config
    if tta is not None and tta.mode == "reference":
        raise AnovlError("a run with tta.mode 'reference' cannot be resumed: its optimiser state and random draws "
                         "carry over from image to image, so the rest of the run depends on what came before; "
                         "run it again from the start without --resume")
    earlier = ResultsTable.read(run_dir)
    if earlier.config is None:
        raise AnovlError(f"{run_dir}/results.json has no record of the run's configuration (an older anovl wrote "
                         "it), so it cannot be resumed safely; start a new run without --resume")
    current = model.run_config(datamodule)
    differences = config_differences(earlier.config, current)
    if differences:
        raise AnovlError(f"cannot resume {run_dir}: its configuration differs in {'; '.join(differences)}; resume "
                         f"with the run's own settings (anovl test --config {run_dir}/config.yaml --resume "
                         f"{run_dir}) or start a new run without --resume")
    model.resume(earlier)
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


def run_variant(model_args: Any) -> str:
    """``tfa`` or the TTA variant (``tta-text``, ...) that a parsed model config describes."""
    tta = getattr(model_args, "tta", None)
    return variant_name(None if tta is None else TTAConfig(**(tta.as_dict() if hasattr(tta, "as_dict") else dict(tta))))


def name_wandb_run(config: Any) -> None:
    """Name and tag W&B runs by variant, so runs of one variant group together; the user's own name,
    group and tags win."""
    logger = config.trainer.get("logger")
    if not logger or not str(getattr(logger, "class_path", "")).endswith("WandbLogger"):
        return
    model = config.model.init_args
    variant = run_variant(model)
    data = str(config.data.class_path).rsplit(".", 1)[-1].removesuffix("DataModule").lower()
    init_args = logger.init_args
    if init_args.get("name") is None:
        init_args["name"] = f"{data}-{variant}"
    init_args["group"] = init_args.get("group") or variant
    init_args["tags"] = sorted({*(init_args.get("tags") or []), variant, data, str(model.backbone)})


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
    """The AnovlError behind an exception: jsonargparse wraps errors raised while instantiating classes."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, AnovlError):
            return error
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


def main(args: list[str] | None = None) -> None:
    command_line = sys.argv[1:] if args is None else args
    if command_line[:1] == ["compare"]:
        raise SystemExit(_run_user_command(lambda: compare_main(command_line[1:])))
    # The seed is fixed by default (seed_everything: 0) and recorded in the saved config.yaml.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    status = _run_user_command(lambda: AnovlCLI(args=args))
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
