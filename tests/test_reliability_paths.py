"""Untrusted names and paths: safe path components, discovery inside the root, split files that lie."""

import csv
import io
import os
import shutil
import string
import urllib.parse
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anovl.data import (
    FolderDataModule,
    MVTecDataModule,
    VisADataModule,
    generate_mvtec_like,
    generate_visa_like,
    safe_component,
)
from anovl.io.safe_names import MAX_COMPONENT_BYTES
from anovl.errors import AnovlError

SIZE = 32


def restore(component: str) -> str:
    """The inverse the module docstring promises (an independent decoder: urllib's)."""
    return urllib.parse.unquote(component, errors="surrogatepass")


# ---------------------------------------------------------------- safe_component


@pytest.mark.parametrize("name", ["bottle", "metal_nut", "pcb1", "Schraube ä", "瓶子", "toothbrush v2", "a.b", "x-ray"])
def test_ordinary_names_are_unchanged(name):
    assert safe_component(name) == name


@pytest.mark.parametrize(
    "name, expected",
    [
        ("..", "%2E%2E"),
        (".", "%2E"),
        (".hidden", "%2Ehidden"),
        ("a/b", "a%2Fb"),
        ("/etc", "%2Fetc"),
        ("a\\b", "a%5Cb"),
        ("100%", "100%25"),
        ("nul\x00", "nul%00"),
        ("tab\t", "tab%09"),
        ("CON", "%43ON"),
        ("con.txt", "%63on.txt"),
        ("-rf", "%2Drf"),
        ("trail.", "trail%2E"),
        ("trail ", "trail%20"),
        ("bad\udcff", "bad%ED%B3%BF"),
        ("rtl\u202etxt", "rtl%E2%80%AEtxt"),
    ],
)
def test_dangerous_names_are_escaped(name, expected):
    assert safe_component(name) == expected
    assert restore(expected) == name


def test_bytes_and_empty_names():
    assert safe_component(b"caf\xc3\xa9") == "café"
    assert safe_component(b"bad\xff") == safe_component(os.fsdecode(b"bad\xff"))
    with pytest.raises(AnovlError, match="empty name"):
        safe_component("")


def random_name(rng: np.random.Generator) -> str:
    alphabet = list(string.ascii_letters + string.digits + '._- %/\\:*?"<>|~') + [
        "\x00",
        "\n",
        "\x7f",
        "\u202e",
        "\u200b",
        "é",
        "漢",
        "\udcff",
        "\ud800",
        "\U0001f600",
        "..",
        "CON",
        "%2F",
    ]
    length = int(rng.integers(1, 12)) if rng.random() < 0.97 else int(rng.integers(100, 400))
    return "".join(alphabet[int(index)] for index in rng.integers(0, len(alphabet), length))


def test_fuzzed_names_are_safe_readable_and_injective(tmp_path):
    rng = np.random.default_rng(0)
    names = {random_name(rng) for _ in range(20000)} | {"a" * 300, "a" * 301}
    components: dict[str, str] = {}
    for name in names:
        component = safe_component(name)
        assert component not in components, (name, components.get(component))  # injective
        components[component] = name
        encoded = component.encode("utf-8")  # valid UTF-8: no surrogate survives
        assert 0 < len(encoded) <= MAX_COMPONENT_BYTES
        assert "/" not in component and "\\" not in component and "\x00" not in component
        assert component not in (".", "..") and not component.startswith((".", "-"))
        assert all(char.isprintable() for char in component)
        if "%~" not in component:  # short names decode back; long ones end in a hash
            assert restore(component) == name
    # Each component really is one entry inside the folder.
    for component in list(components)[:2000]:
        path = tmp_path / component
        path.write_text("x")
        assert path.resolve().parent == tmp_path.resolve()
    assert len(list(tmp_path.iterdir())) == min(2000, len(components))


# ---------------------------------------------------------------- symlinks and discovery


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    return generate_mvtec_like(
        tmp_path_factory.mktemp("mvtec"), categories=["widget"], n_good=2, n_defect=1, image_size=SIZE
    )


@pytest.fixture
def mvtec_copy(mvtec_root, tmp_path):
    return Path(shutil.copytree(mvtec_root, tmp_path / "mvtec"))


def test_a_mask_folder_linked_to_the_filesystem_root_is_refused_at_once(mvtec_copy):
    defect = mvtec_copy / "widget" / "ground_truth" / "scratch"
    shutil.rmtree(defect)
    defect.symlink_to("/")
    with pytest.raises(AnovlError) as error:
        MVTecDataModule(mvtec_copy).samples
    message = str(error.value)
    assert str(defect) in message and "outside the dataset root" in message and "allow_outside_root" in message


@pytest.mark.parametrize("where", ["category", "test folder", "image", "mask"])
def test_links_leading_outside_are_refused_and_allowed_on_request(mvtec_copy, tmp_path, where):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    widget = mvtec_copy / "widget"
    moved = {
        "category": widget,
        "test folder": widget / "test" / "scratch",
        "image": next((widget / "test" / "good").iterdir()),
        "mask": next((widget / "ground_truth" / "scratch").iterdir()),
    }[where]
    target = outside / moved.name
    shutil.move(moved, target)
    moved.symlink_to(target)
    with pytest.raises(AnovlError, match="outside the dataset root"):
        MVTecDataModule(mvtec_copy).samples
    allowed = MVTecDataModule(mvtec_copy, allow_outside_root=True)
    assert len(allowed.samples) == 2 + 4


def test_links_inside_the_root_are_followed_and_loops_end(mvtec_copy):
    widget = mvtec_copy / "widget"
    masks = widget / "ground_truth" / "scratch"
    shutil.move(masks, widget / "scratch_masks")
    masks.symlink_to(widget / "scratch_masks")
    (widget / "scratch_masks" / "loop").symlink_to(widget / "scratch_masks")  # a cycle inside the root
    samples = MVTecDataModule(mvtec_copy).samples
    assert sum(sample.mask_path is not None for sample in samples) == 4


def test_one_image_reached_twice_is_refused(mvtec_copy):
    good = mvtec_copy / "widget" / "test" / "good"
    first = sorted(good.iterdir())[0]
    (good / "alias.png").symlink_to(first)
    with pytest.raises(AnovlError, match="listed more than once"):
        MVTecDataModule(mvtec_copy).samples


def test_images_outside_the_mvtec_layout_are_named_in_a_warning(mvtec_copy):
    test_dir = mvtec_copy / "widget" / "test"
    shutil.copy(next((test_dir / "good").iterdir()), test_dir / "loose.png")
    (test_dir / "scratch" / "deeper").mkdir()
    shutil.copy(next((test_dir / "scratch").glob("*.png")), test_dir / "scratch" / "deeper" / "x.png")
    with pytest.warns(UserWarning, match="2 image files are not part of the layout") as caught:
        samples = MVTecDataModule(mvtec_copy).samples
    assert "loose.png" in str(caught[0].message) and len(samples) == 6


# ---------------------------------------------------------------- VisA split files


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory):
    return generate_visa_like(
        tmp_path_factory.mktemp("visa"), categories={"macaroni1": "widget"}, n_good=2, n_defect=1, image_size=(SIZE, 48)
    )


@pytest.fixture
def visa_copy(visa_root, tmp_path):
    return Path(shutil.copytree(visa_root, tmp_path / "visa"))


def split_rows(root):
    return list(csv.reader((root / "split_csv" / "1cls.csv").open(newline="", encoding="utf-8")))


def write_split(root, rows, encoding="utf-8"):
    # NUL written as it is, as Python 3.11+'s csv writer does; 3.10's refuses it (there NUL means "no escapechar").
    text = io.StringIO(newline="")
    csv.writer(text).writerows([[field.replace("\x00", "\uffff") for field in row] for row in rows])
    with (root / "split_csv" / "1cls.csv").open("w", newline="", encoding=encoding) as handle:
        handle.write(text.getvalue().replace("\uffff", "\x00"))


def first_test_row(rows, label):
    return next(index for index, row in enumerate(rows) if row[1] == "test" and row[2] == label)


@pytest.mark.parametrize("column", [3, 4])
@pytest.mark.parametrize("entry", ["/etc/hostname", "../outside.png", "macaroni1/../../outside.png"])
def test_split_file_paths_leaving_the_root_are_refused(visa_copy, tmp_path, column, entry):
    outside = tmp_path / "outside.png"
    Image.new("L", (48, SIZE)).save(outside)
    rows = split_rows(visa_copy)
    index = first_test_row(rows, "anomaly")
    rows[index][column] = entry
    write_split(visa_copy, rows)
    with pytest.raises(AnovlError) as error:
        VisADataModule(visa_copy).samples
    message = str(error.value)
    assert f"line {index + 1}" in message and "allow_outside_root" in message
    VisADataModule(visa_copy, allow_outside_root=True).samples  # listed once the user allows it


def test_split_file_path_through_an_outside_link_is_refused(visa_copy, tmp_path):
    (visa_copy / "escape").symlink_to(tmp_path)
    rows = split_rows(visa_copy)
    rows[first_test_row(rows, "normal")][3] = "escape/x.png"
    write_split(visa_copy, rows)
    with pytest.raises(AnovlError, match="outside the dataset root"):
        VisADataModule(visa_copy).samples


def test_latin1_split_file_is_one_clear_error(visa_copy):
    rows = split_rows(visa_copy)
    rows[first_test_row(rows, "normal")][3] = "macaroni1/Data/Images/Normal/café.JPG"
    write_split(visa_copy, rows, encoding="latin-1")
    with pytest.raises(AnovlError) as error:
        VisADataModule(visa_copy).samples
    assert "not UTF-8" in str(error.value) and "1cls.csv" in str(error.value) and "0xe9" in str(error.value)


def test_huge_field_and_nul_path_are_clear_errors(visa_copy):
    rows = split_rows(visa_copy)
    rows[first_test_row(rows, "normal")][3] = "x" * 200_000
    write_split(visa_copy, rows)
    with pytest.raises(AnovlError, match="not a readable CSV file .*field larger than field limit"):
        VisADataModule(visa_copy).samples
    rows[first_test_row(rows, "normal")][3] = "a\x00b.png"
    write_split(visa_copy, rows)
    with pytest.raises(AnovlError, match="NUL"):
        VisADataModule(visa_copy).samples


def test_repeated_rows_are_dropped_with_a_warning_and_conflicting_ones_refused(visa_copy):
    rows = split_rows(visa_copy)
    count = len(VisADataModule(visa_copy).samples)
    index = first_test_row(rows, "anomaly")
    write_split(visa_copy, rows + [rows[index], rows[index]])
    with pytest.warns(
        UserWarning,
        match=f"2 test rows repeat an earlier row and are dropped \\(lines {len(rows) + 1}, {len(rows) + 2}\\)",
    ):
        assert len(VisADataModule(visa_copy).samples) == count
    conflicting = [*rows[index][:2], "normal", rows[index][3], ""]
    write_split(visa_copy, rows + [conflicting])
    with pytest.raises(AnovlError, match=f"lines {index + 1} and {len(rows) + 1}"):
        VisADataModule(visa_copy).samples


def test_fuzzed_split_files_list_or_fail_cleanly(visa_copy):
    # Random rows (shuffled, duplicated, path-mangled, label-mangled): never a traceback, never a path outside.
    rng = np.random.default_rng(0)
    base = split_rows(visa_copy)
    manglers = [
        lambda s: s,
        lambda s: "/" + s,
        lambda s: "../" + s,
        lambda s: s + "\x00",
        lambda s: "",
        lambda s: s.replace("/", "\\"),
        lambda s: "a" * 5000,
        lambda s: "./" + s,
        lambda s: s.upper(),
    ]
    root = visa_copy.resolve()
    for trial in range(150):
        rows = [base[0]] + [list(base[int(i)]) for i in rng.integers(1, len(base), int(rng.integers(1, 12)))]
        for row in rows[1:]:
            if rng.random() < 0.3:
                column = int(rng.integers(0, 5))
                row[column] = manglers[int(rng.integers(len(manglers)))](row[column])
        write_split(visa_copy, rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                samples = VisADataModule(visa_copy).samples
            except AnovlError:
                continue
        for sample in samples:
            for path in (sample.image_path, sample.mask_path):
                assert path is None or path.resolve().is_relative_to(root)
        assert len({sample.image_path.resolve() for sample in samples}) == len(samples)


# ---------------------------------------------------------------- anomalib's folder layout


def write_images(folder, names, size=(30, 20), mask=False):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if mask:
            values = np.zeros(size[::-1], dtype=np.uint8)
            values[: size[1] // 2] = 255
            Image.fromarray(values).save(folder / name)
        else:
            Image.new("RGB", size, (120, 80, 40)).save(folder / name)


def test_anomalib_folder_layout_with_per_defect_masks_and_repeated_names(tmp_path):
    root = tmp_path / "screws"
    write_images(root / "good", ["000.png", "001.png"])
    write_images(root / "crack", ["000.png", "001.png"])
    write_images(root / "scratch", ["000.png"])
    write_images(root / "ground_truth" / "crack", ["000_mask.png", "001_mask.png"], mask=True)
    write_images(root / "ground_truth" / "scratch", ["000_mask.png"], mask=True)
    datamodule = FolderDataModule(root, image_size=SIZE)
    samples = datamodule.samples
    assert [(s.key, s.label, s.mask_path.relative_to(root).as_posix() if s.mask_path else None) for s in samples] == [
        ("crack/000.png", 1, "ground_truth/crack/000_mask.png"),
        ("crack/001.png", 1, "ground_truth/crack/001_mask.png"),
        ("good/000.png", 0, None),
        ("good/001.png", 0, None),
        ("scratch/000.png", 1, "ground_truth/scratch/000_mask.png"),
    ]
    assert all(s.has_mask for s in samples)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["mask"][[0, 1, 4]].sum(dim=(1, 2)).tolist() == [SIZE * SIZE / 2] * 3
    assert datamodule.locations()["mask_dir"] == root / "ground_truth"


def test_anomalib_layout_without_masks_and_a_missing_mask(tmp_path):
    root = tmp_path / "parts"
    write_images(root / "good", ["a.png"])
    write_images(root / "dent", ["b.png"])
    samples = FolderDataModule(root).samples
    assert [(s.key, s.label, s.has_mask) for s in samples] == [("dent/b.png", 1, False), ("good/a.png", 0, False)]
    write_images(root / "mask" / "dent", ["other.png"], mask=True)
    with pytest.raises(AnovlError, match="No mask for anomalous image .*b.png"):
        FolderDataModule(root).samples


def test_folder_images_the_layout_does_not_use_are_never_silent(tmp_path):
    flat = tmp_path / "flat"
    write_images(flat, ["a.png"])
    write_images(flat / "sub", ["b.png", "c.png"])
    with pytest.warns(UserWarning, match="2 image files are not part of the layout"):
        assert len(FolderDataModule(flat).samples) == 1
    only_subfolders = tmp_path / "only"
    write_images(only_subfolders / "crack", ["a.png"])
    with pytest.raises(AnovlError, match="none of them is named good"):
        FolderDataModule(only_subfolders).samples
