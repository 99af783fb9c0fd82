"""The text-embedding cache trusts no file: swapped entries are re-encoded, write errors only warn, no temp files."""

import errno
import logging
import shutil
import time
from dataclasses import replace

import pytest
import torch

from anovl.models import text_cache as text_cache_module
from anovl.models.text_cache import TextEmbeddingCache
from tests.test_prompts import backbone  # noqa: F401 (shared fixture)

NORMAL = ["a photo of a flawless bottle", "a photo of a perfect bottle"]
ABNORMAL = ["a photo of a damaged bottle"]
OTHER = ["a photo of a flawless cable", "a photo of a broken cable"]


@pytest.fixture
def encodings(monkeypatch):
    """Counts the sentences really encoded (cache misses)."""
    calls = []
    real = text_cache_module.encode_sentences

    def counting(backbone, sentences, *args, **kwargs):
        calls.append(list(sentences))
        return real(backbone, sentences, *args, **kwargs)

    monkeypatch.setattr(text_cache_module, "encode_sentences", counting)
    return calls


def files_in(folder):
    return sorted(path.name for path in folder.rglob("*") if path.is_file())


@pytest.mark.parametrize(
    "damage",
    ["another entry's file", "swapped files", "truncated", "not safetensors", "integer tensor under the right key"],
)
def test_a_wrong_entry_is_detected_and_re_encoded(backbone, tmp_path, encodings, caplog, damage):
    cache = TextEmbeddingCache(backbone, tmp_path)
    first = cache.sentence_embeddings(NORMAL + ABNORMAL)
    cache.sentence_embeddings(OTHER)
    mine, other = cache.path(NORMAL + ABNORMAL), cache.path(OTHER)
    if damage == "another entry's file":
        shutil.copyfile(other, mine)
    elif damage == "swapped files":
        mine.rename(tmp_path / "swap")
        other.rename(mine)
        (tmp_path / "swap").rename(other)
    elif damage == "truncated":
        mine.write_bytes(mine.read_bytes()[:50])
    elif damage == "not safetensors":
        mine.write_bytes(b"\x80\x04garbage pickle-like bytes")
    else:
        from safetensors.torch import save_file

        save_file(
            {"embeddings": torch.zeros(3, first.shape[1], dtype=torch.int32)},
            str(mine),
            metadata=cache.key(NORMAL + ABNORMAL),
        )
    encodings.clear()
    with caplog.at_level(logging.WARNING):
        again = TextEmbeddingCache(backbone, tmp_path).sentence_embeddings(NORMAL + ABNORMAL)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert encodings == [NORMAL + ABNORMAL] and "re-encoding" in caplog.text
    if damage == "swapped files":  # the other entry is caught as well
        encodings.clear()
        TextEmbeddingCache(backbone, tmp_path).sentence_embeddings(OTHER)
        assert encodings == [OTHER]
    encodings.clear()
    TextEmbeddingCache(backbone, tmp_path).sentence_embeddings(NORMAL + ABNORMAL)
    assert encodings == []  # rewritten correctly


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def half_written(tensors, filename, metadata=None):
    with open(filename, "wb") as handle:
        handle.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def hostile_error(*args, **kwargs):
    raise RuntimeError("the safetensors writer failed in an unexpected way")


@pytest.mark.parametrize("failure", [no_space, half_written, hostile_error])
def test_write_errors_warn_and_leave_no_temporary_file(backbone, tmp_path, monkeypatch, caplog, failure):
    monkeypatch.setattr(text_cache_module, "save_file", failure)
    with caplog.at_level(logging.WARNING):
        embeddings = TextEmbeddingCache(backbone, tmp_path).sentence_embeddings(NORMAL)
    assert embeddings.shape[0] == len(NORMAL)
    assert "could not write text-embedding cache" in caplog.text
    assert files_in(tmp_path) == []


def test_an_unusable_cache_folder_only_warns(backbone, tmp_path, caplog):
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING):
        TextEmbeddingCache(backbone, blocker / "cache").sentence_embeddings(NORMAL)
    assert "could not write text-embedding cache" in caplog.text


def test_a_successful_write_leaves_only_the_entry(backbone, tmp_path):
    cache = TextEmbeddingCache(backbone, tmp_path)
    cache.sentence_embeddings(NORMAL)
    cache.sentence_embeddings(OTHER)
    assert files_in(tmp_path) == sorted([cache.path(NORMAL).name, cache.path(OTHER).name])


@pytest.mark.parametrize("name", ["../../escape", "/abs/olute", "a\x00b", "x" * 400, ".."])
def test_odd_backbone_names_stay_inside_the_cache_folder(backbone, tmp_path, name, encodings):
    oddly_named = replace(backbone, name=name)
    cache = TextEmbeddingCache(oddly_named, tmp_path / "cache")
    cache.sentence_embeddings(NORMAL)
    path = cache.path(NORMAL)
    assert path.parent == tmp_path / "cache" and path.is_file() and len(path.name.encode()) < 255
    assert files_in(tmp_path) == [path.name]
    encodings.clear()
    TextEmbeddingCache(oddly_named, tmp_path / "cache").sentence_embeddings(NORMAL)
    assert encodings == []


def test_a_cache_hit_is_logged_once(backbone, tmp_path, encodings, caplog):
    cache = TextEmbeddingCache(backbone, tmp_path)
    with caplog.at_level(logging.INFO, logger="anovl.models.text_cache"):
        cache.sentence_embeddings(NORMAL)  # encoded and written: no hit
        assert not [record for record in caplog.records if "read from the cache" in record.getMessage()]
        for sentences in (NORMAL, NORMAL, OTHER, NORMAL):
            cache.sentence_embeddings(sentences)
        cache.sentence_embeddings(OTHER)
    hits = [record.getMessage() for record in caplog.records if "read from the cache" in record.getMessage()]
    assert hits == [
        f"text embeddings read from the cache in {tmp_path} (not encoded again; later reads are not logged)"
    ]
    assert encodings == [NORMAL, OTHER]


def test_slow_text_encoding_shows_a_progress_bar_and_quick_encoding_none(backbone, monkeypatch, capsys):
    sentences = [f"a photo of a flawless object number {index}" for index in range(6)]
    real_encode = backbone.clip.encode_text

    def slow_encode(tokens):
        time.sleep(0.15)  # a large text tower on a CPU
        return real_encode(tokens)

    expected = text_cache_module.encode_sentences(backbone, sentences, batch_size=2)
    assert capsys.readouterr().err == ""  # quick: nothing printed
    monkeypatch.setattr(backbone.clip, "encode_text", slow_encode)
    monkeypatch.setattr(text_cache_module, "PROGRESS_AFTER_S", 0.1)
    encoded = text_cache_module.encode_sentences(backbone, sentences, batch_size=2)
    err = capsys.readouterr().err
    assert "Encoding 6 prompt sentences" in err and "cached afterwards" in err and "6/6" in err
    torch.testing.assert_close(encoded, expected, rtol=0, atol=0)  # the bar changes nothing
