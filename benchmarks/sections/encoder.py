"""The TFA forward (dual path, 1 view) against CLIP's plain ``encode_image``, same batch and resolution."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import (
    CLASS_NAME,
    FEW_PROMPTS,
    BenchConfig,
    Section,
    autocast,
    build_model,
    interleaved_minimum,
    random_images,
    ratio,
    seconds,
    target,
)


def encoder_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    model = build_model(
        config.encoder_backbone, config.pretrained, 1, None, workdir / "text-cache", device, FEW_PROMPTS
    )
    section = Section(
        f"TFA forward vs plain CLIP encode_image ({config.encoder_backbone}, {model.image_size} px)",
        [
            "batch",
            "encode_image",
            "TFA encoder (dual path)",
            "TFA forward, 1 view",
            "encoder ÷ encode_image",
            "TFA forward ÷ encode_image",
        ],
        notes=[
            f"Minimum of {config.encoder_repeats} interleaved repetitions. 'TFA forward' is "
            "`AnoVL(num_views=1)(images, names)`: dual-path encoder, maps and image scores (text embeddings of "
            "a 6-sentence prompt set, encoded during the warm-up: the prompt count does not change this cost); "
            "target ≤ 1.2 at batch 16."
        ],
    )
    kernels = attention_kernels(
        model, random_images(max(config.batch_sizes), model.image_size, device), device, config.precision
    )
    fused = sum(count for name, count in kernels.items() if not name.endswith("_math"))
    verdict = target(fused == sum(kernels.values()) > 0, "all fused") if device.type == "cuda" else "(target on CUDA)"
    section.notes.append(
        f"Attention kernels of the TFA forward (profiler ops): {dict(kernels) or 'none'}; fused "
        f"(flash, memory-efficient or cuDNN, not the math fallback): {fused} of "
        f"{sum(kernels.values())} {verdict}."
    )
    for batch in config.batch_sizes:
        images = random_images(batch, model.image_size, device)
        names = [CLASS_NAME] * batch
        functions = [
            lambda x, n: model.clip.encode_image(x),
            lambda x, n: model.encoder(x, num_local=len(n), layers=model.layers),
            lambda x, n: model(x, n),
        ]
        with torch.no_grad(), autocast(device, config.precision):
            for function in functions:  # warm-up (lazy initialisation, CUDA context) on one image: cheap on a CPU
                function(images[:1], names[:1])
            plain, dual, forward = interleaved_minimum(
                [functools.partial(f, images, names) for f in functions], config.encoder_repeats, device
            )
        verdict = target(forward / plain <= 1.2, "≤ 1.2") if batch == 16 else ""
        section.rows.append(
            [
                str(batch),
                seconds(plain),
                seconds(dual),
                seconds(forward),
                ratio(dual / plain),
                f"{ratio(forward / plain)} {verdict}".strip(),
            ]
        )
    return section


def attention_kernels(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, precision: str
) -> Counter[str]:
    """How often each scaled-dot-product attention implementation runs in one TFA forward (``aten::`` op names:
    ``_scaled_dot_product_flash_attention``, ``..._efficient_attention``, ``..._cudnn_attention``, or the
    unfused ``..._attention_math``)."""
    with torch.no_grad(), autocast(device, precision), profile(activities=[ProfilerActivity.CPU]) as profiler:
        model(images, [CLASS_NAME] * len(images))
    return Counter(
        {
            event.key.removeprefix("aten::"): event.count
            for event in profiler.key_averages()
            if event.key.startswith("aten::_scaled_dot_product")
        }
    )
