"""Data: robust image loading, docs/METHOD.md §1 preprocessing, corruptions, datasets and LightningDataModules.

Names are imported on first use, so that the plain-PyTorch core (models, backbones) can use the light modules
(transforms, image_io, corruptions) without loading Lightning, which the datamodules need."""

from importlib import import_module
from typing import Any

_MODULES = {
    "anovl.data.datamodule": ("AnomalyDataModule",),
    "anovl.data.dataset": ("AnomalyDataset", "Sample", "SkippedFileWarning"),
    "anovl.data.listing": ("UnusedFilesWarning",),
    "anovl.data.sampling": ("CategoryBatchSampler", "collate_batch"),
    "anovl.data.corruptions": (
        "CORRUPTION_PRESETS",
        "CorruptionConfig",
        "Corruptor",
        "image_seed",
        "resolve_corruption",
    ),
    "anovl.data.folder": ("FolderDataModule",),
    "anovl.data.image_io": (
        "BadImageError",
        "IMAGE_EXTENSIONS",
        "check_mask_size",
        "is_image_file",
        "load_mask",
        "load_rgb",
    ),
    "anovl.data.mvtec": ("MVTecDataModule",),
    "anovl.io.safe_names": ("safe_component",),
    "anovl.data.synthetic": ("SyntheticMVTecDataModule", "generate_mvtec_like", "generate_visa_like"),
    "anovl.data.decoded_cache": ("DecodedCache",),
    "anovl.data.transforms": (
        "CLIP_MEAN",
        "CLIP_STD",
        "normalize",
        "normalize_images",
        "prepare_batch",
        "resize_image",
        "resize_mask",
        "shorter_side_size",
        "split_tiles",
        "stitch_tiles",
        "tile_offsets",
    ),
    "anovl.data.visa": ("VisADataModule",),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'anovl.data' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
