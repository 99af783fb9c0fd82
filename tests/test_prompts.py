"""Prompt sentences (docs/METHOD.md §3) and their text embeddings, with the on-disk cache."""

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from anovl import categories
from anovl.backbones import create_backbone
from anovl.errors import AnovlError
from anovl.models import text_cache as text_cache_module
from anovl.models.anovl.prompts import PromptSet
from anovl.models.text_cache import TextEmbeddingCache
from tests.conftest import TINY


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_backbone(TINY)


def test_reference_counts_and_exact_sentences():
    prompts = PromptSet()
    normal, abnormal = prompts.normal_sentences("bottle"), prompts.abnormal_sentences("bottle")
    assert len(normal) == len(abnormal) == 462 == len(set(normal))
    # Ordered domain phrase, then template, then state.
    assert normal[0] == "a cropped industrial photo of the normal bottle"
    assert normal[1] == "a cropped industrial photo of the flawless bottle"
    assert normal[7] == "a cropped industrial photo of a normal bottle"
    assert normal[12 * 7 + 4] == "an industrial photo of a bottle without flaw"
    assert normal[22 * 7] == "a cropped industrial image of the normal bottle"
    assert normal[44 * 7 + 8 * 7 + 2] == "a jpeg corrupted manufacturing image of a perfect bottle"
    assert abnormal[-1] == "a manufacturing image of a bottle with damage for anomaly detection"
    assert abnormal[19 * 7 + 3] == "an industrial photo of a blemished bottle for visual inspection"


def sentences(prompts: PromptSet, name: str, domain: str = "object") -> tuple[list[str], list[str]]:
    return prompts.normal_sentences(name, domain), prompts.abnormal_sentences(name, domain)


def test_textures_use_texture_domains_and_macaroni_is_renamed():
    prompts = PromptSet()
    carpet = prompts.normal_sentences("carpet", categories.domain("carpet"))
    assert carpet[22 * 7] == "a cropped textural photo of the normal carpet"
    assert carpet[44 * 7 + 12 * 7] == "a surface picture of a normal carpet"
    assert categories.category_info("macaroni2") == categories.CategoryInfo("macaroni", "object")
    assert prompts.normal_sentences("metal_nut")[0] == "a cropped industrial photo of the normal metal_nut"
    assert categories.domain("metal_nut") == "object" and categories.prompt_name("metal_nut") == "metal_nut"


def test_a_renamed_category_keeps_its_domain(tiny_model, monkeypatch):
    asked = []
    original = tiny_model.text_cache.get
    monkeypatch.setattr(
        tiny_model.text_cache,
        "get",
        lambda normal, abnormal, **kw: asked.append(normal) or original(normal, abnormal, **kw),
    )
    tiny_model(torch.zeros(1, 3, 64, 64), ["carpet"], ["rug"])
    assert asked[0][22 * 7] == "a cropped textural photo of the normal rug"


def test_registered_categories(recwarn):
    categories.register_category("my_felt", "felt", categories.TEXTURE)
    assert categories.category_info("my_felt") == categories.CategoryInfo("felt", "texture")
    assert not recwarn.list
    with pytest.warns(UserWarning, match="replacing"):
        categories.register_category("my_felt", "wool felt", categories.TEXTURE)
    assert categories.prompt_name("my_felt") == "wool felt"
    with pytest.raises(AnovlError, match="non-empty"):
        categories.register_category("my_felt", " ")


def test_overrides():
    prompts = PromptSet(
        normal_states=("good {}",),
        abnormal_states=("bad {}", "broken {}"),
        templates=("{art} {domain} of {}",),
        domains={"circuit": ("infrared image",)},
    )
    assert sentences(prompts, "printed circuit board", "circuit") == (
        ["an infrared image of good printed circuit board"],
        ["an infrared image of bad printed circuit board", "an infrared image of broken printed circuit board"],
    )
    with pytest.raises(AnovlError, match="no prompt phrases for the domain 'object'"):
        prompts.normal_sentences("bottle")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"normal_states": ("normal",)}, "exactly one"),
        ({"templates": ("a photo of {} {}",)}, "exactly one"),
        ({"abnormal_states": ()}, "non-empty"),
        ({"domains": {"object": ()}}, "non-empty"),
    ],
)
def test_bad_prompt_sets(kwargs, message):
    with pytest.raises(AnovlError, match=message):
        PromptSet(**kwargs)


def test_empty_prompt_name():
    with pytest.raises(AnovlError, match="empty prompt name"):
        PromptSet().normal_sentences("  ")


@torch.no_grad()
def test_text_embedding_formula(backbone, tmp_path):
    prompts = PromptSet()
    cache = TextEmbeddingCache(backbone, tmp_path)
    got = cache.get(*sentences(prompts, "bottle"))
    normal = backbone.clip.encode_text(backbone.tokenizer(prompts.normal_sentences("bottle")))
    abnormal = backbone.clip.encode_text(backbone.tokenizer(prompts.abnormal_sentences("bottle")))
    # Mean of the unnormalised embeddings, then normalised (not a mean of normalised ones).
    expected = F.normalize(torch.stack([normal.mean(0), abnormal.mean(0)]), dim=-1)
    torch.testing.assert_close(got.states, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.states[0], F.normalize(F.normalize(normal, dim=-1).mean(0), dim=0), atol=1e-4)
    torch.testing.assert_close(got.sentences, F.normalize(torch.cat([normal, abnormal]), dim=-1), rtol=1e-5, atol=1e-6)
    assert got.sentences.shape == (924, 32)


def test_cache_round_trip_skips_encoding(backbone, tmp_path, monkeypatch):
    bottle = sentences(PromptSet(), "bottle")
    first = TextEmbeddingCache(backbone, tmp_path).get(*bottle)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("encoded again despite the cache")

    monkeypatch.setattr(text_cache_module, "encode_sentences", fail)
    second = TextEmbeddingCache(backbone, tmp_path).get(*bottle)
    torch.testing.assert_close(second.states, first.states, rtol=0, atol=0)
    torch.testing.assert_close(second.sentences, first.sentences, rtol=0, atol=0)


def test_cache_key_follows_sentences_and_weights(backbone, tmp_path):
    cache = TextEmbeddingCache(backbone, tmp_path)
    bottle, cable = [sum(sentences(PromptSet(), name), []) for name in ("bottle", "cable")]
    other_prompts = sum(sentences(PromptSet(normal_states=("ok {}",)), "bottle"), [])
    assert len({cache.path(bottle), cache.path(cable), cache.path(other_prompts)}) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        other_weights = TextEmbeddingCache(create_backbone(TINY), tmp_path)
    assert other_weights.path(bottle) != cache.path(bottle)


def test_cache_key_follows_the_tokenizer(backbone, tmp_path):
    bottle = sum(sentences(PromptSet(), "bottle"), [])
    own = backbone.tokenizer
    assert TextEmbeddingCache(backbone, tmp_path).key(bottle)["tokenizer"] == f"open_clip:{TINY}"
    first = TextEmbeddingCache(backbone, tmp_path).sentence_embeddings(bottle)
    # other callables are keyed by the token ids they give: equal ids share an entry
    copy_a = TextEmbeddingCache(replace(backbone, tokenizer=lambda texts: own(texts).clone()), tmp_path)
    copy_b = TextEmbeddingCache(replace(backbone, tokenizer=lambda texts: own(texts) + 0), tmp_path)
    assert copy_a.path(bottle) == copy_b.path(bottle) != TextEmbeddingCache(backbone, tmp_path).path(bottle)

    def first_words_only(texts):
        ids = own(texts)
        return ids.masked_fill(torch.arange(ids.shape[-1]) > 4, 0)

    # another tokenizer for the same weights: re-encoded with it, never the old entry
    truncating = replace(backbone, tokenizer=first_words_only)
    other = TextEmbeddingCache(truncating, tmp_path)
    assert other.path(bottle) != copy_a.path(bottle)
    got = other.sentence_embeddings(bottle)
    with torch.no_grad():
        expected = truncating.clip.encode_text(truncating.tokenizer(bottle))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, first, atol=1e-3)


def test_corrupt_or_swapped_cache_files_are_re_encoded(backbone, tmp_path, caplog):
    bottle, cable = sentences(PromptSet(), "bottle"), sentences(PromptSet(), "cable")
    cache = TextEmbeddingCache(backbone, tmp_path)
    expected, cable_states = cache.get(*bottle).states, cache.get(*cable).states
    bottle_file, cable_file = cache.path(sum(bottle, [])), cache.path(sum(cable, []))
    bottle_file.write_bytes(cable_file.read_bytes())  # another entry's file in its place
    fresh = TextEmbeddingCache(backbone, tmp_path).get(*bottle)
    torch.testing.assert_close(fresh.states, expected)
    assert not torch.allclose(fresh.states, cable_states)
    assert "holds other sentences" in caplog.text
    bottle_file.write_bytes(b"garbage")
    torch.testing.assert_close(TextEmbeddingCache(backbone, tmp_path).get(*bottle).states, expected)
    assert "unreadable text-embedding cache" in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([bottle_file.name, cable_file.name])


@pytest.mark.parametrize("name", ["we{ird} {}", "ünïcode naïve", "x" * 300])
def test_odd_prompt_names_are_kept_verbatim(name, backbone, tmp_path):
    prompts = PromptSet()
    assert prompts.normal_sentences(name)[0] == f"a cropped industrial photo of the normal {name}"
    # Over-long sentences are cut to CLIP's context length by the tokenizer, not rejected.
    short = PromptSet(templates=("{art} {domain} of {}",))
    assert TextEmbeddingCache(backbone, tmp_path).get(*sentences(short, name)).states.shape == (2, 32)
