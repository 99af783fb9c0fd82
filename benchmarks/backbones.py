"""The V-V forward ÷ plain ``encode_image`` time per backbone family, at batch 16, measured in one run.

The V-V forward is AnoVL's encoder pass (``model.encoder(views, num_local=batch)``: the original stream
for every image plus the value-wise local stream); the target is ≤ 1.2 (the
CPU figures are in docs/benchmarks.md).
Random weights at each family's native size (speed does not depend on the values).

    PYTHONPATH=. python benchmarks/backbones.py --device cuda
    PYTHONPATH=. python benchmarks/backbones.py --families ViT-B-16-plus-240 EVA02-B-16 --repeats 3
"""

from __future__ import annotations

import argparse
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
}


def timed(step, device: torch.device, repeats: int) -> float:
    step()  # warm-up (allocations, kernels)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"batch {args.batch}, {device}, best of {args.repeats}")
    print(f"{'backbone':<22} {'family':<45} {'encode_image':>12} {'V-V forward':>12} {'ratio':>6}")
    for name in args.families:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone = create_backbone(name, device=device, tokenizer=lambda texts: None)
        size = backbone.image_size - backbone.image_size % backbone.visual.patch_size
        if size != backbone.image_size:
            backbone = create_backbone(name, image_size=size, device=device, tokenizer=lambda texts: None)
        images = torch.randn(args.batch, 3, size, size, device=device)
        plain = timed(lambda: backbone.clip.encode_image(images), device, args.repeats)
        dual = timed(lambda: backbone.visual(images, num_local=args.batch), device, args.repeats)
        print(f"{name:<22} {FAMILIES.get(name, ''):<45} {plain * 1e3:>10.1f}ms {dual * 1e3:>10.1f}ms {dual / plain:>6.2f}")
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
