"""The shared components (anovl.models.components) and the two rules that keep them shared: a method imports
components, never another method's package; the plain-PyTorch core loads no Lightning."""

import ast
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anovl import AnovlError
from anovl.backbones import create_backbone
from anovl.models import WinCLIP
from anovl.models.clip_model import CLIPAnomalyModel
from anovl.models.components.prompts import EnsemblePrompts, check_texts
from anovl.models.components.tiling import tile_batch, untile
from anovl.models.registry import METHODS
from anovl.models.winclip.prompts import ANOMALOUS_STATES, TEMPLATES, WinCLIPPrompts
from anovl.testing.tiny import register_tiny
from tests.conftest import TINY

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "anovl" / "models"
METHOD_PACKAGES = sorted(path.parent.name for path in MODELS.glob("*/__init__.py") if path.parent.name != "components")


def imported_modules(path: Path, at_run_time: bool = False) -> set[str]:
    """The absolute imports of a file; ``at_run_time``: without those under ``if TYPE_CHECKING:``, which never run."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if at_run_time:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                node.body = []
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


def foreign_method_imports(own: str | None, files: list[Path]) -> list[str]:
    found = []
    for path in files:
        for module in imported_modules(path):
            parts = module.split(".")
            other = parts[2] if parts[:2] == ["anovl", "models"] and len(parts) > 2 else None
            # `from anovl.models import X` loads every method, so it counts as reaching into them all.
            if module == "anovl.models" or (other in METHOD_PACKAGES and other != own):
                found.append(f"{path} imports {module}")
    return found


def test_a_method_imports_components_never_another_methods_package():
    assert {"anovl", "winclip"} <= set(METHOD_PACKAGES)
    found = [
        line
        for package in METHOD_PACKAGES
        for line in foreign_method_imports(package, sorted((MODELS / package).rglob("*.py")))
    ]
    found += foreign_method_imports(None, sorted((REPO / "examples" / "plugins").glob("*.py")))
    assert not found, "methods must share code through anovl.models.components:\n" + "\n".join(found)


def test_the_rule_sees_a_foreign_import(tmp_path):
    method = tmp_path / "torch_model.py"
    method.write_text("from anovl.models.winclip.windows import harmonic_mean\nfrom anovl.models.components import x\n")
    assert foreign_method_imports("anovl", [method]) == [f"{method} imports anovl.models.winclip.windows"]
    assert foreign_method_imports("winclip", [method]) == []


def test_the_core_loads_no_lightning():
    code = (
        "import sys, anovl.models, anovl.backbones, anovl.metrics, anovl.models.winclip.windows; "
        "print(sorted({name.split('.')[0] for name in sys.modules if name.split('.')[0] == 'lightning'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_tile_batch_and_untile_against_slicing():
    images = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    tiles, count, per_tile = tile_batch(images, categories=["a", "b"], corrupted_image=images + 1, seeds=None)
    assert count == 2 and tiles.shape == (4, 3, 8, 8)
    expected = torch.stack([images[0, ..., :8], images[0, ..., 4:], images[1, ..., :8], images[1, ..., 4:]])
    assert torch.equal(tiles, expected) and torch.equal(per_tile["corrupted_image"], expected + 1)
    assert per_tile["categories"] == ["a", "a", "b", "b"] and per_tile["seeds"] is None

    full = torch.rand(2, 8, 12)
    tile_maps = torch.stack([full[0, :, :8], full[0, :, 4:], full[1, :, :8], full[1, :, 4:]])
    maps, scores = untile(tile_maps, torch.tensor([1.0, 3.0, 5.0, 9.0]), 8, 12)
    torch.testing.assert_close(maps, full)  # the overlap averages two equal values
    assert scores.tolist() == [2.0, 7.0]


def test_ensemble_prompts_are_every_template_around_every_state():
    prompts = WinCLIPPrompts()
    assert prompts.abnormal_sentences("screw") == [
        t.format(s.format("screw")) for s in ANOMALOUS_STATES for t in TEMPLATES
    ]
    normal, abnormal = prompts.sentences("screw", "texture")  # the domain does not change an ensemble
    assert list(normal) == prompts.normal_sentences("screw") and list(abnormal) == prompts.abnormal_sentences("screw")
    assert prompts.to_dict()["anomalous_states"] == list(ANOMALOUS_STATES)
    with pytest.raises(TypeError):
        EnsemblePrompts()  # the lists come from a subclass
    with pytest.raises(AnovlError, match=r"templates entry 'a photo' must contain exactly one '\{\}' for the state"):
        check_texts("X", "templates", ["a photo"], "the state")
    with pytest.raises(AnovlError, match="empty prompt name"):
        prompts.sentences("  ")


@pytest.fixture(scope="module")
def winclip():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WinCLIP(TINY, pretrained=None, image_size=64, use_text_cache=False)


def test_text_states_encode_once_per_prompt_set_and_device(winclip, monkeypatch):
    calls = []
    encode = winclip.text_cache.sentence_embeddings
    monkeypatch.setattr(winclip.text_cache, "sentence_embeddings", lambda s: calls.append(len(s)) or encode(s))
    first = winclip.text_states("carpet")
    assert winclip.text_states("carpet") is first and len(calls) == 1  # cached, not encoded again
    with torch.no_grad():
        tokens = winclip.text_cache.backbone.tokenizer
        normal = winclip.clip.encode_text(tokens(winclip.prompts.normal_sentences("carpet"))).mean(0)
        abnormal = winclip.clip.encode_text(tokens(winclip.prompts.abnormal_sentences("carpet"))).mean(0)
    torch.testing.assert_close(first.states, F.normalize(torch.stack([normal, abnormal]), dim=-1))
    assert winclip.text_states("other", prompt_name="carpet") is first  # the same sentences

    monkeypatch.setattr(winclip, "prompts", WinCLIPPrompts(templates=("a photo of the {}.",)))
    changed = winclip.text_states("carpet")  # new prompts: new sentences, encoded
    assert len(calls) == 2 and not torch.equal(changed.states, first.states)


@pytest.mark.parametrize("method", ["anovl", "winclip", "aprilgan", "anomalyclip"])
def test_every_method_keeps_the_shared_text_states_signature(method):
    cls = METHODS.lookup(method)
    assert issubclass(cls, CLIPAnomalyModel)
    assert inspect.signature(cls.text_states) == inspect.signature(CLIPAnomalyModel.text_states)


def test_plain_tokens_are_the_towers_own_intermediate_tokens():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        open_clip_backbone = create_backbone(TINY)
        timm_backbone = create_backbone(register_tiny("ViT-B-16-SigLIP", simple_tokenizer=True))
    open_clip_tower, timm_tower = open_clip_backbone.visual, timm_backbone.visual
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = open_clip_tower.plain_tokens(images, layers=[-1, 0], project=False)
        reference = open_clip_tower.visual.forward_intermediates(
            images, indices=[0, 2], output_fmt="NLC", intermediates_only=True
        )["image_intermediates"]
        for ours, theirs in zip(raw, reference):
            torch.testing.assert_close(ours, theirs)
        projected = open_clip_tower.plain_tokens(images, layers=[0])[0]
        visual = open_clip_tower.visual
        torch.testing.assert_close(projected, visual.ln_post(reference[0]) @ visual.proj)
        assert not torch.allclose(open_clip_tower.plain_tokens(images)[0], open_clip_tower.vv_tokens(images)[0])
        # With the image embedding: open_clip's encode_image (all blocks run, not only up to the first), same tokens.
        embedding, (intermediate,) = open_clip_tower.forward_intermediates(images, layers=[0], project=False)
        torch.testing.assert_close(embedding, open_clip_backbone.clip.encode_image(images))
        torch.testing.assert_close(intermediate, reference[0])

        trunk = timm_tower.visual.trunk
        images = torch.randn(1, 3, *trunk.patch_embed.img_size)
        raw = timm_tower.plain_tokens(images, layers=[1], project=False)[0]
        reference = trunk.forward_intermediates(images, indices=[1], output_fmt="NLC", intermediates_only=True)[0]
        torch.testing.assert_close(raw, reference)
        embedding, (intermediate,) = timm_tower.forward_intermediates(images, layers=[1], project=False)
        torch.testing.assert_close(embedding, timm_backbone.clip.encode_image(images))
        torch.testing.assert_close(intermediate, reference)


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("anovl/lightning_cli.py", "anovl.cli"),
        ("anovl/tracking.py", "anovl.engine"),
        ("anovl/callbacks/panels.py", "anovl.engine"),
    ],
)
def test_no_import_cycles_closed_by_deferred_imports(module, forbidden):
    # cli imports lightning_cli (deferred, only for test/predict/fit), and the engine imports tracking and the
    # callbacks: none of them may import back, at the top or inside a function (an import for type checking only
    # never runs, so it closes no cycle).
    imported = imported_modules(REPO / module, at_run_time=True)
    assert not [name for name in imported if name == forbidden or name.startswith(forbidden + ".")]
