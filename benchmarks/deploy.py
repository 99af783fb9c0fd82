"""Exported AnoVL against PyTorch eager: speed ratios measured in one run, export time and file size.

    python benchmarks/deploy.py                                   # ViT-B-16-plus-240, 240 px, 1 and 22 views
    python benchmarks/deploy.py --backbone anovl-small-vit --repeats 5 --output deploy.md   # quick check

For each number of views, the same AnoVL (random weights unless --pretrained: speed does not depend on
them) runs a batch in PyTorch eager and exported to ONNX (ONNX Runtime), OpenVINO IR (OpenVINO) and
TorchScript. Runs of the backends are interleaved, repeat after repeat, so drifts of the machine's speed
hit them alike; a figure is the median time. Every backend gets the same number of CPU threads. The
speed-up is eager's time ÷ the backend's; the largest map difference to eager checks that the same thing
is measured.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from anovl import AnoVL  # noqa: E402
from anovl.deploy import export_model, load_exported  # noqa: E402
from anovl.results import markdown_table  # noqa: E402

FORMATS = {"onnx": "ONNX Runtime", "openvino": "OpenVINO", "torchscript": "TorchScript"}
CLASSES = ("bottle", "screw")


def file_size(path: Path) -> int:
    return sum(part.stat().st_size for part in (path, path.with_suffix(".bin")) if part.is_file())


def measure(runners: dict, images: torch.Tensor, categories: list[str], repeats: int) -> dict[str, float]:
    """Median seconds per call of every runner, the runners interleaved within each repeat."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for name, run in runners.items():  # warm-up: first-call allocations, lazy compilation
        run(images, categories)
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run(images, categories)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="ViT-B-16-plus-240")
    parser.add_argument("--pretrained", default=None, help="weights file (default: random weights)")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 22])
    parser.add_argument("--batch", type=int, default=1, help="images per call (a line camera sends one)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, help="also write the table (Markdown) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for num_views in args.views:
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AnoVL(args.backbone, pretrained=args.pretrained, num_views=num_views, use_text_cache=False)
            size = model.image_size
            images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            categories = [CLASSES[index % len(CLASSES)] for index in range(args.batch)]
            exported, export_seconds = {}, {}
            for fmt in FORMATS:
                start = time.perf_counter()
                path = export_model(model, list(CLASSES), Path(scratch) / f"{fmt}-{num_views}", fmt)
                export_seconds[fmt] = time.perf_counter() - start
                exported[fmt] = (path, load_exported(path, threads=args.threads))
            runners = {"eager": lambda x, c: model(x, c)}
            runners.update({fmt: runner for fmt, (_, runner) in exported.items()})
            seconds = measure(runners, images, categories, args.repeats)
            reference = model(images, categories)
            rows.append(
                [str(num_views), "PyTorch eager", f"{1000 * seconds['eager'] / args.batch:.1f}", "1.00", "0", "", ""]
            )
            for fmt, name in FORMATS.items():
                output = exported[fmt][1](images, categories)
                difference = (output.anomaly_map - reference.anomaly_map).abs().max().item()
                rows.append(
                    [
                        str(num_views),
                        name,
                        f"{1000 * seconds[fmt] / args.batch:.1f}",
                        f"{seconds['eager'] / seconds[fmt]:.2f}",
                        f"{difference:.1e}",
                        f"{export_seconds[fmt]:.1f}",
                        f"{file_size(exported[fmt][0]) / 2**20:.1f}",
                    ]
                )
    title = (
        f"{args.backbone} at {size} px, batch {args.batch}, {args.threads} threads, {args.repeats} repeats "
        f"(median), {platform.processor() or platform.machine()}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}"
    )
    table = markdown_table(
        ["views", "runtime", "ms / image", "speed-up vs eager", "max Δ map", "export s", "file MiB"], rows
    )
    text = "\n".join([title, "", *table]) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
