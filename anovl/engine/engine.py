"""The Engine: everything ``anovl test`` and ``anovl predict`` do, for a Python user as for the CLI.

    from anovl.engine import Engine
    from anovl.models import create_method
    from anovl.data import MVTecDataModule

    model = create_method("anovl", backbone="ViT-B-16-plus-240")
    data = MVTecDataModule(root="/data/mvtec", image_size=model.image_size)
    table = Engine(pictures={"max_per_category": 3}).test(model, data)   # runs/anovl/version_0/...

An Engine wraps the method in the generic :class:`~anovl.engine.AnomalyModule` and runs it under a Lightning
Trainer with anovl's defaults (no inference mode, since test-time adaptation needs autograd; one device; a CSV
logger whose folder is the run's folder), with the run's callbacks: :class:`~anovl.tracking.RunRecorder`
(config.yaml, the config and results to every logger, clean-up of a run that failed before any result),
:class:`~anovl.callbacks.PanelWriter` (pictures of ``test``) and :class:`~anovl.callbacks.AnomalyMapWriter`
(outputs of ``predict``, thresholds). It gives a run its folder (``run_dir``), continues an interrupted run
(``resume``), names W&B runs, and checks the model, the data and the earlier run before any image is read.

The CLI (:mod:`anovl.lightning_cli`) only parses: it builds the model, the data and the trainer from the
configuration and hands them to an Engine. Training (``fit``) belongs here too, beside ``test`` and ``predict``.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from anovl.callbacks import AnomalyMapWriter, PanelWriter
from anovl.engine.module import AnomalyModule
from anovl.errors import AnovlError
from anovl.models.base import AnomalyModel, json_data
from anovl.models.registry import method_record, normalised_record
from anovl.results import ResultsTable
from anovl.tracking import RunRecorder

RUNS_DIR = "runs"
DEFAULT_LOGGER_NAME = "anovl"  # runs/anovl/version_<N>
# anovl's trainer defaults; the CLI adds its logger as a class path, the Engine builds it (DEFAULT_LOGGER_NAME).
TRAINER_DEFAULTS: dict[str, Any] = {
    "inference_mode": False,  # test-time adaptation needs autograd
    "accelerator": "auto",
    "devices": 1,
    "enable_checkpointing": False,
    "default_root_dir": RUNS_DIR,
}
VERSION = re.compile(r"version_\d+")
WANDB_TAG_LENGTH = 64  # W&B refuses longer tags


def model_input_size(model: AnomalyModel) -> int:
    return model.preprocessing().image_size


def dataset_name(datamodule: Any) -> str:
    """The dataset in run names and tags: the datamodule's class without ``DataModule``, lower case."""
    return type(datamodule).__name__.removesuffix("DataModule").lower()


class Engine:
    """Runs methods as ``anovl test`` / ``anovl predict`` do (see the module docstring).

    Args:
        trainer: a Lightning Trainer to run under (the CLI's, with its own callbacks), or keyword arguments of
            one on top of :data:`TRAINER_DEFAULTS` (``logger``: a Lightning logger, default a CSVLogger under
            ``runs/anovl``; ``callbacks``: added to the run's own).
        run_dir: write the run into this folder (results, config.yaml, pictures, the CSV logger's files).
        resume: continue the interrupted run in this folder: its finished categories are kept, the others run;
            the settings must be the run's.
        pictures: :class:`~anovl.callbacks.PanelWriter` arguments (``test``), when the Engine builds the trainer.
        predictions: :class:`~anovl.callbacks.AnomalyMapWriter` arguments (``predict``), likewise.
        seed: the global seed set before a run, as the CLI's ``seed_everything`` (None: leave it).
        config: what config.yaml and the loggers record, when the Engine builds the trainer (default: the model's
            record and settings, the data's fingerprint and these options).
        options: the run's options, those of :class:`~anovl.engine.AnomalyModule` (``label``, ``group``,
            ``variant``, ``cflow_pro``, ``results_dir``; the ``engine:`` section of a config).
    """

    def __init__(
        self,
        trainer: Trainer | dict[str, Any] | None = None,
        *,
        run_dir: str | Path | None = None,
        resume: str | Path | None = None,
        pictures: dict[str, Any] | None = None,
        predictions: dict[str, Any] | None = None,
        seed: int | None = 0,
        config: dict[str, Any] | None = None,
        **options: Any,
    ):
        self.resume_dir, self.run_dir = run_folders(resume, run_dir)
        self.options = {**options, **({"results_dir": str(self.run_dir)} if self.run_dir is not None else {})}
        self.seed = seed
        self.config = config
        self._trainer_options = trainer if isinstance(trainer, dict) else {}
        self._writers = {"pictures": dict(pictures or {}), "predictions": dict(predictions or {})}
        self.trainer: Trainer | None = trainer if isinstance(trainer, Trainer) else None
        self.module: AnomalyModule | None = None
        self.finished: ResultsTable | None = None  # set when `resume` finds nothing left to run

    # ----------------------------------------------------------------- running

    def test(self, model: AnomalyModel | AnomalyModule, datamodule: Any, **trainer_kwargs: Any) -> ResultsTable:
        """Per-category metrics of ``model`` on ``datamodule``, results files, pictures, loggers; returns the
        results table (the earlier run's where ``resume`` finds nothing left to run)."""
        module = self._module_for(model, datamodule, "test", trainer_kwargs.get("ckpt_path"))
        if self.finished is not None:
            rank_zero_info(f"All categories of {self.resume_dir} are finished; nothing to resume.")
            self.finished.print()
            return self.finished
        with self.running():
            self._trainer().test(module, datamodule=datamodule, **trainer_kwargs)
        assert module.results is not None
        return module.results

    def predict(self, model: AnomalyModel | AnomalyModule, datamodule: Any, **trainer_kwargs: Any) -> None:
        """Anomaly maps and scores of ``datamodule``'s images, written by the predictions writer."""
        module = self._module_for(model, datamodule, "predict", trainer_kwargs.get("ckpt_path"))
        # The writer saves every map; keeping them all in memory as well would only cost RAM.
        if trainer_kwargs.get("return_predictions") is None:
            trainer_kwargs["return_predictions"] = False
        with self.running():
            self._trainer().predict(module, datamodule=datamodule, **trainer_kwargs)

    # ``fit`` (training the methods that learn, anovl fit) goes here, beside test and predict.

    # ----------------------------------------------------------------- preparing a run

    def prepare(
        self, model: AnomalyModel, datamodule: Any, stage: str, ckpt_path: str | Path | None = None
    ) -> AnomalyModule:
        """Wrap ``model`` for ``stage`` and check everything that can be checked before the trainer starts: the
        data's image size, the data's listing (a wrong root fails here, and synthetic data is generated once), and
        for ``resume`` the earlier run's settings. Called by :meth:`test` / :meth:`predict`; the CLI calls it as
        soon as it has built its objects. A ``test`` / ``predict`` checkpoint file (``ckpt_path``) is loaded
        here, so that the label, the W&B names and ``resume``'s check see the trained weights."""
        if self.seed is not None and self.trainer is None:
            seed_everything(self.seed, verbose=False)
        if stage != "fit" and ckpt_path not in (None, "last", "best", "hpc", "registry"):
            from anovl.models.checkpoints import load_trained_weights

            load_trained_weights(model, str(ckpt_path))
        model_size = model_input_size(model)
        data_size = getattr(datamodule, "image_size", None)
        if isinstance(data_size, int) and data_size != model_size:
            raise AnovlError(
                f"the data's image_size is {data_size} but the model expects {model_size} px; "
                "give the datamodule the model's size (image_size=model.image_size)"
            )
        module = AnomalyModule(model, **self.options)
        trainer = self._trainer(model, datamodule, stage)
        name_wandb_run(trainer, module, dataset_name(datamodule), self.run_dir)
        categories = getattr(datamodule, "categories", None)
        if categories is not None:
            rank_zero_info(f"{len(categories)} categories: {', '.join(categories)}")
        if self.run_dir is not None and self.resume_dir is None:
            refuse_other_run(module, trainer, datamodule, self.run_dir)
        if self.resume_dir is not None:
            if stage != "test":
                raise AnovlError("resume continues an interrupted test run; predict has nothing to resume")
            earlier = continue_run(module, trainer, datamodule, self.resume_dir)
            if not datamodule.categories:
                self.finished = earlier
        self.module = module
        return module

    def _module_for(
        self, model: AnomalyModel | AnomalyModule, datamodule: Any, stage: str, ckpt_path: str | Path | None
    ) -> AnomalyModule:
        if isinstance(model, AnomalyModule):
            if model is not self.module:
                raise AnovlError("give the Engine the method (an AnomalyModel); it wraps it in AnomalyModule itself")
            return model
        return self.prepare(model, datamodule, stage, ckpt_path)

    def _trainer(self, model: AnomalyModel | None = None, datamodule: Any = None, stage: str = "test") -> Trainer:
        if self.trainer is None:
            self.trainer = self._build_trainer(model, datamodule, stage)
        return self.trainer

    def _build_trainer(self, model: AnomalyModel | None, datamodule: Any, stage: str) -> Trainer:
        options = {**TRAINER_DEFAULTS, **self._trainer_options}
        logger = options.pop("logger", None)
        if logger is None or logger is True:
            if self.run_dir is not None:  # the run's folder is the CSV logger's version folder
                logger = CSVLogger(
                    str(self.run_dir.parent.parent), name=self.run_dir.parent.name, version=self.run_dir.name
                )
            else:
                logger = CSVLogger(RUNS_DIR, name=DEFAULT_LOGGER_NAME)
        pictures = dict(self._writers["pictures"])
        if self.run_dir is not None:
            pictures.setdefault("output_dir", str(self.run_dir / "pictures"))
        config = self.config if self.config is not None else self.default_config(model, datamodule, options, stage)
        callbacks = [
            RunRecorder(config),
            PanelWriter(**pictures),
            AnomalyMapWriter(**self._writers["predictions"]),
            *(options.pop("callbacks", None) or []),
        ]
        return Trainer(logger=logger, callbacks=callbacks, **options)

    def default_config(
        self, model: AnomalyModel | None, datamodule: Any, trainer_options: dict[str, Any], stage: str
    ) -> dict[str, Any]:
        """What a run started from Python records: the method (name or class path) and its settings, the data's
        fingerprint, the engine's options, the writers' and the trainer's (plain values only)."""
        fingerprint = getattr(datamodule, "fingerprint", None)
        record = {
            "model": {**method_record(model), "settings": model.settings()} if model is not None else None,
            "data": fingerprint() if fingerprint is not None else {"class": type(datamodule).__name__},
            "engine": self.options,
            **self._writers,
            "seed_everything": self.seed,
            "trainer": {
                key: value
                for key, value in trainer_options.items()
                if isinstance(value, (str, int, float, bool, type(None)))
            },
            "resume": str(self.resume_dir) if self.resume_dir else None,
            "command": stage,
        }
        return json_data(record)

    @contextmanager
    def running(self, reuses_folder: bool = False) -> Iterator[None]:
        """Around a trainer call: the run's recorder notes which folders exist before Lightning creates any, and a run
        that writes into an existing folder on purpose (``run_dir``, ``resume``, ``reuses_folder``: a fit continued
        from its checkpoint) is not warned that the folder is not empty."""
        trainer = self._trainer()
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, RunRecorder):
                callback.before_run(trainer)
        with warnings.catch_warnings():
            if reuses_folder or self.run_dir is not None:
                warnings.filterwarnings("ignore", message=r".*exists and is not empty")
            yield


def run_folders(resume: str | Path | None, run_dir: str | Path | None) -> tuple[Path | None, Path | None]:
    """(the folder of the run to continue, the run's folder): ``resume``'s, else ``run_dir``, else None."""
    if resume and run_dir:
        raise AnovlError("give --resume RUN_DIR or --run_dir RUN_DIR, not both (--resume continues its folder)")
    resume_dir = Path(resume).expanduser().resolve() if resume else None
    return resume_dir, resume_dir or (Path(run_dir).expanduser().resolve() if run_dir else None)


def continue_run(module: AnomalyModule, trainer: Any, datamodule: Any, run_dir: Path) -> ResultsTable:
    """Check that ``run_dir`` was run with this configuration and set the module and data up to finish it:
    the categories already in its results are left out. Returns the earlier table."""
    if module.model.order_dependent:
        raise AnovlError(
            f"a run of {module.label} cannot be resumed: its results depend on the images that came "
            "before (e.g. tta.mode 'reference' carries optimiser state and random draws from image to "
            "image); run it again from the start without --resume"
        )
    earlier = ResultsTable.read(run_dir)
    if earlier.config is None:
        raise AnovlError(
            f"{run_dir}/results.json has no record of the run's configuration (an older anovl wrote "
            "it), so it cannot be resumed safely; start a new run without --resume"
        )
    earlier.check_categories(datamodule.categories)
    module.trainer = trainer  # run_config reads the trainer's precision
    current = module.run_config(datamodule)
    differences = config_differences(
        {**earlier.config, "model": normalised_record(earlier.config.get("model") or {})}, current
    )
    if differences:
        raise AnovlError(
            f"cannot resume {run_dir}: its configuration differs in {'; '.join(differences)}; resume "
            f"with the run's own settings (anovl test --config {run_dir}/config.yaml --resume "
            f"{run_dir}) or start a new run without --resume"
        )
    module.resume(earlier)
    datamodule.exclude_categories(earlier.rows)
    rank_zero_info(
        f"Resuming {run_dir}: {len(earlier.rows)} categories finished, "
        f"{len(datamodule.categories)} to run: {', '.join(datamodule.categories) or 'none'}"
    )
    return earlier


def refuse_other_run(module: AnomalyModule, trainer: Any, datamodule: Any, run_dir: Path) -> None:
    """``run_dir`` (``--run_dir``) onto a folder that holds a run's results: refused when that run had other
    settings (as ``resume`` would refuse them), so that finished results are never replaced by another run's."""
    if not (run_dir / "results.json").is_file():
        return
    earlier = ResultsTable.read(run_dir)
    module.trainer = trainer  # run_config reads the trainer's precision
    differences = (
        ["its settings are not recorded"]
        if earlier.config is None
        else config_differences(
            {**earlier.config, "model": normalised_record(earlier.config.get("model") or {})},
            module.run_config(datamodule),
        )
    )
    if differences:
        raise AnovlError(
            f"--run_dir {run_dir} holds the results of another run ({'; '.join(differences)}); "
            "choose a new folder, or continue that run with --resume and its own settings"
        )


def config_differences(earlier: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``section.key: <earlier> in the run, <current> now`` for every setting that differs."""
    differences = []
    for section in sorted(set(earlier) | set(current)):
        before, now = earlier.get(section) or {}, current.get(section) or {}
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                differences.append(
                    f"{section}.{key}: {json.dumps(before.get(key))} in the run, {json.dumps(now.get(key))} now"
                )
    return differences


def wandb_tag(text: str) -> str:
    """``text``, or where W&B would refuse it as too long, its start and a hash of the whole."""
    if len(text) <= WANDB_TAG_LENGTH:
        return text
    return f"{text[: WANDB_TAG_LENGTH - 9]}#{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def name_wandb_run(trainer: Any, module: AnomalyModule, data: str, run_dir: Path | None) -> None:
    """Name, group and tag W&B runs so that an experiment's variants sit side by side; the user's own name,
    group and tags win.

    * name: ``<dataset>-<method>-<variant>`` (``syntheticmvtec-AnoVL-tta-text``), with ``-v<N>`` where the
      run's folder is ``version_<N>`` (a grid's cells); the full label is in the config (``run.label``) and a tag;
    * group: ``engine.group`` (a grid's name) or the first config file's stem, so the runs of one experiment
      share it;
    * tags: the method, the variant, the backbone, the dataset, the label, and ``random-weights`` where the
      weights are random."""
    method = module.model.method or type(module.model).__name__
    version = run_dir.name.removeprefix("version_") if run_dir is not None and VERSION.fullmatch(run_dir.name) else None
    name = "-".join(
        part
        for part in (data, method, "" if module.variant == method else module.variant, f"v{version}" if version else "")
        if part
    )
    backbone = module.model.settings().get("backbone")
    tags = {
        data,
        method,
        module.variant,
        module.label,
        *([str(backbone)] if backbone else []),
        *(["random-weights"] if module.random_weights else []),
    }
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        init = logger._wandb_init  # read when the W&B run starts, which is later (on first use)
        init["name"] = init.get("name") or name
        init["group"] = init.get("group") or module.group
        if init.get("anonymous") is None:
            init.pop("anonymous", None)  # wandb warns that the setting is deprecated whenever it is passed
        init["tags"] = sorted({*(init.get("tags") or []), *map(wandb_tag, tags)})
