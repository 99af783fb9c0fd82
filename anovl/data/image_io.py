"""Loading of untrusted user images and masks into plain numpy arrays.

Every failure to read a file surfaces as :class:`BadImageError` (one line naming the file and the fix), so a
dataset can either stop with a clear message or skip the file.

Conversion rules (documented because they change pixel values):

* Images always come out as ``uint8 H×W×3`` RGB, upright: the EXIF orientation tag is applied.
* Alpha is dropped, not composited: the colour stored under transparent pixels is kept, which is what
  ``Image.open(path).convert("RGB")`` in the reference code does.
* 16-bit integer images (``I;16*``, and ``I`` which Pillow uses for 16-bit PNG/TIFF) are scaled from the
  0..65535 range to 0..255 with rounding (65535 / 255 = 257), not clipped.
* Float images (``F``) have no fixed range; they are min-max scaled per image.
* CMYK (e.g. print JPEGs) uses Pillow's conversion, which ignores embedded ICC profiles.
* 16-bit-per-channel colour PNGs are reduced to 8 bits by Pillow itself on load.
* Multi-frame files (GIF, TIFF stacks) use their first frame.
* Very large images: Pillow's decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``, about 179 M pixels
  before it refuses) is kept; the error message tells how to raise it for trusted files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from anovl.errors import AnovlError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

# Pillow modes holding more than 8 bits per pixel in a single integer channel; values are 0..65535.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

_FIX = "re-save or replace the file"


class BadImageError(AnovlError):
    """An image or mask file that cannot be used (missing, not an image, truncated, wrong size)."""


def is_image_file(path: Path) -> bool:
    """True for a visible file whose extension (any case) is a supported image format."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image as an upright ``uint8 H×W×3`` RGB array; raises :class:`BadImageError` if unusable."""
    with _open_upright(path, "image") as image:
        try:
            if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
                gray = _high_depth_to_uint8(image)
                return np.repeat(gray[:, :, None], 3, axis=2)
            if image.mode == "P":
                # Going through RGBA keeps Pillow from warning about palette transparency; alpha is then dropped.
                image = image.convert("RGBA")
            if image.mode != "RGB":  # convert() copies even an RGB image
                image = image.convert("RGB")
            return np.array(image, dtype=np.uint8)
        except Exception as error:
            raise _bad_file_error(path, "image", error) from error


def load_mask(path: str | Path, threshold: int = 127) -> np.ndarray:
    """Read a ground-truth mask as a ``bool H×W`` array: anomalous where the 8-bit value is > ``threshold``.

    The default 127 binarises 0/255 and soft masks at half range. Grey modes are taken as they are; colour
    masks use the brightest channel per pixel (so a pure red mark counts, which a luminance conversion would
    put at 76 and lose). Datasets that store class indices (VisA: 0/1) pass ``threshold=0``.
    """
    with _open_upright(path, "mask") as mask:
        try:
            if mask.mode in _SIXTEEN_BIT_MODES or mask.mode == "F":
                values = _high_depth_to_uint8(mask)
            elif mask.mode in ("1", "L"):
                values = np.asarray(mask.convert("L"))
            else:
                colour = mask.convert("RGBA") if mask.mode == "P" else mask
                values = np.asarray(colour.convert("RGB")).max(axis=2)
            return values > threshold
        except Exception as error:
            raise _bad_file_error(path, "mask", error) from error


def check_mask_size(image_path: str | Path, image_hw: tuple[int, int], mask_path: str | Path, mask_hw: tuple[int, int]) -> None:
    """Raise :class:`BadImageError` unless a mask has the height and width of its image."""
    if tuple(image_hw) != tuple(mask_hw):
        raise BadImageError(
            f"Mask {mask_path} is {mask_hw[1]}×{mask_hw[0]} but its image {image_path} is {image_hw[1]}×{image_hw[0]} "
            f"(width×height); re-save the mask at its image's size"
        )


def _open_upright(path: str | Path, kind: str) -> Image.Image:
    """Open and fully decode a file, with its EXIF orientation applied."""
    path = Path(path)
    if not path.is_file():
        raise BadImageError(f"Cannot read {kind} {path}: no such file; check the path")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise BadImageError(
            f"Cannot read {kind} {path}: it has more pixels than Pillow's safety limit ({error}); "
            f"if the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS before loading"
        ) from error
    except Exception as error:  # decoders of hostile files raise many types; all mean unusable
        raise _bad_file_error(path, kind, error) from error
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as error:
        image.close()
        raise _bad_file_error(path, kind, error) from error
    return image


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        low, high = np.nanmin(values), np.nanmax(values)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return np.rint(np.nan_to_num(scaled)).astype(np.uint8)
    return np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)


def _bad_file_error(path: str | Path, kind: str, error: BaseException) -> BadImageError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return BadImageError(f"Cannot read {kind} {path} ({type(error).__name__}: {reason}); {_FIX}")
