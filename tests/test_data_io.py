"""Image/mask loading, docs/METHOD.md §1 preprocessing, tiling and corruptions (anovl.data low-level parts)."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from anovl.data import (
    CLIP_MEAN,
    CLIP_STD,
    BadImageError,
    CorruptionConfig,
    Corruptor,
    check_mask_size,
    load_mask,
    load_rgb,
    normalize,
    resize_image,
    resize_mask,
    resolve_corruption,
    shorter_side_size,
    split_tiles,
    stitch_tiles,
    tile_offsets,
)
from anovl.data.image_io import load_mask_image, load_rgb_resized
from anovl.data.transforms import resize_mask_image
from anovl.errors import AnovlError


def random_rgb(height=24, width=36, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(image, path, **options):
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    image.save(path, **options)
    return path


def assert_one_line_naming(error, path):
    message = str(error.value)
    assert str(path) in message
    assert "\n" not in message


# ---------------------------------------------------------------- load_rgb


def test_rgb_png_is_returned_unchanged(tmp_path):
    rgb = random_rgb()
    loaded = load_rgb(save(rgb, tmp_path / "a.png"))
    assert loaded.dtype == np.uint8 and loaded.flags.writeable
    np.testing.assert_array_equal(loaded, rgb)


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    gray = random_rgb()[..., 0]
    loaded = load_rgb(save(gray, tmp_path / "g.png"))
    np.testing.assert_array_equal(loaded, np.repeat(gray[..., None], 3, axis=2))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_dropped_keeping_the_colour_underneath(tmp_path, mode):
    rgb = random_rgb()
    rgba = np.concatenate([rgb, np.zeros_like(rgb[..., :1])], axis=2)  # fully transparent everywhere
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
        expected = np.repeat(np.asarray(image)[..., :1], 3, axis=2)
    else:
        expected = rgb
    np.testing.assert_array_equal(load_rgb(save(image, tmp_path / "t.png")), expected)


def test_palette_image_with_and_without_transparency(tmp_path):
    palette_image = Image.fromarray(random_rgb()).quantize(16)
    expected = np.asarray(palette_image.convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(load_rgb(save(palette_image, tmp_path / "p.png")), expected)
        np.testing.assert_array_equal(load_rgb(save(palette_image, tmp_path / "pt.png", transparency=0)), expected)
        np.testing.assert_array_equal(load_rgb(save(palette_image, tmp_path / "p.gif")), expected)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 257, 1000, 32896, 65535]], dtype=np.uint16)
    expected = np.array([[0, 0, 1, 1, 4, 128, 255]], dtype=np.uint8)  # round(v / 257)
    loaded = load_rgb(save(values, tmp_path / "d.png"))
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    np.testing.assert_array_equal(loaded, np.repeat(expected[..., None], 3, axis=2))
    big_endian = load_rgb(save(values.astype(">u2"), tmp_path / "d.tif"))
    np.testing.assert_array_equal(big_endian[..., 0], expected)


def test_float_image_is_min_max_scaled(tmp_path):
    values = np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)
    loaded = load_rgb(save(Image.fromarray(values, "F"), tmp_path / "f.tif"))
    np.testing.assert_array_equal(loaded[0, :, 0], [0, 128, 255])


@pytest.mark.parametrize("mode", ["L", "1", "LA", "I;16", "I", "F", "RGB", "RGBA", "P", "CMYK"])
def test_the_resized_load_equals_pillow_resizing_the_rgb_conversion(tmp_path, mode):
    """Grey images are resized as one channel (a third of the work): the same pixels as resizing the RGB image
    that load_rgb gives, and for 8-bit modes as the reference's ``convert("RGB").resize(...)``."""
    rgb = random_rgb(61, 97, seed=3)
    image = Image.fromarray(rgb).convert("L" if mode in ("I;16", "I", "F") else "RGB")
    if mode in ("I;16", "I", "F"):
        scale = {"I;16": 257, "I": 257, "F": 1 / 255}[mode]
        values = np.asarray(image).astype(np.float64) * scale
        image = (
            Image.fromarray(values.astype(np.float32), "F")
            if mode == "F"
            else Image.fromarray(values.astype(np.uint16))
        )
    elif mode == "P":
        image = image.quantize(32)
    else:
        image = image.convert(mode)
    path = save(image, tmp_path / ("x.tif" if mode in ("F", "CMYK", "I") else "x.png"))
    resized, source_hw = load_rgb_resized(path, lambda height, width: (23, 37))
    assert source_hw == (61, 97) and resized.shape == (23, 37, 3) and resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, resize_image(load_rgb(path), (23, 37)))
    if mode not in ("I;16", "I", "F"):
        reference = Image.open(path).convert("RGB").resize((37, 23), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(resized, np.asarray(reference))


def test_a_float_image_with_inf_is_refused_by_the_resized_load_too(tmp_path):
    values = np.array([[0.0, 1.0, np.inf]], dtype=np.float32)
    path = save(Image.fromarray(values, "F"), tmp_path / "f.tif")
    for load in (load_rgb, lambda file: load_rgb_resized(file, lambda height, width: (2, 2))):
        with pytest.raises(BadImageError, match="non-finite") as error:
            load(path)
        assert_one_line_naming(error, path)


def test_cmyk_jpeg_comes_back_as_rgb(tmp_path):
    rgb = np.zeros((32, 64, 3), dtype=np.uint8)
    rgb[:, :32] = (200, 40, 30)
    rgb[:, 32:] = (20, 60, 210)
    path = save(Image.fromarray(rgb).convert("CMYK"), tmp_path / "c.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"
    loaded = load_rgb(path)
    assert loaded.shape == rgb.shape
    # Away from the colour edge, where JPEG's chroma blocks blur the two halves together.
    np.testing.assert_allclose(loaded[:, 2:28].astype(int), rgb[:, 2:28].astype(int), atol=8)
    np.testing.assert_allclose(loaded[:, 36:62].astype(int), rgb[:, 36:62].astype(int), atol=8)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the stored left edge becomes the top
    loaded = load_rgb(save(stored, tmp_path / "o.png", exif=exif))
    assert loaded.shape == (40, 20, 3)
    assert (loaded[:20, :, 0] == 255).all() and (loaded[20:, :, 0] == 0).all()


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(BadImageError, match="no such file") as error:
        load_rgb(tmp_path / "nope.png")
    assert_one_line_naming(error, tmp_path / "nope.png")
    with pytest.raises(BadImageError):
        load_rgb(tmp_path)  # a directory


def test_non_image_file_names_the_path(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image\nat all")
    with pytest.raises(BadImageError) as error:
        load_rgb(path)
    assert_one_line_naming(error, path)


@pytest.mark.parametrize("suffix,options", [(".png", {}), (".jpg", {"quality": 90}), (".bmp", {}), (".tif", {})])
def test_truncated_file_is_a_bad_image(tmp_path, suffix, options):
    full = save(random_rgb(64, 64), tmp_path / f"full{suffix}", **options).read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(BadImageError) as error:
        load_rgb(path)
    assert_one_line_naming(error, path)


def test_decompression_bomb_limit_is_explained(tmp_path, monkeypatch):
    path = save(random_rgb(30, 30), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadImageError, match="MAX_IMAGE_PIXELS") as error:
        load_rgb(path)
    assert_one_line_naming(error, path)


# ---------------------------------------------------------------- load_mask


def test_mask_binarises_soft_values_at_half_range(tmp_path):
    values = np.zeros((4, 7), dtype=np.uint8)  # mostly background, like a soft mask's anti-aliased edge
    values[0] = [0, 1, 100, 127, 128, 200, 255]
    expected = values > 127
    mask = load_mask(save(values, tmp_path / "m.png"))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)


def test_class_index_masks(tmp_path):
    values = np.array([[0, 1, 0, 1]], dtype=np.uint8)  # VisA stores 0/1: binary, so nonzero at any depth
    path = save(values, tmp_path / "v.png")
    np.testing.assert_array_equal(load_mask(path), values.astype(bool))
    classes = np.zeros((4, 4), dtype=np.uint8)
    classes[0, :3] = [1, 2, 3]  # several classes: soft under the default rule, anomalous with nonzero=True
    path = save(classes, tmp_path / "c.png")
    np.testing.assert_array_equal(load_mask(path, nonzero=True), classes > 0)
    assert not load_mask(path).any()


def test_mask_modes(tmp_path):
    expected = np.array([[False, True, True]])
    bilevel = Image.fromarray(expected).convert("1")
    np.testing.assert_array_equal(load_mask(save(bilevel, tmp_path / "b.png")), expected)
    red = np.zeros((1, 3, 3), dtype=np.uint8)
    red[0, 1:] = (255, 0, 0)  # luminance 76: a grey conversion would lose it
    np.testing.assert_array_equal(load_mask(save(red, tmp_path / "r.png")), expected)
    sixteen = np.zeros((4, 3), dtype=np.uint16)  # a soft edge: few mid-range pixels
    sixteen[0] = [0, 40000, 65535]
    np.testing.assert_array_equal(load_mask(save(sixteen, tmp_path / "s.png")), sixteen > 32767)
    palette = Image.fromarray(expected.astype(np.uint8) * 255).convert("P")
    np.testing.assert_array_equal(load_mask(save(palette, tmp_path / "p.png")), expected)


def naive_mask_rule(values: np.ndarray, nonzero: bool) -> np.ndarray | None:
    """The rule of load_mask's docstring for 8-bit values, written out; None where it refuses the file."""
    if len(set(np.unique(values).tolist()) - {0}) <= 1:
        return values > 0
    scale = 1 if values.max() <= 1 else 255
    if np.mean((values > scale / 4) & (values < 3 * scale / 4)) > 0.25:
        return None
    return values > 0 if nonzero else values > scale / 2


def test_eight_bit_masks_follow_the_rule_as_wider_masks_do(tmp_path):
    # 8-bit masks are judged from their histogram and never leave Pillow; the same values stored as 32-bit
    # integers go through float64 arrays. Both must give the written-out rule, 0/255 images, the same errors.
    rng = np.random.default_rng(3)
    for trial in range(60):
        values = np.zeros((int(rng.integers(3, 30)), int(rng.integers(3, 30))), dtype=np.uint8)
        kind = trial % 5
        if kind == 0:  # binary: the extreme foreground values, then random ones
            values[rng.random(values.shape) < 0.3] = (1, 254, 255)[trial // 5] if trial < 15 else rng.integers(1, 256)
        elif kind == 1:  # a soft edge around a 255 region
            values[rng.random(values.shape) < 0.3] = 255
            values[0, : values.shape[1] // 2] = rng.integers(1, 255, values.shape[1] // 2)
        elif kind == 2:  # class indices
            values[:] = rng.integers(0, 4, values.shape) * (rng.random(values.shape) < 0.2)
        elif kind == 3:  # a photo saved as a mask
            values[:] = rng.integers(0, 256, values.shape)
        # kind 4: empty
        expected = {nonzero: naive_mask_rule(values, nonzero) for nonzero in (False, True)}
        for name, image in (("L.png", Image.fromarray(values)), ("I.tif", Image.fromarray(values.astype(np.int32)))):
            path = save(image, tmp_path / f"{trial}{name}")
            for nonzero, truth in expected.items():
                if truth is None:
                    with pytest.raises(BadImageError, match="does not look like a mask"):
                        load_mask_image(path, nonzero)
                    continue
                decoded = load_mask_image(path, nonzero)
                assert decoded.mode == "L", name
                np.testing.assert_array_equal(np.asarray(decoded), truth * np.uint8(255), err_msg=f"{trial} {name}")


def test_mask_size_check_names_both_files():
    check_mask_size("img.png", (10, 20), "mask.png", (10, 20))
    with pytest.raises(BadImageError) as error:
        check_mask_size("img.png", (10, 20), "mask.png", (11, 20))
    message = str(error.value)
    assert "img.png" in message and "mask.png" in message and "20×10" in message and "20×11" in message


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("size", [16, 24, 240])
def test_preprocessing_matches_torchvision(size):
    rgb = random_rgb(37, 53)
    reference = T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )(Image.fromarray(rgb))
    ours = normalize(resize_image(rgb, (size, size)))
    assert ours.dtype == torch.float32 and ours.shape == (3, size, size)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("size", [16, 240])
def test_mask_resize_matches_the_reference(size):
    mask = np.zeros((37, 53), dtype=bool)
    mask[5:20, 7:31] = True
    mask[30, 40] = True
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    reference = T.Compose([T.Resize((size, size)), T.ToTensor()])(image)[0] > 0.5
    np.testing.assert_array_equal(resize_mask(mask, (size, size)), reference.numpy())


@pytest.mark.parametrize("out_hw", [(48, 40), (16, 16), (300, 260)])
def test_mask_resize_of_the_anomalous_rows_equals_one_pillow_resize(out_hw):
    # Only the rows between the first and the last anomalous one take Pillow's row pass: bit for bit one resize.
    rng = np.random.default_rng(sum(out_hw))
    for trial in range(12):
        mask = np.zeros((int(rng.integers(20, 200)), int(rng.integers(20, 200))), dtype=bool)
        for _ in range(trial % 4):  # none to three blobs, anywhere (edges included)
            top, left = rng.integers(0, mask.shape[0]), rng.integers(0, mask.shape[1])
            mask[top : top + int(rng.integers(1, 30)), left : left + int(rng.integers(1, 30))] = True
        image = Image.fromarray(mask.astype(np.uint8) * 255)
        height, width = out_hw
        whole = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR)) > 127
        resized = resize_mask_image(image, out_hw)
        assert resized.dtype == bool and resized.shape == out_hw
        np.testing.assert_array_equal(resized, whole, err_msg=f"trial {trial}")


@pytest.mark.parametrize("height,width", [(1000, 1500), (1168, 1284), (1500, 1000), (64, 64)])
def test_shorter_side_size_matches_torchvision(height, width):
    resized = T.Resize(240)(Image.new("RGB", (width, height)))
    assert shorter_side_size(height, width, 240) == (resized.height, resized.width)


def test_tile_offsets():
    assert tile_offsets(240, 240) == [0]
    assert tile_offsets(360, 240) == [0, 120]  # the reference: left [0, S), right [W - S, W)
    assert tile_offsets(480, 240) == [0, 240]
    assert tile_offsets(600, 240) == [0, 180, 360]
    with pytest.raises(ValueError):
        tile_offsets(100, 240)


def test_split_and_stitch_by_hand():
    images = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)  # two 2×3 images
    tiles = split_tiles(images)
    assert tiles.shape == (4, 1, 2, 2)
    assert torch.equal(tiles[0], images[0, :, :, 0:2]) and torch.equal(tiles[1], images[0, :, :, 1:3])
    assert torch.equal(tiles[2], images[1, :, :, 0:2]) and torch.equal(tiles[3], images[1, :, :, 1:3])
    tile_maps = torch.tensor([1.0, 3.0, 10.0, 20.0]).view(4, 1, 1).expand(4, 2, 2)
    stitched = stitch_tiles(tile_maps, 2, 3)
    expected = torch.tensor([[1.0, 2.0, 3.0], [10.0, 15.0, 20.0]]).unsqueeze(1).expand(2, 2, 3)  # overlap averaged
    assert torch.equal(stitched, expected)


@pytest.mark.parametrize("height,width", [(4, 7), (7, 4), (4, 4), (4, 13)])
def test_split_then_stitch_restores_the_image(height, width):
    maps = torch.rand(3, height, width)
    tiles = split_tiles(maps.unsqueeze(1))[:, 0]
    assert tiles.shape[-2:] == (min(height, width),) * 2
    torch.testing.assert_close(stitch_tiles(tiles, height, width), maps)


# ---------------------------------------------------------------- corruptions


def test_corruption_is_reproducible_per_key_and_order_free():
    images = {f"cat/test/x/{index}.png": random_rgb(32, 32, seed=index) for index in range(6)}
    corrupt = Corruptor(resolve_corruption("default"), seed=3)
    forward = {key: corrupt(image, key) for key, image in images.items()}
    backward = {key: Corruptor(resolve_corruption("default"), seed=3)(images[key], key) for key in reversed(images)}
    for key in images:
        np.testing.assert_array_equal(forward[key], backward[key])
        assert forward[key].dtype == np.uint8 and forward[key].shape == (32, 32, 3)
    other_seed = Corruptor(resolve_corruption("default"), seed=4)
    assert any(not np.array_equal(forward[key], other_seed(image, key)) for key, image in images.items())


def test_corruption_probabilities():
    image = random_rgb(32, 32)
    never = CorruptionConfig(noise_p=0, blur_p=0, jpeg_p=0, brightness_contrast_p=0)
    np.testing.assert_array_equal(Corruptor(never)(image, "k"), image)
    always = CorruptionConfig(noise_p=1, blur_p=1, jpeg_p=1, brightness_contrast_p=1)
    assert not np.array_equal(Corruptor(always)(image, "k"), image)


def test_resolve_corruption():
    assert resolve_corruption(None) is None
    assert resolve_corruption("default") == CorruptionConfig()
    config = resolve_corruption({"blur_p": 1.0, "jpeg_quality_range": [10, 20]})
    assert config.blur_p == 1.0 and config.jpeg_quality_range == (10, 20)
    with pytest.raises(AnovlError, match="preset"):
        resolve_corruption("heavy")
    with pytest.raises(AnovlError, match="blurr_p"):
        resolve_corruption({"blurr_p": 1.0})
    with pytest.raises(AnovlError, match="probability"):
        resolve_corruption({"noise_p": 2})
    with pytest.raises(AnovlError, match="jpeg_quality_range"):
        CorruptionConfig(jpeg_quality_range=(80, 20))


# ---------------------------------------------------------------- fuzz


def _fuzz_files(rng, directory, count):
    """Random bytes, truncated and bit-flipped real files, and valid images in odd modes."""
    formats = [("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"), ("TIFF", ".tif"), ("GIF", ".gif")]
    modes = ["RGB", "L", "RGBA", "LA", "P", "1", "I;16", "I", "F", "CMYK"]
    for index in range(count):
        kind = index % 4
        fmt, suffix = formats[rng.integers(len(formats))]
        if kind == 0:
            data = rng.bytes(int(rng.integers(0, 600)))
        else:
            mode = modes[rng.integers(len(modes))]
            size = tuple(int(v) for v in rng.integers(1, 40, 2))
            image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
            buffer = io.BytesIO()
            try:
                image.save(buffer, fmt)
            except (OSError, ValueError, KeyError):  # this format cannot store this mode: write PNG
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, "PNG")
            data = buffer.getvalue()
            if kind == 2:
                data = data[: int(rng.integers(0, len(data)))]
            elif kind == 3 and data:
                flipped = bytearray(data)
                for position in rng.integers(0, len(flipped), 4):
                    flipped[position] ^= 0xFF
                data = bytes(flipped)
        path = directory / f"fuzz{index:03d}{suffix}"
        path.write_bytes(data)
        yield path


def test_fuzz_loading_raises_only_bad_image_error(tmp_path):
    rng = np.random.default_rng(1234)
    outcomes = {"ok": 0, "bad": 0}
    for path in _fuzz_files(rng, tmp_path, 400):
        for loader, check in (
            (load_rgb, lambda a: a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8),
            (load_mask, lambda a: a.ndim == 2 and a.dtype == bool),
        ):
            try:
                assert check(loader(path))
                outcomes["ok"] += 1
            except BadImageError as error:
                assert str(path) in str(error) and "\n" not in str(error)
                outcomes["bad"] += 1
    assert outcomes["ok"] > 50 and outcomes["bad"] > 50  # both paths were exercised
