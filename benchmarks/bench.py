"""Performance benchmark of anovl: every figure is a ratio of two things measured in the same run.

    python -m benchmarks.bench --quick                 # from the repository root; CPU, a few minutes
    python -m benchmarks.bench --device cuda --precision bf16 --output gpu.md
    python benchmarks/bench.py --quick                 # the same, as a file

Sections (``--sections`` picks some; each is a module of :mod:`benchmarks.sections`, listed in
benchmarks/README.md): ``pipeline`` (a whole ``anovl test`` against the model alone, the data path against
Pillow's decoding, loader scaling, the decoded-image cache), ``throughput``, ``reference``, ``encoder``,
``text``, ``metrics``, ``testrun``, ``precision``.

Memory is the kernel's resident-set high-water mark of a fresh process (see
:class:`~benchmarks.common.PeakMemory`), which sees numpy, torch and C allocations alike. Linux only for the
memory figures.

It lives outside the package (it needs the repository: the reference pipeline is a test oracle, under tests/).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a file (python benchmarks/bench.py): the repository root is not on the path
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    PRECISIONS,
    SECTIONS,
    BenchConfig,
    full_config,
    machine_description,
    quick_config,
    setup_process,
    smoke_config,
)
from benchmarks.sections import SECTION_FUNCTIONS


def run_benchmark(config: BenchConfig, emit: Callable[[str], None] = print) -> str:
    """Run the chosen sections, emitting each as markdown when done; returns the whole report."""
    device = torch.device(config.device)
    sections = [name for name in config.sections if name != "precision" or config.precision != "fp32"]
    # TF32 is a global switch of float32 matrix products, not an autocast dtype.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.precision == "tf32"
    mode = (
        "smoke (a dry run: figures meaningless)"
        if config.smoke
        else "quick (small counts, CPU-sized)"
        if config.quick
        else "full"
    )
    header = (
        f"# AnoVL benchmark\n\n- Machine: {machine_description(device)}\n- Date: {date.today().isoformat()}\n"
        f"- Mode: {mode}; device {device}; precision {config.precision}; batch sizes "
        f"{', '.join(map(str, config.batch_sizes))}; weights {config.pretrained or 'random'}\n"
    )
    emit(header)
    parts = [header]
    with tempfile.TemporaryDirectory(prefix="anovl-bench-") as workdir:
        for name in sections:
            start = time.perf_counter()
            text = SECTION_FUNCTIONS[name](config, device, Path(workdir)).markdown()
            text += f"\n_(section took {time.perf_counter() - start:.0f} s)_\n"
            emit(text)
            parts.append(text)
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,  # a misspelt option (--baseline-map) is an error, not a prefix of another
    )
    presets = parser.add_mutually_exclusive_group()
    presets.add_argument("--quick", action="store_true", help="small counts and a small model: minutes on a CPU")
    presets.add_argument(
        "--smoke", action="store_true", help="a dry run: a tiny model and a handful of inputs, figures meaningless"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="fp32",
        help="autocast dtype of the model runs (tf32: float32 with TF32 matrix products on CUDA); "
        "other than fp32 adds the 'precision' section",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--tta-compile", action="store_true", help="TTA's adapter steps through torch.compile (tta.compile)"
    )
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--backbone", help="model of every section but 'encoder' (default: ViT-B-16-plus-240; --quick: anovl-small-vit)"
    )
    parser.add_argument("--encoder-backbone", help="model of the 'encoder' section (default: ViT-B-16-plus-240)")
    parser.add_argument("--pretrained", help="open_clip tag or local weights (default: random weights)")
    parser.add_argument("--repeats", type=int, help="timed repetitions (minimum reported)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; --quick: 1)")
    parser.add_argument(
        "--baseline-maps",
        type=int,
        help="maps the slow threshold PRO baseline runs on, its time extrapolated to all maps",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m benchmarks.bench: error: --device cuda but CUDA is not available")
    overrides = {
        key: value
        for key, value in (
            ("backbone", args.backbone),
            ("encoder_backbone", args.encoder_backbone),
            ("pretrained", args.pretrained),
            ("repeats", args.repeats),
            ("baseline_maps", args.baseline_maps),
            ("threads", args.threads),
        )
        if value is not None
    }
    if args.repeats is not None:
        overrides["encoder_repeats"] = args.repeats
    preset = smoke_config if args.smoke else quick_config if args.quick else full_config
    config = preset(
        device=args.device,
        precision=args.precision,
        batch_sizes=tuple(args.batch_sizes),
        sections=tuple(args.sections),
        tta_compile=args.tta_compile,
        **overrides,
    )
    setup_process(config.threads)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") if args.output else contextlib.nullcontext() as output:

        def emit(text: str) -> None:
            print(text, flush=True)
            if output is not None:  # section by section, so that a run cut short keeps what it measured
                output.write(text + "\n")
                output.flush()

        run_benchmark(config, emit)


if __name__ == "__main__":
    # Through the importable module, so that functions sent to spawned processes pickle as benchmarks.*.
    from benchmarks.bench import main as bench_main

    bench_main()
