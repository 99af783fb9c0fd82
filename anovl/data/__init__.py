"""Data: robust image loading, docs/METHOD.md §1 preprocessing, corruptions, datasets and LightningDataModules."""

from anovl.data.datamodule import AnomalyDataModule
from anovl.data.dataset import AnomalyDataset, Sample, SkippedFileWarning
from anovl.data.listing import UnusedFilesWarning
from anovl.data.sampling import CategoryBatchSampler, collate_batch
from anovl.data.corruptions import CORRUPTION_PRESETS, CorruptionConfig, Corruptor, image_seed, resolve_corruption
from anovl.data.folder import FolderDataModule
from anovl.data.image_io import IMAGE_EXTENSIONS, BadImageError, check_mask_size, is_image_file, load_mask, load_rgb
from anovl.data.mvtec import MVTecDataModule
from anovl.data.safe_names import safe_component
from anovl.data.synthetic import SyntheticMVTecDataModule, generate_mvtec_like, generate_visa_like
from anovl.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    normalize,
    resize_image,
    resize_mask,
    shorter_side_size,
    split_tiles,
    stitch_tiles,
    tile_offsets,
)
from anovl.data.visa import VisADataModule

__all__ = [
    "AnomalyDataModule",
    "AnomalyDataset",
    "BadImageError",
    "CLIP_MEAN",
    "CLIP_STD",
    "CORRUPTION_PRESETS",
    "CategoryBatchSampler",
    "CorruptionConfig",
    "Corruptor",
    "FolderDataModule",
    "IMAGE_EXTENSIONS",
    "MVTecDataModule",
    "Sample",
    "SkippedFileWarning",
    "SyntheticMVTecDataModule",
    "UnusedFilesWarning",
    "VisADataModule",
    "check_mask_size",
    "collate_batch",
    "generate_mvtec_like",
    "generate_visa_like",
    "image_seed",
    "is_image_file",
    "load_mask",
    "load_rgb",
    "normalize",
    "resize_image",
    "resize_mask",
    "resolve_corruption",
    "safe_component",
    "shorter_side_size",
    "split_tiles",
    "stitch_tiles",
    "tile_offsets",
]
