"""The decoded-image cache: what it serves equals decoding, a changed file is decoded again, the size limit holds."""

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from anovl.data import MVTecDataModule, VisADataModule, decoded_cache, generate_mvtec_like, generate_visa_like
from anovl.data.decoded_cache import ENTRY_SUFFIX, DecodedCache
from anovl.errors import AnovlError
from tests.test_hostile_io import run_python

SIZE = 32


def items(datamodule):
    datamodule.setup()
    return [datamodule.dataset[index] for index in range(len(datamodule.dataset))]


def assert_same_items(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key


@pytest.mark.parametrize("layout", ["mvtec", "visa"])
def test_cached_items_equal_decoded_ones_and_need_no_decoding(tmp_path, layout, monkeypatch):
    if layout == "mvtec":
        root = generate_mvtec_like(tmp_path / "data", ("widget",), n_good=2, n_defect=1, image_size=48)
        make = lambda size=SIZE, **kwargs: MVTecDataModule(root, image_size=size, **kwargs)  # noqa: E731
    else:
        root = generate_visa_like(tmp_path / "data", {"macaroni1": "widget"}, n_good=2, n_defect=1, image_size=(40, 60))
        make = lambda size=SIZE, **kwargs: VisADataModule(root, image_size=size, **kwargs)  # noqa: E731
    decoded = items(make())
    first = make(decoded_cache_gb=1)
    assert_same_items(items(first), decoded)
    assert first.dataset.cache.hits == 0 and first.dataset.cache.misses > 0
    # The second run reads only cache entries: decoding would fail now.
    monkeypatch.setattr("anovl.data.dataset.load_rgb_resized", None)
    monkeypatch.setattr("anovl.data.dataset.load_mask_image", None)
    # Nor hash unchanged files again: their digests are remembered (the module's `open` reads a file to hash it).
    monkeypatch.setattr(decoded_cache, "open", None, raising=False)
    second = make(decoded_cache_gb=1)
    assert_same_items(items(second), decoded)
    masks = sum(sample.mask_path is not None for sample in second.samples)
    assert (second.dataset.cache.hits, second.dataset.cache.misses) == (len(decoded) + masks, 0)
    # Another size is another entry, which needs decoding (here: fails).
    monkeypatch.delattr(decoded_cache, "open")
    with pytest.raises(TypeError, match="not callable"):
        items(make(SIZE + 16, decoded_cache_gb=1))


def test_a_changed_file_is_decoded_again(tmp_path):
    root = generate_mvtec_like(tmp_path / "data", ("widget",), n_good=2, n_defect=1, image_size=48)
    items(MVTecDataModule(root, image_size=SIZE, decoded_cache_gb=1))
    changed = root / "widget" / "test" / "good" / "000.png"
    stat = changed.stat()
    flipped = np.asarray(Image.open(changed))[::-1].copy()
    Image.fromarray(flipped).save(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old time stamp
    datamodule = MVTecDataModule(root, image_size=SIZE, decoded_cache_gb=1)
    again = items(datamodule)
    assert_same_items(again, items(MVTecDataModule(root, image_size=SIZE)))
    assert datamodule.dataset.cache.misses == 1


def test_the_cache_keeps_to_its_size_and_drops_the_least_recently_used(tmp_path):
    cache = DecodedCache(max_bytes=3 * (32 + 100), directory=tmp_path)
    keys = [f"{index:064x}" for index in range(5)]
    for index, key in enumerate(keys):
        cache.put(key, np.full((10, 10), index, dtype=np.uint8), (20, 20))
        past = time.time_ns() - (10 - index) * 10**9
        os.utime(tmp_path / f"{key}{ENTRY_SUFFIX}", ns=(past, past))
    array, source_hw = cache.get(keys[0])  # used now: kept
    assert array.shape == (10, 10) and (array == 0).all() and source_hw == (20, 20)
    cache.prune()
    assert sorted(path.stem for path in tmp_path.glob(f"*{ENTRY_SUFFIX}")) == [keys[0], keys[3], keys[4]]


def test_a_damaged_entry_is_a_miss(tmp_path):
    cache = DecodedCache(max_bytes=10**6, directory=tmp_path)
    key = "ab" * 32
    cache.put(key, np.ones((4, 5, 3), dtype=np.uint8), (8, 10))
    path = tmp_path / f"{key}{ENTRY_SUFFIX}"
    path.write_bytes(path.read_bytes()[:-1])
    assert cache.get(key) is None and cache.misses == 1
    path.write_bytes(b"junk")
    assert cache.get(key) is None


def test_bad_cache_size_is_refused(tmp_path):
    with pytest.raises(AnovlError, match="decoded_cache_gb=-1"):
        MVTecDataModule(tmp_path, decoded_cache_gb=-1)


def test_a_planted_link_in_the_cache_folder_is_never_written_through(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("precious")
    cache = DecodedCache(max_bytes=10**6, directory=tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    keys = ["ab" * 32, "cd" * 32]
    for key in keys:
        (tmp_path / "cache" / f"{key}{ENTRY_SUFFIX}").symlink_to(outside)
    with pytest.warns(UserWarning, match="decoded cache: refusing to write .* is a symbolic link") as caught:
        for key in keys:
            cache.put(key, np.ones((4, 5, 3), dtype=np.uint8), (8, 10))
    assert len(caught) == 1  # one warning, not one per image
    assert outside.read_text() == "precious" and cache.get(keys[0]) is None
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [f"{key}{ENTRY_SUFFIX}" for key in keys]


FSIZE_SCRIPT = """
import resource, sys
from pathlib import Path
import numpy as np
from anovl.data.decoded_cache import DecodedCache
cache = DecodedCache(max_bytes=10**9, directory=Path(sys.argv[1]))
cache.put("ab" * 32, np.full((10, 10), 7, dtype=np.uint8), (20, 20))
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
cache.put("cd" * 32, np.zeros((100, 100, 3), dtype=np.uint8), (100, 100))  # over the limit: lost, not fatal
array, _ = cache.get("ab" * 32)
print("earlier entry", int(array.sum()), "new entry", cache.get("cd" * 32))
"""


def test_a_file_size_limit_loses_only_the_entry(tmp_path):
    result = run_python(FSIZE_SCRIPT, tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "earlier entry 700 new entry None" in result.stdout
    assert "decoded cache: cannot write" in result.stderr and "File too large" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{'ab' * 32}{ENTRY_SUFFIX}"]  # no partial file
