"""Threshold calibration, a post-processor of ``predict``: thresholds at a quantile of known-normal images'
scores and map pixels, computed by running the model on them before the images to predict."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from anovl.data import AnomalyDataModule, AnomalyDataset, collate_batch
from anovl.data.corruptions import Corruptor
from anovl.data.folder import FolderDataModule
from anovl.errors import AnovlError
from anovl.thresholds import Thresholds, quantile_thresholds

if TYPE_CHECKING:
    from anovl.engine.module import AnomalyModule


def calibrate_on_normal_images(
    trainer: Trainer, pl_module: LightningModule, normal_images: str, quantile: float
) -> Thresholds:
    """Run the model on the normal images, preprocessed as the data to predict is (size, resize mode,
    corruption branch), under that data's category and prompt name; every process runs all of them."""
    data = getattr(trainer, "datamodule", None)
    categories = getattr(data, "categories", None)
    if not isinstance(data, AnomalyDataModule):
        raise AnovlError("predictions.normal_images needs one of anovl's datamodules (data.class_path)")
    if categories is None or len(categories) != 1:
        raise AnovlError(
            f"predictions.normal_images calibrates one category, but the data has {categories}; "
            "predict one category at a time (data.init_args.categories) or give thresholds"
        )
    category = categories[0]
    listing = FolderDataModule(normal_images, on_bad_image=data.on_bad_image)
    anomalous = [str(sample.image_path) for sample in listing.samples if sample.label == 1]
    if anomalous:
        raise AnovlError(
            f"predictions.normal_images must hold only normal images, but {normal_images} "
            f"has {len(anomalous)} in an anomalous subfolder (e.g. {anomalous[0]})"
        )
    samples = [
        replace(sample, category=category, prompt_name=data.prompt_name_for(category)) for sample in listing.samples
    ]
    corruptor = Corruptor(data.corruption, data.seed) if data.corruption is not None else None
    dataset = AnomalyDataset(samples, data.image_size, data.mode, on_bad_image=data.on_bad_image, corruptor=corruptor)
    # Lightning hands callbacks a LightningModule; anovl's predict runs an AnomalyModule
    module = cast("AnomalyModule", pl_module)
    image_scores, pixel_values = [], []
    with trainer.precision_plugin.predict_step_context():
        for batch in DataLoader(dataset, batch_size=data.batch_size, collate_fn=collate_batch):
            batch = pl_module.on_after_batch_transfer(
                {
                    key: value.to(pl_module.device) if isinstance(value, torch.Tensor) else value
                    for key, value in batch.items()
                },
                0,
            )
            maps, scores = module.anomaly_maps(batch)
            image_scores.append(scores.detach().float().cpu().numpy())
            pixel_values.append(maps.detach().float().cpu().numpy().ravel())
    return quantile_thresholds(np.concatenate(image_scores), np.concatenate(pixel_values), quantile, str(normal_images))
