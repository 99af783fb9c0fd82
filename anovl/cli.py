"""The ``anovl`` console script: LightningCLI with the subcommands ``test`` and ``predict``, plus ``compare``.

    anovl test --config configs/mvtec.yaml --data.init_args.root /data/mvtec
    anovl predict --config configs/folder.yaml --data.init_args.path my_images/
    anovl test --config configs/demo.yaml --print_config
    anovl compare runs/mvtec/version_0 runs/mvtec/version_1

The datamodule is chosen by ``class_path`` (MVTec, VisA, Folder, SyntheticMVTec), the model is
:class:`~anovl.models.anovl.lightning_model.AnoVLModule`. Errors in the user's input (AnovlError) end with
one line ``anovl: error: <message>`` on stderr and exit code 2, like argument errors.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from anovl.callbacks import AnomalyMapWriter
from anovl.compare import main as compare_main
from anovl.data import AnomalyDataModule
from anovl.errors import AnovlError
from anovl.models.anovl.lightning_model import AnoVLModule
from anovl.models.anovl.tta import TTAConfig

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

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        # Listing the data here turns a wrong root into a clear error before the trainer starts (and, under
        # DDP, launches its processes); synthetic data is generated here, once.
        categories = getattr(self.datamodule, "categories", None)
        if categories is not None:
            rank_zero_info(f"{len(categories)} categories: {', '.join(categories)}")

    def predict(self, **kwargs: Any) -> None:
        # The writer saves every map; keeping them all in memory as well would only cost RAM.
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)


def run_variant(model_args: Any) -> str:
    """``tfa`` or the TTA variant (``tta-text``, ...) that a parsed model config describes."""
    tta = getattr(model_args, "tta", None)
    if tta is None:
        return "tfa"
    return TTAConfig(**(tta.as_dict() if hasattr(tta, "as_dict") else dict(tta))).variant


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
