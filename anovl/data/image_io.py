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
* Masks are read by the rule of :func:`load_mask`: binary masks (zero and one other value) at any bit depth
  and mode (1-bit, 8-bit, 16-bit ``I;16``/``I``, 32-bit ``I`` and ``F`` float, palette, RGB); colour uses the
  brightest channel; with alpha (``LA``, ``RGBA``, palette transparency), transparent pixels are background,
  and a layer of black marks on transparency uses its alpha as the mask. Soft masks are cut at half range.
* Very large images: Pillow's decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``, about 179 M pixels
  before it refuses) is kept; the error message tells how to raise it for trusted files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from anovl.errors import AnovlError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

# Pillow modes holding more than 8 bits per pixel in a single integer channel; values are 0..65535.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# 8-bit-or-less grey modes whose RGB conversion repeats the grey value (alpha dropped); "L" gives that grey.
_GREY_MODES = frozenset({"1", "L", "LA"})

_FIX = "re-save or replace the file"

# Full ranges a mask's values may use (1-bit or float 0..1, 8-bit, 16-bit, 32-bit), smallest first.
_MASK_RANGES = (1.0, 255.0, 65535.0, 2.0**32 - 1, math.inf)
# A soft mask has few values between its extremes (anti-aliased edges); a photo has many.
MAX_MID_RANGE_FRACTION = 0.25


class BadImageError(AnovlError):
    """An image or mask file that cannot be used (missing, not an image, truncated, wrong size)."""


def has_image_extension(path: Path) -> bool:
    """True for a visible name whose extension (any case) is a supported image format (the file may not exist:
    a dangling link is then reported when it is read, not silently dropped)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def is_image_file(path: Path) -> bool:
    """True for a visible file whose extension (any case) is a supported image format."""
    return has_image_extension(path) and path.is_file()


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image as an upright ``uint8 H×W×3`` RGB array; raises :class:`BadImageError` if unusable."""
    with _open_upright(path, "image") as image:
        return _rgb_array(_converted(image, path), path)


def load_rgb_resized(
    path: str | Path, size_for: Callable[[int, int], tuple[int, int]]
) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`load_rgb` then :func:`~anovl.data.transforms.resize_image` to ``size_for(height, width)``, the same
    pixels, without the full-size array in between (a loader worker's two largest copies); returns the resized
    ``uint8 H×W×3`` array and the image's own (height, width). ``size_for`` may raise :class:`BadImageError`.

    A grey image is resized as one channel and then repeated: Pillow resizes each channel on its own with the
    same coefficients, so this equals resizing its RGB conversion, at a third of the work.
    """
    with _open_upright(path, "image") as image:
        converted = _converted(image, path)
        height, width = converted.height, converted.width
        out_height, out_width = size_for(height, width)
        try:
            resized = converted.resize((out_width, out_height), Image.Resampling.BILINEAR)
        except Exception as error:
            raise _bad_file_error(path, "image", error) from error
        return _rgb_array(resized, path), (height, width)


def _converted(image: Image.Image, path: str | Path) -> Image.Image:
    """The image by the module's conversion rules: ``L`` where every RGB channel would be the same grey (which
    resizes at a third of the cost), ``RGB`` otherwise."""
    if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
        # Scaling to the finite range would make every other pixel black (one inf) or fail (NaN).
        raise BadImageError(f"image {path} has non-finite pixel values (inf or NaN); {_FIX}")
    try:
        if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
            return Image.fromarray(_high_depth_to_uint8(image))
        if image.mode in _GREY_MODES:
            return image if image.mode == "L" else image.convert("L")
        if image.mode == "P":
            # Going through RGBA keeps Pillow from warning about palette transparency; alpha is then dropped.
            image = image.convert("RGBA")
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as error:
        raise _bad_file_error(path, "image", error) from error


def _rgb_array(image: Image.Image, path: str | Path) -> np.ndarray:
    """``uint8 H×W×3`` of an ``RGB`` or ``L`` image (grey repeated in the three channels: Pillow's conversion)."""
    try:
        array = np.array(image, dtype=np.uint8)
    except Exception as error:
        raise _bad_file_error(path, "image", error) from error
    return np.repeat(array[:, :, None], 3, axis=2) if array.ndim == 2 else array


def load_mask(path: str | Path, nonzero: bool = False) -> np.ndarray:
    """Read a ground-truth mask as a ``bool H×W`` array, whatever its bit depth and mode.

    The rule (module docstring, "Masks"): a mask holding only zero and one other value is anomalous where
    it is nonzero, at any depth (a 16-bit 0/255 mask, an 8-bit 0/1 mask); a soft mask (more values) is
    anomalous above half of its range, the range being the smallest of 1, 255, 65535 and 2³²−1 that holds
    its largest value; ``nonzero=True`` (masks storing class indices, VisA) makes every nonzero value
    anomalous. A file that does not look like a mask (negative or NaN values, or more than
    :data:`MAX_MID_RANGE_FRACTION` of its pixels in the middle half of the range, as in a photo) raises
    :class:`BadImageError`.
    """
    return np.asarray(load_mask_image(path, nonzero)) > 0


def load_mask_image(path: str | Path, nonzero: bool = False) -> Image.Image:
    """:func:`load_mask` as an ``L`` image of 0 (normal) and 255 (anomalous), ready for a Pillow resize.

    8-bit and 1-bit masks (MVTec's, VisA's) are judged from their histogram and cut with a lookup table, never
    leaving Pillow; other modes go through float64 values.
    """
    with _open_upright(path, "mask") as mask:
        what = f"Mask {path} (mode {mask.mode})"
        try:
            if mask.mode in ("1", "L"):
                return _binarise_8bit(mask if mask.mode == "L" else mask.convert("L"), nonzero, what)
            values = _mask_values(mask)
        except BadImageError:
            raise
        except Exception as error:
            raise _bad_file_error(path, "mask", error) from error
    if np.isnan(values).any() or values.min() < 0:
        raise BadImageError(f"{what} holds negative or NaN values, which no mask rule reads; {_FIX}")

    def count_between(low: float, high: float) -> int:
        return int(np.count_nonzero((values > low) & (values < high)))

    cut = _mask_cut(float(values.max()), count_between, values.size, nonzero, what)
    return Image.fromarray((values > cut).astype(np.uint8) * 255)


def check_mask_size(
    image_path: str | Path, image_hw: tuple[int, int], mask_path: str | Path, mask_hw: tuple[int, int]
) -> None:
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
        check_pixel_budget(path, kind, image.height, image.width, "decoded")
    except BadImageError:
        image.close()
        raise
    except Exception as error:
        image.close()
        raise _bad_file_error(path, kind, error) from error
    return image


def check_pixel_budget(path: str | Path, kind: str, height: int, width: int, stage: str) -> None:
    """Pillow's decompression-bomb limit, applied to a decoded or resized size too, not only the file header.

    Pillow refuses files above twice ``PIL.Image.MAX_IMAGE_PIXELS``; the same bound holds here for what a file
    becomes, so a small file cannot grow into a huge array (``None`` switches the check off, as in Pillow).
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > 2 * limit:
        raise BadImageError(
            f"Cannot read {kind} {path}: {stage} it would be {width}×{height} pixels, more than Pillow's safety "
            f"limit ({2 * limit}); if the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS before loading"
        )


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        low, high = np.nanmin(values), np.nanmax(values)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return np.rint(np.nan_to_num(scaled)).astype(np.uint8)
    return np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)


def _mask_values(mask: Image.Image) -> np.ndarray:
    """The values of a mask as float64 ``H×W``: grey as stored, colour as the brightest channel, alpha applied."""
    if mask.mode == "1":
        return np.asarray(mask, dtype=np.float64)
    if mask.mode in _SIXTEEN_BIT_MODES or mask.mode in ("F", "L"):
        return np.asarray(mask).astype(np.float64)
    if mask.mode == "P":
        mask = mask.convert("RGBA")
    has_alpha = "A" in mask.getbands() or mask.mode in ("RGBa", "La")
    if not has_alpha:
        return np.asarray(mask.convert("RGB")).max(axis=2).astype(np.float64)
    rgba = np.asarray(mask.convert("RGBA")).astype(np.float64)
    alpha = rgba[..., 3]
    colour = np.where(alpha > 0, rgba[..., :3].max(axis=2), 0.0)
    if not colour.any() and alpha.min() < alpha.max():
        return alpha  # marks drawn in black on a transparent layer: the alpha channel is the mask
    return colour


def _binarise_8bit(mask: Image.Image, nonzero: bool, what: str) -> Image.Image:
    """The rule on an ``L`` image, from its histogram; a 0/255 mask comes back as it is."""
    # Adding 1 wraps 255 to 0, so only the values 1..254 stay above 1: cheaper than the histogram, which a binary
    # 0/255 mask (MVTec's, most masks) does not need, as the cut (below 255) changes nothing there.
    if not (np.asarray(mask) + np.uint8(1) > 1).any():
        return mask
    counts = np.asarray(mask.histogram())
    levels = np.arange(256)

    def count_between(low: float, high: float) -> int:
        return int(counts[(levels > low) & (levels < high)].sum())

    cut = _mask_cut(float(levels[counts > 0].max()), count_between, mask.width * mask.height, nonzero, what)
    return mask.point([255 if level > cut else 0 for level in levels])


def _mask_cut(high: float, count_between: Callable[[float, float], int], size: int, nonzero: bool, what: str) -> float:
    """The mask rule: anomalous pixels are those above the returned value. ``high`` is the largest value (none
    negative); ``count_between(low, high)`` counts the pixels strictly between two values."""
    if high == 0 or count_between(0, high) == 0:  # empty, or zero and one other value: binary at any depth
        return 0.0
    scale = next(full for full in _MASK_RANGES if high <= full)
    mid_range = count_between(0.25 * scale, 0.75 * scale) / size
    if mid_range > MAX_MID_RANGE_FRACTION:
        raise BadImageError(
            f"{what} does not look like a mask: {100 * mid_range:.0f}% of its pixels are mid-range values "
            f"(0..{scale:g}); is it an image saved as a mask? {_FIX}"
        )
    return 0.0 if nonzero else scale / 2


def _bad_file_error(path: str | Path, kind: str, error: BaseException) -> BadImageError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return BadImageError(f"Cannot read {kind} {path} ({type(error).__name__}: {reason}); {_FIX}")
