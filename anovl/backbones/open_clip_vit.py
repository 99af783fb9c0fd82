"""open_clip's own ``VisionTransformer``: its two block types and its pooling heads.

- ``ResidualAttentionBlock`` with ``nn.MultiheadAttention`` (the reference block of docs/METHOD.md §2);
- ``CustomResidualAttentionBlock`` with open_clip's ``Attention`` (``qk_norm``, head scales, inner and
  post-attention norms, a normed MLP), chosen by open_clip when a config asks for those options.

Pooling heads: the class token (``ln_post · proj``), CLIPA's average pool with ``final_ln_after_pool``
(the same per-token map) and CoCa's attentional pooler, whose single-key output is
``out_proj(W_v · ln_k(x) + b_v)`` for every query, before ``ln_post · proj``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock, VisionTransformer
from torch import nn

from anovl.backbones.value_wise import BlockOps, ValueWiseViT, register_block_ops, register_encoder


def _split_heads(qkv: torch.Tensor, heads: int):
    batch, length, width3 = qkv.shape
    return qkv.view(batch, length, 3, heads, width3 // (3 * heads)).permute(2, 0, 3, 1, 4)


class MultiheadAttentionOps(BlockOps):
    """``ResidualAttentionBlock``: LN → fused in-projection → MHA → out_proj → layer scale; LN → MLP."""

    def unsupported(self, block: ResidualAttentionBlock) -> str | None:
        attn = block.attn
        if not attn._qkv_same_embed_dim or attn.in_proj_bias is None:
            return "attention without a fused, biased in-projection"
        if not attn.batch_first:
            return "a sequence-first transformer (the V-V path needs open_clip >= 2.24)"
        return None

    def attention_input(self, block, x):
        return block.ln_1(x)

    def qkv(self, block, y, positions, num_prefix):
        attn = block.attn
        return _split_heads(F.linear(y, attn.in_proj_weight, attn.in_proj_bias), attn.num_heads)

    def out(self, block, attended):
        batch, heads, length, head_dim = attended.shape
        return block.attn.out_proj(attended.transpose(1, 2).reshape(batch, length, heads * head_dim))

    def branch(self, block, a):
        return block.ls_1(a)

    def mlp_residual(self, block, x):
        return x + block.ls_2(block.mlp(block.ln_2(x)))


class CustomAttentionOps(MultiheadAttentionOps):
    """``CustomResidualAttentionBlock`` with open_clip's ``Attention``: q/k norms or scaled cosine logits,
    per-head output scales, an inner norm and a norm after the attention (all from the block's weights)."""

    def unsupported(self, block: CustomResidualAttentionBlock) -> str | None:
        if block.attn.logit_scale is not None:
            return "scaled cosine attention (open_clip's own forward of it fails on batched heads)"
        return None if block.attn.in_proj_bias is not None else "attention without an in-projection bias"

    def qkv(self, block, y, positions, num_prefix):
        attn = block.attn
        q, k, v = _split_heads(F.linear(y, attn.in_proj_weight, attn.in_proj_bias), attn.num_heads)
        return attn.ln_q(q), attn.ln_k(k), v

    def out(self, block, attended):
        attn = block.attn
        if attn.head_scale is not None:
            attended = attended * attn.head_scale
        batch, heads, length, head_dim = attended.shape
        return attn.out_proj(attn.ln_inner(attended.transpose(1, 2).reshape(batch, length, heads * head_dim)))

    def branch(self, block, a):
        return block.ls_1(block.ln_attn(a))


register_block_ops(ResidualAttentionBlock, nn.MultiheadAttention, MultiheadAttentionOps())
register_block_ops(CustomResidualAttentionBlock, Attention, CustomAttentionOps())


@register_encoder("open_clip")
class OpenClipViT(ValueWiseViT):
    """open_clip ``VisionTransformer`` (class-token, CLIPA average and CoCa attentional pooling)."""

    visual: VisionTransformer  # the tower it wraps (the base class knows only an nn.Module)

    def __init__(self, visual: VisionTransformer):
        super().__init__(visual, visual.transformer.resblocks)
        # The reference head keeps its exact op order: LN of the class token alone, then the projection.
        self._class_token_head = (
            visual.attn_pool is None and visual.pool_type == "tok" and not visual.final_ln_after_pool
        )

    @classmethod
    def unsupported(cls, tower: nn.Module) -> list[str] | None:
        if not isinstance(tower, VisionTransformer):
            return None
        reasons = []
        if tower.proj is None:
            reasons.append("no output projection")
        if tower.pool_type == "none" and tower.attn_pool is None:
            reasons.append("no pooling (pool_type 'none')")
        if getattr(tower, "attn_pool_contrastive", None) is not None:
            reasons.append(f"the {tower.attn_pool_type!r} attentional pooler")
        if tower.patch_size[0] != tower.patch_size[1]:
            reasons.append("non-square patches")
        return reasons

    @classmethod
    def patch_size_of(cls, tower):
        return tower.patch_size[0]

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    def _embed(self, images):
        return self.visual._embeds(images), None

    def pool(self, tokens, final_norm=True):
        if not final_norm:
            visual = self.visual
            pooled, _ = visual._global_pool(visual.attn_pool(tokens) if visual.attn_pool is not None else tokens)
            return pooled @ visual.proj
        if self._class_token_head:
            return self.project_local(tokens[:, 0])
        pooled, _ = self.visual._pool(tokens)
        return pooled @ self.visual.proj

    def project_local(self, patch_tokens):
        visual = self.visual
        if visual.attn_pool is not None:
            pooler = visual.attn_pool
            mha = pooler.attn
            # one key: every query's output is the value path of that key
            v_weight = mha.in_proj_weight[2 * mha.embed_dim :] if mha._qkv_same_embed_dim else mha.v_proj_weight
            v_bias = None if mha.in_proj_bias is None else mha.in_proj_bias[2 * mha.embed_dim :]
            patch_tokens = mha.out_proj(F.linear(pooler.ln_k(patch_tokens), v_weight, v_bias))
        return visual.ln_post(patch_tokens) @ visual.proj
