"""Text-embedding start-up: encoding a class's prompts (cold) against reading the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import torch

from anovl.models.text_cache import TextEmbeddingCache, encode_sentences
from benchmarks.common import CLASS_NAME, BenchConfig, Section, build_model, ratio, seconds, target, time_call


def text_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    model = build_model(config.backbone, config.pretrained, 1, None, workdir / "text-cache-model", device)
    backbone, prompts = model.text_cache.backbone, model.prompts
    cache_dir = workdir / "text-cache-timed"
    encode_sentences(backbone, ["a warm-up sentence"])  # first-call costs (CUDA context, kernels) are not the cache's
    normal, abnormal = prompts.normal_sentences(CLASS_NAME), prompts.abnormal_sentences(CLASS_NAME)
    cold, _ = time_call(lambda: TextEmbeddingCache(backbone, cache_dir).get(normal, abnormal), device)
    cached = min(
        time_call(lambda: TextEmbeddingCache(backbone, cache_dir).get(normal, abnormal), device)[0]
        for _ in range(max(3, config.repeats))
    )
    return Section(
        f"Text-embedding start-up ({config.backbone})",
        ["cold: encode the class's prompts", "cached: new TextEmbeddingCache reading safetensors", "ratio"],
        [[seconds(cold), seconds(cached), f"{ratio(cold / cached)} {target(cold / cached >= 20, '≥ 20×')}"]],
        [
            f"{len(normal) + len(abnormal)} sentences for one class; cold includes writing the cache file; cached is the minimum "
            f"of {max(3, config.repeats)} fresh caches (key, file read), as in a new process."
        ],
    )
