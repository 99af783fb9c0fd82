"""Bad input at the level of `anovl test`: every configuration or data problem ends in one `anovl: error:` line
naming the thing and the fix (no traceback), and `on_bad_image: skip` runs to the end on broken data.

Most runs call `anovl.cli.main` in this process: the console script's code path without its several seconds of
start-up. The console script itself runs where only a real process shows the behaviour: an error raised in a
DataLoader worker (test_cli.py runs it for a wrong backbone and a missing root).
"""

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from anovl.cli import main
from anovl.data import SkippedFileWarning, generate_mvtec_like
from tests.test_cli import CONFIGS, TINY_MODEL, cli_env  # noqa: F401 (cli_env is a fixture)
from tests.test_cli import anovl as run_console_script
from tests.test_data_io import _fuzz_files

MAX_PIXELS = 2 * 64 * 64  # a lowered decompression-bomb limit: 64 px images pass, "huge" 200 px ones do not
HUGE = 200


def cli_args(root, save_dir, *extra):
    """`anovl test` of the tiny random model on an MVTec-layout folder, without pictures."""
    return [
        "test",
        "--data",
        "anovl.data.MVTecDataModule",
        *TINY_MODEL,
        "--pictures.max_per_category",
        "0",
        "--data.init_args.root",
        root,
        "--trainer.logger.init_args.save_dir",
        save_dir,
        *extra,
    ]


def run_main(args, capsys):
    """Run `anovl` in this process: (exit status, stdout, stderr)."""
    try:
        main([str(arg) for arg in args])
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code or 0
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_error_line(status, stderr, *fragments):
    """Exit code 2 and exactly one `anovl: error:` line, which contains every fragment; no traceback."""
    assert status == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("anovl: error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert str(fragment) in errors[0]


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text-cache")


def prepare_in_process_cli(monkeypatch, text_cache):
    monkeypatch.setattr(sys, "argv", ["anovl"])  # not pytest's arguments
    monkeypatch.setenv("ANOVL_CACHE_DIR", str(text_cache))  # the prompts of a category are encoded once


@pytest.fixture(autouse=True)
def _cli_in_process(monkeypatch, text_cache):
    prepare_in_process_cli(monkeypatch, text_cache)
    # Lets a 200×200 file stand for an image beyond Pillow's decompression-bomb limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", MAX_PIXELS)


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
    """One category, 2 normal and 4 anomalous 64 px images."""
    return generate_mvtec_like(tmp_path_factory.mktemp("clean"), ("widget",), n_good=2, n_defect=1, image_size=64)


@pytest.fixture
def root_copy(clean_root, tmp_path):
    return Path(shutil.copytree(clean_root, tmp_path / "data"))


# ---------------------------------------------------------------- configuration errors


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    (folder / "corrupt.pt").write_bytes(b"not a checkpoint" * 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = open_clip.create_model("anovl-tiny-vit").state_dict()
    # The weights of a two-block variant: the tiny model's third block is missing.
    torch.save({key: value for key, value in state.items() if ".resblocks.2." not in key}, folder / "other.pt")
    return folder


# (extra arguments, fragments of the error line); "{root}", "{weights}" and "{tmp}" are filled in by the test.
CONFIG_ERRORS = {
    "category-missing": (
        ["--data.init_args.categories", "[bottle]"],
        ["Categories ['bottle'] not found in {root}", "found: widget"],
    ),
    "empty-category": (
        ["--data.init_args.root", "{tmp}/with_empty"],
        ["No test images in {tmp}/with_empty/empty/test", "expected"],
    ),
    "weights-missing": (
        ["--model.init_args.pretrained", "{tmp}/nope.pt"],
        ["weights file not found: {tmp}/nope.pt", "give an existing file"],
    ),
    "weights-corrupt": (
        ["--model.init_args.pretrained", "{weights}/corrupt.pt"],
        ["cannot read weights file {weights}/corrupt.pt", "re-download it"],
    ),
    "weights-other-architecture": (
        ["--model.init_args.pretrained", "{weights}/other.pt"],
        [
            "weights file {weights}/other.pt does not fit backbone anovl-tiny-vit",
            "choose the backbone the weights were saved from",
        ],
    ),
    "image-size-not-multiple": (
        ["--model.init_args.image_size", "70"],
        ["image_size 70 is not a multiple of the patch size 16", "use e.g. 64"],
    ),
    "data-model-size-differ": (
        ["--data.init_args.image_size", "32"],
        ["data.init_args.image_size is 32 but the model expects 64 px", "set model.init_args.image_size only"],
    ),
    "layers-empty": (["--model.init_args.layers", "[]"], ["layers must name at least one block"]),
    "accelerator-missing": (["--trainer.accelerator", "gpu"], ["gpu", "a trainer setting"]),
    "output-path-is-a-file": (
        ["--trainer.logger.init_args.save_dir", "{tmp}/a_file"],
        ["cannot use {tmp}/a_file", "give another path"],
    ),
    "tta-steps-0": (
        ["--config", CONFIGS / "tta" / "text.yaml", "--model.init_args.tta.steps", "0"],
        ["tta.steps must be at least 1", "set tta: null"],
    ),
    "empty-class-name": (
        ["--data.init_args.prompt_names", '{{"widget": " "}}'],
        ["prompt_names['widget'] is ' '", "give the object name", "drop the entry"],
    ),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_configuration_errors_are_one_line(case, clean_root, weights_files, tmp_path, capsys):
    (tmp_path / "with_empty" / "empty" / "test" / "good").mkdir(parents=True)
    (tmp_path / "a_file").write_text("not a folder")
    shutil.copytree(clean_root / "widget", tmp_path / "with_empty" / "widget")

    def fill(text):
        return str(text).format(root=clean_root, weights=weights_files, tmp=tmp_path)

    extra, fragments = CONFIG_ERRORS[case]
    status, _, stderr = run_main(cli_args(clean_root, tmp_path / "runs", *map(fill, extra)), capsys)
    assert_one_error_line(status, stderr, *map(fill, fragments))


# ---------------------------------------------------------------- data errors (on_bad_image: error)


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:150])
    return path


def damage_truncated_image(root):
    return truncate(root / "widget" / "test" / "good" / "001.png"), ["Cannot read image", "on_bad_image='skip'"]


def damage_not_an_image(root):
    path = root / "widget" / "test" / "scratch" / "000.png"
    path.write_text("this is a text file\nwith two lines")
    return path, ["Cannot read image", "re-save or replace the file"]


def damage_mask_size(root):
    mask = root / "widget" / "ground_truth" / "blob" / "000_mask.png"
    Image.open(mask).resize((48, 64)).save(mask)
    return mask, [root / "widget" / "test" / "blob" / "000.png", "48×64", "re-save the mask at its image's size"]


def damage_missing_mask(root):
    (root / "widget" / "ground_truth" / "blob" / "000_mask.png").unlink()
    return root / "widget" / "test" / "blob" / "000.png", ["No mask for anomalous image", "add the mask"]


def damage_huge_image(root):
    path = root / "widget" / "test" / "good" / "000.png"
    Image.new("RGB", (HUGE, HUGE), (90, 90, 90)).save(path)
    return path, ["more pixels than Pillow's safety limit", "raise PIL.Image.MAX_IMAGE_PIXELS"]


@pytest.mark.parametrize(
    "damage",
    [damage_truncated_image, damage_not_an_image, damage_mask_size, damage_missing_mask, damage_huge_image],
    ids=["truncated", "not-an-image", "mask-size", "missing-mask", "huge"],
)
def test_bad_data_in_error_mode_is_one_line_naming_the_file(damage, root_copy, tmp_path, capsys):
    path, fragments = damage(root_copy)
    status, _, stderr = run_main(cli_args(root_copy, tmp_path / "runs"), capsys)
    assert_one_error_line(status, stderr, path, *fragments)


def test_worker_error_from_the_console_script_is_one_line(root_copy, cli_env, tmp_path):  # noqa: F811
    # A DataLoader worker re-raises with the worker's traceback inside the message; only the cause may show.
    # (In a subprocess: in this process the failed loader's worker would hold up a later test for 5 s.)
    path, fragments = damage_truncated_image(root_copy)
    result = run_console_script(
        cli_args(root_copy, tmp_path / "runs", "--data.init_args.num_workers", "1"), cli_env, tmp_path
    )
    assert_one_error_line(result.returncode, result.stderr, path, *fragments)
    assert result.stderr.rstrip().splitlines()[-1].startswith("anovl: error:")


# ---------------------------------------------------------------- unusual but valid data, and skip mode


@pytest.fixture(scope="module")
def problem_root(tmp_path_factory):
    """Four categories:

    * ``odd``: valid images in unusual forms (grayscale, RGBA, 16-bit, CMYK JPEG, EXIF-rotated, non-square,
      a soft mask): no error, no warning;
    * ``broken``: a truncated image, a text file named .png, an image beyond the pixel limit, a mask of
      another size and an anomalous image without mask;
    * ``normal_only`` and ``anomalous_only``: metrics that need both kinds of image are undefined.
    """
    styles = {"odd": "widget", "broken": "widget", "normal_only": "fabric", "anomalous_only": "washer"}
    root = generate_mvtec_like(tmp_path_factory.mktemp("problems"), styles, n_good=3, n_defect=1, image_size=64)
    odd = root / "odd"
    good = odd / "test" / "good"
    Image.open(good / "000.png").convert("L").save(good / "000.png")
    Image.open(good / "001.png").convert("RGBA").save(good / "001.png")
    gray = np.asarray(Image.open(good / "002.png").convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(good / "002.png")  # 16-bit PNG
    blob = odd / "test" / "blob" / "000.png"
    Image.open(blob).convert("CMYK").save(blob.with_suffix(".jpg"), quality=95)
    blob.unlink()
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down; square, so the mask still fits
    spot = odd / "test" / "colour_spot" / "000.png"
    Image.open(spot).rotate(180).save(spot, exif=exif)
    scratch, scratch_mask = odd / "test" / "scratch" / "000.png", odd / "ground_truth" / "scratch" / "000_mask.png"
    Image.open(scratch).resize((96, 64)).save(scratch)
    Image.open(scratch_mask).resize((96, 64), Image.Resampling.NEAREST).save(scratch_mask)
    soft = odd / "ground_truth" / "missing_piece" / "000_mask.png"
    Image.fromarray((np.asarray(Image.open(soft)) > 0).astype(np.uint8) * 200).save(soft)  # 0/200, not 0/255

    broken = root / "broken"
    truncate(broken / "test" / "good" / "000.png")
    (broken / "test" / "good" / "001.png").write_text("not an image")
    Image.new("RGB", (HUGE, HUGE)).save(broken / "test" / "scratch" / "000.png")
    Image.new("L", (HUGE, HUGE)).save(broken / "ground_truth" / "scratch" / "000_mask.png")
    Image.new("L", (32, 32)).save(broken / "ground_truth" / "blob" / "000_mask.png")
    (broken / "ground_truth" / "colour_spot" / "000_mask.png").unlink()

    for folder in (root / "normal_only" / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    shutil.rmtree(root / "normal_only" / "ground_truth")
    shutil.rmtree(root / "anomalous_only" / "test" / "good")
    return root


def read_results(save_dir: Path) -> dict:
    (path,) = save_dir.glob("anovl/*/results.json")
    return json.loads(path.read_text())


def rows_by_category(document: dict) -> dict[str, dict]:
    return {row["category"]: row for row in document["categories"]}


def test_unusual_images_and_one_sided_categories_run_in_error_mode(problem_root, tmp_path, capsys):
    categories = "[odd, normal_only, anomalous_only]"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, _, stderr = run_main(
            cli_args(problem_root, tmp_path, "--data.init_args.categories", categories), capsys
        )
    assert status == 0, stderr
    assert not [w for w in caught if issubclass(w.category, SkippedFileWarning)]
    undefined = {str(w.message) for w in caught}
    assert "image_auroc is undefined (no positive (anomalous) samples); returning NaN" in undefined
    assert "image_auroc is undefined (no negative (normal) samples); returning NaN" in undefined
    rows = rows_by_category(read_results(tmp_path))
    assert rows["odd"]["images"] == 7 and rows["odd"]["pixel_auroc"] is not None
    # No anomalous images: neither image nor pixel metrics are defined; no normal images: image AUROC is not.
    assert rows["normal_only"]["image_auroc"] is None and rows["normal_only"]["pixel_auroc"] is None
    assert rows["anomalous_only"]["image_auroc"] is None and rows["anomalous_only"]["pixel_auroc"] is not None


def test_skip_mode_completes_on_broken_data_and_lists_the_skipped_files(problem_root, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, stdout, stderr = run_main(
            cli_args(problem_root, tmp_path, "--data.init_args.on_bad_image", "skip"), capsys
        )
    assert status == 0, stderr
    broken = problem_root / "broken"
    left_out = [
        broken / "test" / "good" / "000.png",
        broken / "test" / "good" / "001.png",
        broken / "test" / "scratch" / "000.png",
    ]
    without_mask = [broken / "test" / "blob" / "000.png", broken / "test" / "colour_spot" / "000.png"]
    warned = [str(w.message) for w in caught if issubclass(w.category, SkippedFileWarning)]
    document = read_results(tmp_path)
    assert len(warned) == len(document["skipped_files"]) == 5
    assert sorted(warned) == sorted(document["skipped_files"])
    for path in left_out:
        assert sum(str(path) in message and "image left out" in message for message in warned) == 1
    for path in without_mask:
        assert sum(str(path) in message and "used without its mask" in message for message in warned) == 1
    rows = rows_by_category(document)
    assert list(rows) == ["anomalous_only", "broken", "normal_only", "odd"] and document["complete"] is True
    assert rows["broken"]["images"] == 7 - len(left_out)
    assert rows["broken"]["pixel_auroc"] is not None  # from the one anomalous image that kept its mask
    assert rows["normal_only"]["image_auroc"] is None  # NaN where undefined, not a crash
    assert document["mean"]["images"] == 4 + 4 + 3 + 7
    assert "5 files left out or used without their mask" in stdout


def test_resumed_skip_mode_run_keeps_the_list_of_skipped_files(problem_root, tmp_path, capsys):
    args = cli_args(
        problem_root, tmp_path, "--data.init_args.on_bad_image", "skip", "--data.init_args.categories", "[broken, odd]"
    )
    assert run_main(args, capsys)[0] == 0
    (run,) = tmp_path.glob("anovl/*")
    finished = (run / "results.json").read_text()
    interrupted = json.loads(finished)
    interrupted["categories"] = interrupted["categories"][:1]  # as if killed while "odd" ran
    (run / "results.json").write_text(json.dumps(interrupted))
    status, _, stderr = run_main([*args, "--resume", run], capsys)
    assert status == 0, stderr
    assert (run / "results.json").read_text() == finished
    assert len(json.loads(finished)["skipped_files"]) == 5


def test_skip_mode_survives_a_fuzzed_dataset_through_the_cli(clean_root, tmp_path, capsys):
    root = Path(shutil.copytree(clean_root, tmp_path / "data"))
    rng = np.random.default_rng(11)
    fuzzed = [path for path in _fuzz_files(rng, root / "widget" / "test" / "good", 24) if path.suffix != ".gif"]
    mask = root / "widget" / "ground_truth" / "scratch" / "000_mask.png"
    next(_fuzz_files(rng, mask.parent, 1)).replace(mask)  # random bytes as a mask
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, _, stderr = run_main(
            cli_args(
                root, tmp_path / "runs", "--data.init_args.on_bad_image", "skip", "--data.init_args.batch_size", "4"
            ),
            capsys,
        )
    assert status == 0, stderr
    document = read_results(tmp_path / "runs")
    left_out = [message for message in document["skipped_files"] if "image left out" in message]
    without_mask = [message for message in document["skipped_files"] if "used without its mask" in message]
    assert len(without_mask) == 1 and str(mask) in without_mask[0]
    # Every listed file is either in the metrics or named as left out; each problem warned once.
    assert document["mean"]["images"] + len(left_out) == 6 + len(fuzzed)
    assert 0 < len(left_out) < len(fuzzed)  # the fuzz has both unreadable and readable files
    assert all(any(path.name in message for path in fuzzed) for message in left_out)
    assert len([w for w in caught if issubclass(w.category, SkippedFileWarning)]) == len(document["skipped_files"])
