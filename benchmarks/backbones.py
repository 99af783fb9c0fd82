"""The V-V forward ÷ plain ``encode_image`` time per backbone family, at batch 16, each ratio from one run.

The V-V forward is AnoVL's encoder pass (``model.encoder(views, num_local=batch)``: the original stream
for every image plus the value-wise local stream); the target is ≤ 1.2 (the
CPU figures are in docs/benchmarks.md).
Random weights at each family's native size (speed does not depend on the values).

    PYTHONPATH=. python benchmarks/backbones.py --device cuda
    PYTHONPATH=. python benchmarks/backbones.py --families ViT-B-16-plus-240 EVA02-B-16 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import time
import warnings

import torch

from anovl.backbones import create_backbone

# One representative per family of docs/backbones.md (the smallest config of each).
FAMILIES = {
    "ViT-B-16-plus-240": "open_clip ViT, MultiheadAttention, class token (reference)",
    "ViT-L-14-CLIPA": "open_clip ViT, CLIPA average pool",
    "coca_ViT-B-32": "open_clip ViT, CoCa attentional pooler",
    "ViT-B-16-SigLIP": "timm ViT, SigLIP attention pool",
    "MobileCLIP-B": "timm ViT, hybrid stem, class token",
    "ViTamin-S": "timm ViT, hybrid stem, average pool",
    "EVA02-B-16": "timm EVA, rotary, SwiGLU",
    "PE-Core-B-16": "timm EVA, AttentionRope, attention pool",
    "vit_relpos_medium_patch16_cls_224": "timm ViT, relative-position bias, class token",
}


def seconds(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paired_times(plain, dual, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """Median plain and V-V times and the median of their per-repeat ratios.

    The two run alternately, so a slowdown of the machine (a noisy neighbour, clock changes) hits both
    sides of a ratio alike instead of one block of repeats.
    """
    plain(), dual()  # warm-up (allocations, kernels)
    pairs = [(seconds(plain, device), seconds(dual, device)) for _ in range(repeats)]
    return (
        statistics.median(p for p, _ in pairs),
        statistics.median(d for _, d in pairs),
        statistics.median(d / p for p, d in pairs),
    )


@torch.no_grad()
def measure(name: str, batch: int, repeats: int, device: torch.device) -> None:
    logging.disable(logging.WARNING)  # open_clip's "no pretrained weights" line: random weights are meant
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = create_backbone(name, device=device, tokenizer=lambda texts: None)
        size = backbone.image_size - backbone.image_size % backbone.visual.patch_size
        if size != backbone.image_size:
            backbone = create_backbone(name, image_size=size, device=device, tokenizer=lambda texts: None)
    images = torch.randn(batch, 3, size, size, device=device)
    plain, dual, ratio = paired_times(
        lambda: backbone.clip.encode_image(images), lambda: backbone.visual(images, num_local=batch), device, repeats
    )
    print(
        f"{name:<22} {FAMILIES.get(name, ''):<45} {plain * 1e3:>10.1f}ms {dual * 1e3:>10.1f}ms {ratio:>6.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # one family, this process
    args = parser.parse_args()
    if args.in_process:
        return measure(args.families[0], args.batch, args.repeats, torch.device(args.device))
    print(
        f"batch {args.batch}, {args.device}, median of {args.repeats} alternating repeats, a fresh process per family"
    )
    print(f"{'backbone':<22} {'family':<45} {'encode_image':>12} {'V-V forward':>12} {'ratio':>6}", flush=True)
    for name in args.families:
        # A fresh process each: a family measured after larger ones ran slower, by the allocator's state.
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--in-process",
                "--families",
                name,
                "--batch",
                str(args.batch),
                "--repeats",
                str(args.repeats),
                "--device",
                args.device,
            ],
            check=False,
        )


if __name__ == "__main__":
    main()
