"""Test-time adaptation (docs/METHOD.md §5): loss, freezing, batching, order (in)dependence, variants."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anovl import AnoVL, AnovlError, TTAConfig
from anovl.models.anovl import adapters as adapters_module
from anovl.models.anovl.adapters import ADAPTERS, Adapter, create_adapter, register_adapter
from anovl.models.anovl.tta import TestTimeAdaptation, pseudo_labels, state_log_probs, tta_loss
from tests.conftest import TINY
from tests.reference.tta import authors_tta

D, N, M = 8, 6, 10


def token_set(batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, N, D, generator=generator)
    states = F.normalize(torch.randn(batch, 2, D, generator=generator), dim=-1)
    sentences = F.normalize(torch.randn(batch, M, D, generator=generator), dim=-1)
    return tokens, states, sentences


def run(config, tokens, states, sentences, seeds=(11, 22, 33), categories=("a", "a", "a"), tta=None):
    tta = tta or TestTimeAdaptation(config)
    return tta(tokens, states, sentences, list(seeds)[: len(tokens)], list(categories)[: len(tokens)])


def test_loss_against_hand_computation():
    # One image, two tokens, 2-D embeddings with states along the axes: cosines are easy by hand.
    states = torch.eye(2)[None]
    clean = torch.tensor([[[3.0, 0.0], [1.0, 1.0]]])
    noisy = torch.tensor([[[0.0, 2.0], [1.0, 0.0]]])

    def probs(vec):
        cos = F.normalize(torch.tensor(vec), dim=0).tolist()
        z = math.exp(cos[0]) + math.exp(cos[1])
        return math.exp(cos[0]) / z, math.exp(cos[1]) / z

    pc = [probs([3.0, 0.0]), probs([1.0, 1.0])]
    pz = [probs([0.0, 2.0]), probs([1.0, 0.0])]
    entropy = sum(-(a * math.log(a) + b * math.log(b)) for a, b in pc) / 2
    nll = sum(-math.log(c[0]) - math.log(z[1]) for c, z in zip(pc, pz)) / 2
    expected = entropy + 0.5 * nll
    labels = torch.zeros(1, 2, dtype=torch.long)
    got = tta_loss(state_log_probs(clean, states), state_log_probs(noisy, states), labels, 1.0, 0.5)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Unlabelled clean tokens leave the label term; the corrupted term stays.
    partial = tta_loss(
        state_log_probs(clean, states), state_log_probs(noisy, states), torch.tensor([[1, -1]]), 1.0, 0.5
    )
    expected_partial = entropy + 0.5 * (-math.log(pc[0][1]) + (-math.log(pz[0][1]) - math.log(pz[1][1])) / 2)
    assert partial.item() == pytest.approx(expected_partial, rel=1e-6)


def test_tfa_threshold_pseudo_labels():
    states = torch.eye(2)[None]
    angles = torch.linspace(0, math.pi / 2, 10)
    tokens = torch.stack([torch.cos(angles), torch.sin(angles)], -1)[None]  # abnormality rises with the angle
    labels = pseudo_labels(
        tokens, states, TTAConfig(pseudo_labels="tfa_threshold", normal_quantile=0.3, abnormal_quantile=0.8)
    )
    assert labels.tolist() == [[0, 0, 0, -1, -1, -1, -1, -1, 1, 1]]
    assert pseudo_labels(tokens, states, TTAConfig()).eq(0).all()


def test_loss_decreases_over_steps():
    tokens, states, sentences = token_set()
    corrupted = tokens + 2.0 * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    tta = TestTimeAdaptation(TTAConfig(steps=30, lr=1e-2, corruption="image"))  # a fixed token set
    tta(tokens, states, sentences, [1, 2, 3], ["a"] * 3, corrupted_tokens=corrupted)
    losses = tta.last_losses
    assert losses.shape == (30, 3)
    assert (losses[-1] < losses[0] - 0.05).all()
    assert (losses[1:] < losses[:-1]).float().mean() > 0.9


def test_batched_equals_one_at_a_time_and_order_independent():
    tokens, states, sentences = token_set()
    config = TTAConfig()
    batched = run(config, tokens, states, sentences)
    for i, seed in enumerate((11, 22, 33)):
        single = run(config, tokens[i : i + 1], states[i : i + 1], sentences[i : i + 1], seeds=[seed])
        torch.testing.assert_close(single[0], batched[i], rtol=1e-5, atol=1e-6)
    order = [2, 0, 1]
    permuted = run(config, tokens[order], states[order], sentences[order], seeds=[33, 11, 22])
    torch.testing.assert_close(permuted, batched[order], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched, tokens, atol=1e-4)  # it did adapt


def test_reference_mode_reproduces_the_authors_loop_and_depends_on_order():
    tokens, states, sentences = token_set(batch=2)
    sentences[1] = sentences[0]  # one category

    def ours(order):
        torch.manual_seed(5)
        tta = TestTimeAdaptation(TTAConfig(mode="reference"))
        adapted = run(
            tta.config, tokens[order], states[order], sentences[order], seeds=[0, 0], categories=["a", "a"], tta=tta
        )
        return {i: adapted[k] for k, i in enumerate(order)}

    for order in ([0, 1], [1, 0]):
        expected, got = authors_tta(tokens, states, sentences[0], order, seed=5), ours(order)
        for i in (0, 1):
            torch.testing.assert_close(got[i], expected[i], rtol=1e-5, atol=1e-6)
    # The carried-over AdamW state makes the second image's result depend on what came before.
    assert not torch.allclose(ours([0, 1])[1], ours([1, 0])[1], atol=1e-6)


def test_reference_mode_resets_parameters_per_image_and_optimizer_per_category(monkeypatch):
    tokens, states, sentences = token_set()
    resets = []
    original = Adapter.reset_parameters
    monkeypatch.setattr(Adapter, "reset_parameters", lambda self, g=None: (resets.append(1), original(self, g)))
    tta = TestTimeAdaptation(TTAConfig(mode="reference"))
    run(tta.config, tokens, states, sentences, categories=["a", "a", "b"], tta=tta)
    first_optimizer = tta._carried[2]
    # Category a: built once + reset for its second image; category b: built fresh.
    assert len(resets) == 3
    run(tta.config, tokens[:1], states[:1], sentences[:1], categories=["b"], tta=tta)
    assert tta._carried[2] is first_optimizer and len(resets) == 4
    tta.reset()
    assert tta._carried is None


def test_independent_mode_gives_each_image_fresh_parameters():
    tokens, states, sentences = token_set()
    config = TTAConfig()
    twice = run(config, tokens[[0, 0]], states[[0, 0]], sentences[[0, 0]], seeds=[7, 7])
    torch.testing.assert_close(twice[0], twice[1])
    after_other = run(config, tokens[[1, 0]], states[[1, 0]], sentences[[1, 0]], seeds=[3, 7])
    torch.testing.assert_close(after_other[1], twice[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["text", "linear", "lowrank"])
def test_each_adapter_adapts(name):
    tokens, states, sentences = token_set()
    adapted = run(TTAConfig(adapter=name), tokens, states, sentences)
    assert adapted.shape == tokens.shape and torch.isfinite(adapted).all()
    assert not torch.allclose(adapted, tokens, atol=1e-5)


def test_lowrank_adapter_starts_at_identity_and_linear_init_matches_nn_linear():
    tokens, _, sentences = token_set()
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    torch.testing.assert_close(create_adapter("lowrank", D, sentences, generators, rank=4)(tokens), tokens)
    linear = create_adapter("linear", D, sentences, [torch.Generator().manual_seed(9)] * 3)
    torch.manual_seed(9)
    reference = nn.Linear(D, D)
    torch.testing.assert_close(linear.linear.weight[0], reference.weight.detach())
    torch.testing.assert_close(linear.linear.bias[0], reference.bias.detach())


def test_register_a_new_adapter():
    @register_adapter("test-scale")
    class ScaleAdapter(Adapter):
        def __init__(self, dim, sentences, generators):
            super().__init__(dim, sentences, generators)
            self.scale = nn.Parameter(torch.ones(self.batch, 1, 1))

        def forward(self, x):
            return self.scale * x

    try:
        tokens, states, sentences = token_set()
        assert run(TTAConfig(adapter="test-scale"), tokens, states, sentences).shape == tokens.shape
        register_adapter("test-scale")(ScaleAdapter)  # the same class again: nothing to warn about

        class Replacement(ScaleAdapter):
            pass

        with pytest.warns(UserWarning, match="'test-scale' was registered before"):
            register_adapter("test-scale")(Replacement)
        assert ADAPTERS["test-scale"] is Replacement
    finally:
        ADAPTERS.pop("test-scale")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "tta.steps must be at least 1"),
        ({"adapter": "nope"}, "tta.adapter must be one of"),
        ({"mode": "fast"}, "tta.mode"),
        ({"corruption": "blur"}, "tta.corruption"),
        ({"lr": 0}, "tta.lr"),
        ({"normal_quantile": 0.9, "abnormal_quantile": 0.5}, "quantile"),
        ({"mode": "reference", "compile": True}, "tta.compile applies to mode 'independent'"),
    ],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(AnovlError, match=message):
        TTAConfig(**kwargs)


def test_unknown_adapter_by_name():
    with pytest.raises(AnovlError, match="unknown TTA adapter"):
        create_adapter("nope", D, token_set()[2])


@pytest.fixture(scope="module")
def tta_models():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AnoVL(TINY, pretrained=None)
        token = AnoVL(TINY, pretrained=None, tta=TTAConfig())
        image = AnoVL(TINY, pretrained=None, tta=TTAConfig(corruption="image"))
    for model in (token, image):
        model.load_state_dict(base.state_dict())
        model.text_cache = base.text_cache
    return base, token, image


def test_model_tta_keeps_backbone_frozen_and_score_unchanged(tta_models):
    base, token, _ = tta_models
    images = torch.randn(2, 3, 64, 64)
    plain = base(images, ["bottle", "carpet"])
    adapted = token(images, ["bottle", "carpet"])
    assert all(p.grad is None and not p.requires_grad for p in token.parameters())
    torch.testing.assert_close(adapted.tfa_map, plain.anomaly_map)
    torch.testing.assert_close(adapted.pred_score, plain.pred_score)  # TTA leaves the image score alone
    assert not torch.allclose(adapted.anomaly_map, plain.anomaly_map, atol=1e-5)
    single = token(images[1:], ["carpet"])
    torch.testing.assert_close(single.anomaly_map[0], adapted.anomaly_map[1], rtol=1e-5, atol=1e-6)


def test_model_tta_under_inference_mode(tta_models):
    _, token, _ = tta_models
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        inside = token(images, ["bottle"])
    torch.testing.assert_close(inside.anomaly_map, token(images, ["bottle"]).anomaly_map)


def test_image_corruption_branch(tta_models):
    _, token, image = tta_models
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(AnovlError, match="no corrupted images"):
        image(images, ["bottle"] * 2)
    corrupted = images + 0.5 * torch.randn_like(images)
    from_images = image(images, ["bottle"] * 2, corrupted_image=corrupted)
    assert not torch.allclose(from_images.anomaly_map, token(images, ["bottle"] * 2).anomaly_map, atol=1e-6)


@pytest.mark.parametrize(
    ("adapter", "labels"), [("text", "reference"), ("linear", "tfa_threshold"), ("lowrank", "reference")]
)
def test_adaptation_steps_need_no_values(adapter, labels):
    """On the meta device nothing has a value: .item(), .cpu(), a selection through a boolean index or a Python
    `if` on a tensor would raise; on CUDA each of those would stop the host until the device caught up, at every
    step. (An assignment through a boolean index passes here; pseudo_labels uses torch.where instead.)"""
    config = TTAConfig(adapter=adapter, steps=2, pseudo_labels=labels)
    tta = TestTimeAdaptation(config)
    tokens, states, sentences = (torch.randn(shape, device="meta") for shape in ((2, 16, 8), (2, 2, 8), (2, 6, 8)))
    module = create_adapter(adapter, 8, sentences, None)
    with torch.enable_grad():
        adapted, losses = tta._train(
            module, tta._optimizer(module), tokens, states, None, lambda: torch.randn_like(tokens), None
        )
    assert adapted.shape == (2, 16, 8) and losses.shape == (2, 2)


def test_compile_is_not_a_setting_of_the_results(tta_models):
    # Compiled steps give what eager ones give (slow tests below): one variant, one label, resumable either way.
    _, token, _ = tta_models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = AnoVL(TINY, pretrained=None, tta=TTAConfig(compile=True))
    assert compiled.settings() == token.settings() and compiled.label == token.label
    assert "compile" not in token.settings()["tta"] and token.settings()["tta"]["adapter"] == "text"


@pytest.mark.slow  # torch.compile: tens of seconds on a busy CPU
@pytest.mark.parametrize("adapter", ["text", "lowrank"])
def test_compiled_steps_equal_eager_ones(adapter):
    tokens, states, sentences = token_set()
    eager, compiled = (TestTimeAdaptation(TTAConfig(adapter=adapter, compile=flag)) for flag in (False, True))
    for scale in (1.0, 1.5):  # the second batch: a fresh adapter through the graph compiled for the first
        torch.testing.assert_close(
            run(None, scale * tokens, states, sentences, tta=compiled),
            run(None, scale * tokens, states, sentences, tta=eager),
            rtol=1e-5,
            atol=1e-5,
        )
        torch.testing.assert_close(compiled.last_losses, eager.last_losses, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # torch.compile
def test_compiled_tta_maps_equal_eager_maps_under_inference_mode(tta_models):
    _, token, _ = tta_models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = AnoVL(TINY, pretrained=None, tta=TTAConfig(compile=True))
    compiled.load_state_dict(token.state_dict())
    compiled.text_cache = token.text_cache
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():  # as Lightning's test loop runs it
        expected, adapted = token(images, ["bottle", "carpet"]), compiled(images, ["bottle", "carpet"])
    torch.testing.assert_close(adapted.anomaly_map, expected.anomaly_map, rtol=1e-5, atol=1e-5)
