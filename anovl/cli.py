"""The ``anovl`` console script: a small dispatcher in front of the subcommands.

    anovl test --config configs/mvtec.yaml --data.init_args.root /data/mvtec
    anovl test --config runs/mvtec/version_0/config.yaml --resume runs/mvtec/version_0
    anovl predict --config configs/folder.yaml --data.init_args.path my_images/
    anovl compare runs/mvtec/version_0 runs/mvtec/version_1
    anovl grid --config configs/grid.yaml

``test`` and ``predict`` are LightningCLI subcommands (:mod:`anovl.lightning_cli`; ``--exported FILE`` runs an
exported model); ``compare``, ``grid``, ``export`` and ``app`` are plain argparse commands. Nothing heavy (torch, Lightning) is imported before the subcommand is known, so
``anovl --help`` answers at once. Errors in the user's input (AnovlError) end with one line
``anovl: error: <message>`` on stderr and exit code 2, like argument errors.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from importlib import import_module
from typing import Any, Literal

import yaml

from anovl.commands import COMMANDS, DESCRIPTION
from anovl.compare import main as compare_main
from anovl.configs import CONFIG_OPTIONS, config_document, option_values
from anovl.errors import AnovlError
from anovl.grid import main as grid_main
from anovl.protocol import main as protocol_main
from anovl.signals import stop_requested


def top_level_help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: anovl <command> [options]", "", DESCRIPTION, "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += [
        "",
        "Run `anovl <command> --help` for a command's options, e.g. `anovl test --help`;",
        "`anovl test --model.help anovl.models.WinCLIP` describes a model's options.",
    ]
    return "\n".join(lines)


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
    """The plugins named on a command line: ``--plugins`` values and ``plugins:`` in every ``--config``, a
    file or inline YAML, in command-line order.

    They must be imported before the configuration is parsed, since it may name their classes."""
    specs: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str):
            specs.append(value)
        elif isinstance(value, list):
            specs.extend(str(item) for item in value)

    for option, value in option_values(command_line):
        if option in ("--plugins", "--plugins+"):
            add(yaml.safe_load(value))
        elif option in CONFIG_OPTIONS:
            document = config_document(value)
            if isinstance(document, dict):
                add(document.get("plugins"))
    return list(dict.fromkeys(specs))


def help_first(command_line: list[str]) -> list[str]:
    """``--plugins`` moved before a ``--model.help`` / ``--data.help`` (whose action prints and exits, so what
    follows it would be refused as unknown); the plugins themselves are imported before parsing anyway."""
    helps = [index for index, argument in enumerate(command_line) if argument.partition("=")[0].endswith(".help")]
    if not helps:
        return command_line
    moved: list[str] = []
    rest: list[str] = []
    skip = False
    for index, argument in enumerate(command_line):
        if skip:
            skip = False
            continue
        option, equals, _ = argument.partition("=")
        if option in ("--plugins", "--plugins+") and index > helps[0]:
            moved.append(argument)
            if not equals and index + 1 < len(command_line):
                moved.append(command_line[index + 1])
                skip = True
        else:
            rest.append(argument)
    head = 1 if rest[:1] in (["fit"], ["test"], ["predict"]) else 0  # the subcommand stays first
    return [*rest[:head], *moved, *rest[head:]]


def _one_line(error: BaseException) -> str:
    """The message of an error as one line (a DataLoader worker re-raises with the worker's traceback)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and "Traceback" in str(error):
        # The last line is "<module>.<Class>: <message>" of the original exception.
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


def _misconfiguration_exception() -> tuple[type, ...]:
    """Lightning's MisconfigurationException where Lightning is loaded (only then can it have been raised)."""
    module = sys.modules.get("lightning.fabric.utilities.exceptions")
    return (module.MisconfigurationException,) if module is not None else ()


def _user_error(error: BaseException | None) -> AnovlError | None:
    """The user error behind an exception (jsonargparse wraps errors raised while instantiating classes):
    an AnovlError; Lightning's refusal of a setting (an accelerator the machine lacks, say); or a file-system
    error on a path the user gave (an output folder that is a file, a read-only folder, a full disk)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, AnovlError):
            return error
        if isinstance(error, _misconfiguration_exception()):
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
    128 + the signal, so that a scheduler never takes a pre-empted run for a finished one.

    ``fit`` (``training``) stops at the next batch boundary instead, after saving a checkpoint of that state
    (anovl.engine.training.TrainingRun); a second signal stops it at once."""

    def __init__(self, training: bool = False) -> None:
        self.training = training
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.training and self.received is None:
            self.received = signum
            stop_requested.set()
            return
        if self.received is None or self.training:
            self.received = signum
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> Literal[False]:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self.received is not None and kind is not None and issubclass(kind, (KeyboardInterrupt, SystemExit)):
            kept = (
                "a checkpoint of the last finished batch is in RUN/checkpoints/interrupted.ckpt (of the last "
                "finished epoch: last.ckpt); continue with anovl fit --config RUN/config.yaml --ckpt_path CKPT"
                if self.training
                else "the results of finished categories are kept; continue with anovl test "
                "--config RUN/config.yaml --resume RUN"
            )
            print(f"anovl: error: stopped by {signal.Signals(self.received).name}; {kept}", file=sys.stderr)
            raise SystemExit(128 + self.received) from None
        return False


def main(args: list[str] | None = None) -> None:
    command_line = sys.argv[1:] if args is None else args
    if command_line[:1] in ([], ["-h"], ["--help"]):
        print(top_level_help())
        raise SystemExit(0 if command_line else 2)
    if command_line[:1] == ["compare"]:
        raise SystemExit(_run_user_command(lambda: compare_main(command_line[1:])))
    if command_line[:1] == ["grid"]:
        raise SystemExit(_run_user_command(lambda: grid_main(command_line[1:])))
    if command_line[:1] == ["protocol"]:
        raise SystemExit(_run_user_command(lambda: protocol_main(command_line[1:])))
    if command_line[:1] in (["export"], ["app"]):  # anovl.deploy imports torch: only for these commands
        raise SystemExit(
            _run_user_command(lambda: import_module("anovl.deploy").main(command_line[0], command_line[1:]))
        )
    from anovl.lightning_cli import run_lightning_cli  # torch and Lightning: only for fit / test / predict

    def run() -> None:
        arguments = help_first(exported_model_arguments(command_line))
        if args is None:  # from the console: LightningCLI reads sys.argv (given both, it warns)
            sys.argv[1:] = arguments
        run_lightning_cli(None if args is None else arguments, plugin_specs(arguments))

    with _StopSignals(training=command_line[:1] == ["fit"]):
        status = _run_user_command(run)
    if status:
        raise SystemExit(status)


def __getattr__(name: str) -> Any:
    # `from anovl.cli import AnovlCLI` keeps working without importing Lightning for every command.
    if name == "AnovlCLI":
        return import_module("anovl.lightning_cli").AnovlCLI
    raise AttributeError(f"module 'anovl.cli' has no attribute {name!r}")


if __name__ == "__main__":
    main()
