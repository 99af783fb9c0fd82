"""APRIL-GAN (Chen et al., VAND challenge at CVPR 2023): linear heads trained on auxiliary data, zero-/few-shot."""

from anovl.models.aprilgan.prompts import AprilGANPrompts
from anovl.models.aprilgan.torch_model import (
    AprilGAN,
    AprilGANOutput,
    few_shot_image_scores,
)

__all__ = ["AprilGAN", "AprilGANOutput", "AprilGANPrompts", "few_shot_image_scores"]
