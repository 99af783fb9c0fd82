"""Write docs/backbones.md: which open_clip configs run AnoVL's V-V path, as this script finds them.

Every config in ``open_clip.list_models()`` is classified by building its vision tower on the ``meta``
device (no weights). For one sample per family (same encoder, block, attention and pooling), a tiny
random-weight variant (anovl.testing.tiny) is built and run once: the dual path, and its global token
against open_clip's ``encode_image``. The table states only what this run did.

    PYTHONPATH=. python benchmarks/backbone_support.py            # rewrites docs/backbones.md
"""

from __future__ import annotations

import argparse
import platform
import warnings
from collections import defaultdict
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn.functional as F

from anovl.backbones import create_backbone
from anovl.backbones.registry import meta_tower, unsupported_reasons
from anovl.testing.tiny import register_tiny
from anovl.errors import AnovlError

DOC = Path(__file__).resolve().parent.parent / "docs" / "backbones.md"

INTRO = """\
# Backbones

AnoVL's local path (docs/METHOD.md §2) needs a vision transformer: per block, the value projection, the block's
attention output path and its residual branch. `anovl.backbones` runs it on every tower type below; the
table at the end is written by `benchmarks/backbone_support.py` ({versions}) and claims only what that
script ran.

## How the V-V path is organised

- **Blocks** (`anovl/backbones/value_wise.py`, `BlockOps`): one class per (block, attention) type says
  where the value projection is, what follows the attention (head scales, inner norm, out-projection,
  layer scale or post-norm) and what the MLP residual is. Registered ones:
  open_clip `ResidualAttentionBlock`/`nn.MultiheadAttention` (the reference),
  open_clip `CustomResidualAttentionBlock`/`Attention` (`qk_norm`, `scale_heads`, `scale_attn_inner`,
  `scale_attn`, `scale_fc`), timm `Block`/`Attention` (fused qkv, optional q/k norm), timm EVA
  `EvaBlock` and `EvaBlockPostNorm` with `EvaAttention` or `AttentionRope` (rotary positions, SwiGLU,
  separate or fused q/k/v), timm `RelPosBlock` and `ResPostRelPosBlock` with `RelPosAttention` (a learned
  relative-position bias added to the q·k logits, per block or shared by all blocks).
  A new block type is one `BlockOps` subclass and one `register_block_ops(block, attention, ops)` call.
- **Positions inside the blocks:** rotary positions act on q and k, and a relative-position bias is added
  to q·k; the V-V attention `softmax(v vᵀ/√d) v` replaces those logits, so it sees neither, while the
  original stream keeps them. A token subset (WinCLIP's windows) is run with each token's own position:
  its rows of the rotary table, its rows and columns of the bias.
- **Towers** (`ValueWiseViT` subclasses, listed in `anovl.backbones.ENCODERS`): embedding, prefix
  tokens, pooling head. `OpenClipViT` (open_clip's `VisionTransformer`) and `TimmViT` (open_clip's
  `TimmModel` around a timm `VisionTransformer`, `Eva` or `VisionTransformerRelPos`).
- The choice is made **before any weights are built**: the tower is built on the `meta` device, its
  blocks are looked up, and an unsupported model stops with one error naming it and the reason
  (the CLI prints it as one `anovl: error:` line).

## Towers without a class token: local tokens and the image score

- **Local tokens** enter the text space through the tower's own pooling head applied to each token **as
  if the sequence held that token alone**. For a class-token tower this is docs/METHOD.md §2's
  `ln_post(s) · proj`. For CLIPA's average pool with `final_ln_after_pool` it is the same map (the mean
  of one token is the token). For an attention pool (CoCa's attentional pooler, SigLIP's and PE-Core's
  `AttentionPoolLatent`) the softmax over a single key is 1: the pooled output is the pool's value
  projection, out-projection and whatever follows it (MLP, norms, projection) applied to the token.
  Nothing is learned and no extra weights are used; the tests check this map against the tower's own
  pooling head run on one-token sequences.
- **The image score** is unchanged: the abnormal probability of the tower's own image embedding (its
  pooling of the original stream, equal to `encode_image`), averaged over the views (docs/METHOD.md §4).

## Text towers and tokenizers

- Hugging Face text towers (`hf_model_name`: RoBERTa, XLM-R, mT5, NLLB) need `transformers`
  (`pip install anovl[hf]`; without it the model stops with an error naming the extra). Their config
  comes from the Hugging Face hub: offline, save it to a directory and register a copy of the model
  config whose `text_cfg.hf_model_name` is that directory (`anovl.register_model_config`).
- Hub tokenizers (`hf_tokenizer_name`: SigLIP, SigLIP2, CLIPA, the worldwide models) cannot be fetched
  offline: pass a local tokenizer directory (what `save_pretrained` writes) or its `tokenizer.json` as
  `create_backbone(..., tokenizer=DIR)`; a callable texts → token ids works too. Without one, the model
  stops with an error naming the tokenizer. The sample runs below use open_clip's own tokenizer with
  an enlarged text vocabulary as a stand-in: they check the vision path, not the text tower's tokens.

## open_clip versions

anovl pins `open_clip_torch>=2.24,<4`. open_clip 4 builds its ViTs from its own `Attention` module
instead of `nn.MultiheadAttention`; supporting it is one more `BlockOps` class for that
(block, attention) pair behind the same registry, nothing else changes.

## Benchmark

`benchmarks/backbones.py` prints, per family, the V-V forward ÷ plain `encode_image` time at batch 16
(target ≤ 1.2). On this project's CPU every family meets it, between 1.07 and 1.17 (docs/benchmarks.md);
GPU figures are pending.
"""


def family_of(tower: torch.nn.Module) -> str:
    trunk = getattr(tower, "trunk", tower)
    blocks = getattr(trunk, "blocks", None) or getattr(getattr(trunk, "transformer", None), "resblocks", None)
    if blocks is None:
        return type(trunk).__name__
    block = blocks[-1]
    if hasattr(trunk, "pool_type"):  # open_clip VisionTransformer
        pool = (
            "attentional pooler"
            if trunk.attn_pool is not None
            else {"tok": "class token", "avg": "average"}[trunk.pool_type]
        )
    else:
        pool = "attention pool" if getattr(trunk, "attn_pool", None) is not None else f"{trunk.global_pool} pool"
    stem = (
        f" · {type(trunk.patch_embed).__name__}"
        if type(getattr(trunk, "patch_embed", None)).__name__ == "HybridEmbed"
        else ""
    )
    return f"{type(trunk).__name__} · {type(block).__name__}/{type(block.attn).__name__} · {pool}{stem}"


def run_sample(name: str) -> str:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = register_tiny(name, simple_tokenizer=True)
        size = 4 * create_backbone(tiny).visual.patch_size
        backbone = create_backbone(tiny, image_size=size)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = backbone.visual(images, layers=(0, -1))
        reference = backbone.clip.encode_image(images)
    error = (F.normalize(out.global_tokens, dim=-1) - F.normalize(reference, dim=-1)).abs().max().item()
    shape = "×".join(map(str, out.patch_tokens[-1].shape))
    return f"ran `{name}` (tiny): patch tokens {shape}, global vs encode_image {error:.0e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOC)
    args = parser.parse_args()
    rows, samples = [], {}
    families: dict[str, list[str]] = defaultdict(list)
    for name in sorted(open_clip.list_models(), key=str.lower):
        if name.startswith("anovl-"):
            continue
        config = open_clip.get_model_config(name)
        if isinstance(config["vision_cfg"].get("layers"), (list, tuple)):
            family, reasons = "ModifiedResNet", ["convolutional tower (ModifiedResNet)"]
        else:
            tower = meta_tower(config)
            family, (_, reasons) = family_of(tower), unsupported_reasons(tower)
        text = config["text_cfg"]
        notes = [
            f"HF text tower `{text['hf_model_name']}`" if text.get("hf_model_name") else "",
            f"hub tokenizer `{text['hf_tokenizer_name']}`" if text.get("hf_tokenizer_name") else "",
        ]
        rows.append((name, family, reasons, ", ".join(n for n in notes if n)))
        if not reasons:
            families[family].append(name)
    for family, names in families.items():
        sample = next((n for n in names if not open_clip.get_model_config(n)["text_cfg"].get("hf_model_name")), None)
        if sample is None:
            samples[family] = "not run: every config of this family has a Hugging Face text tower"
            continue
        try:
            samples[family] = run_sample(sample)
        except (AnovlError, RuntimeError, ValueError) as error:
            samples[family] = f"**failed** on `{sample}`: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    versions = (
        f"open_clip {open_clip.__version__}, timm {timm.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
    supported = sum(not reasons for _, _, reasons, _ in rows)
    lines = [
        INTRO.format(versions=versions),
        f"## Support table\n\n{supported} of {len(rows)} configs run the V-V path.\n",
        "### Families (one tiny random-weight sample of each was built and run)\n",
        "| vision tower · block/attention · pooling | configs | sample run |",
        "|---|---|---|",
    ]
    lines += [f"| {family} | {len(names)} | {samples[family]} |" for family, names in families.items()]
    lines += ["", "### Every config\n", "| config | vision tower | V-V path | text side |", "|---|---|---|---|"]
    for name, family, reasons, notes in rows:
        status = (
            "supported (family sample ran)"
            if not reasons and not samples[family].startswith(("**failed", "not run"))
            else ("supported, family sample not run" if not reasons else "no: " + "; ".join(reasons))
        )
        lines.append(f"| `{name}` | {family} | {status} | {notes} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {supported}/{len(rows)} configs supported, {len(families)} families run")


if __name__ == "__main__":
    main()
