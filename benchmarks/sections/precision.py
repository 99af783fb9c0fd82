"""With ``--precision bf16|fp16``: what autocast changes in the maps and what it gains."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from anovl.metrics import functional
from anovl.models.anovl.tta import TTAConfig
from anovl.models.anovl.views import NUM_REFERENCE_VIEWS
from benchmarks.common import (
    CLASS_NAME,
    BenchConfig,
    Section,
    autocast,
    build_model,
    generate_test_set,
    interleaved_minimum,
    random_images,
    ratio,
    seconds,
)


def precision_section(config: BenchConfig, device: torch.device, workdir: Path) -> Section:
    from anovl.data import MVTecDataModule
    from anovl.data.transforms import prepare_batch

    batch = max(config.batch_sizes)
    model = build_model(
        config.backbone, config.pretrained, NUM_REFERENCE_VIEWS, TTAConfig(), workdir / "text-cache", device
    )
    root = generate_test_set(
        workdir / "precision-set",
        config.precision_categories,
        config.precision_good,
        config.precision_defect,
        256,
        config.data_workers,
    )
    datamodule = MVTecDataModule(root, image_size=model.image_size, batch_size=batch)
    outputs: dict[str, dict[str, list[torch.Tensor]]] = {"fp32": {}, config.precision: {}}
    truth: dict[str, list[torch.Tensor]] = {"masks": [], "labels": []}
    for batch_data in map(prepare_batch, datamodule.test_dataloader()):
        images = batch_data["image"].to(device)
        truth["masks"].append(batch_data["mask"])
        truth["labels"].append(batch_data["label"])
        for precision, collected in outputs.items():
            with autocast(device, precision):
                output = model(images, list(batch_data["category"]), list(batch_data["prompt_name"]))
            for key, value in (("tfa", output.tfa_map), ("tta", output.anomaly_map), ("score", output.pred_score)):
                collected.setdefault(key, []).append(value.float().cpu())
    merged = {
        precision: {key: torch.cat(values) for key, values in collected.items()}
        for precision, collected in outputs.items()
    }
    masks, labels = torch.cat(truth["masks"]).numpy(), torch.cat(truth["labels"]).numpy()

    def aurocs(values: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        pixel_tfa = functional.auroc(functional.RankedScores.from_maps(values["tfa"].numpy(), masks))
        pixel_tta = functional.auroc(functional.RankedScores.from_maps(values["tta"].numpy(), masks))
        image = functional.auroc(functional.RankedScores.from_targets(values["score"].numpy(), labels))
        return pixel_tfa, pixel_tta, image

    full, low = merged["fp32"], merged[config.precision]
    full_auroc, low_auroc = aurocs(full), aurocs(low)
    images = random_images(batch, model.image_size, device)
    names = [CLASS_NAME] * batch

    def forward(precision: str) -> Callable[[], Any]:
        def run() -> Any:
            with autocast(device, precision):
                return model(images, names)

        return run

    for precision in outputs:  # warm-up
        forward(precision)()
    fp32_time, low_time = interleaved_minimum([forward("fp32"), forward(config.precision)], config.repeats, device)
    labelled = {"tfa": "TFA map", "tta": "TTA map", "score": "image score"}
    rows = [
        [f"max abs Δ, {name}", "", "", f"{(full[key] - low[key]).abs().max().item():.3g}"]
        for key, name in labelled.items()
    ]
    rows += [
        [name, f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"]
        for name, a, b in zip(("pixel AUROC, TFA", "pixel AUROC, TTA", "image AUROC"), full_auroc, low_auroc)
    ]
    rows.append(
        [f"forward time, batch {batch}", seconds(fp32_time), seconds(low_time), f"{ratio(fp32_time / low_time)} faster"]
    )
    return Section(
        f"{config.precision} autocast vs fp32 ({config.backbone}, {NUM_REFERENCE_VIEWS} views + TTA)",
        ["quantity", "fp32", config.precision, "Δ"],
        rows,
        [
            f"{len(labels)} generated images in {config.precision_categories} categories. With random weights the "
            "maps are nearly flat, so the AUROCs are near chance and their Δ overstates what real weights would show."
        ],
    )
