"""timm vision transformers inside open_clip's ``TimmModel``: ``VisionTransformer``, ``Eva`` and
``VisionTransformerRelPos`` trunks.

Blocks: timm ``Block`` with ``Attention`` (fused qkv, optional q/k norm and attention-output norm),
EVA blocks (``EvaBlock``, ``EvaBlockPostNorm``) with ``EvaAttention`` or ``AttentionRope`` (rotary
positions on q and k, separate or fused q/k/v, SwiGLU MLPs), and relative-position blocks
(``RelPosBlock``, ``ResPostRelPosBlock``) with ``RelPosAttention`` (a learned bias per head and token
pair added to the q·k logits). Both kinds of position belong to the q·k logits, which the V-V attention
``softmax(v vᵀ/√d) v`` replaces, so it does not see them.

Pooling heads: the trunk's final norm, its pool (class token, average or the SigLIP/PE attention pool
``AttentionPoolLatent``), ``fc_norm``, its classifier-as-projection and open_clip's projection head.
Local tokens take the same head per token; an attention pool acts on each token as on a one-token sequence
(its value path, out-projection and MLP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from open_clip.timm_model import TimmModel
from timm.layers import apply_rot_embed_cat
from timm.layers.attention import Attention, AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer_relpos import (
    RelPosAttention,
    RelPosBlock,
    ResPostRelPosBlock,
    VisionTransformerRelPos,
)
from torch import nn
from torch.nn import functional as F

from anovl.backbones.value_wise import BlockOps, ValueWiseViT, register_block_ops, register_encoder
from anovl.errors import AnovlError


class TimmBlockOps(BlockOps):
    """timm ``Block``: norm1 → attention → layer scale; norm2 → MLP → layer scale."""

    def unsupported(self, block) -> str | None:
        if getattr(block.attn, "gate", None) is not None:
            return "gated attention"
        return None

    def attention_input(self, block, x):
        return block.norm1(x)

    def qkv(self, block, y, rope, num_prefix):
        attn = block.attn
        batch, length, _ = y.shape
        if attn.qkv is not None:
            q_bias = getattr(attn, "q_bias", None)
            if q_bias is None:
                qkv = attn.qkv(y)
            else:  # EVA keeps a zero k bias outside the fused projection
                qkv = nn.functional.linear(y, attn.qkv.weight, torch.cat((q_bias, attn.k_bias, attn.v_bias)))
            q, k, v = qkv.reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
            q = attn.q_proj(y).reshape(batch, length, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(y).reshape(batch, length, kv_heads, -1).transpose(1, 2)
            v = attn.v_proj(y).reshape(batch, length, kv_heads, -1).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            half = getattr(attn, "rotate_half", False)
            q = torch.cat(
                [q[:, :, :num_prefix], apply_rot_embed_cat(q[:, :, num_prefix:], rope, half=half)], 2
            ).type_as(v)
            k = torch.cat(
                [k[:, :, :num_prefix], apply_rot_embed_cat(k[:, :, num_prefix:], rope, half=half)], 2
            ).type_as(v)
        groups = getattr(attn, "num_kv_groups", 1)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return q, k, v

    def out(self, block, attended):
        batch, heads, length, head_dim = attended.shape
        return block.attn.proj(block.attn.norm(attended.transpose(1, 2).reshape(batch, length, heads * head_dim)))

    def branch(self, block, a):
        return block.ls1(a)

    def mlp_residual(self, block, x):
        return x + block.ls2(block.mlp(block.norm2(x)))


class EvaBlockOps(TimmBlockOps):
    """``EvaBlock``: as timm's, with optional ``gamma_1/gamma_2`` layer scales."""

    def branch(self, block, a):
        return a if block.gamma_1 is None else block.gamma_1 * a

    def mlp_residual(self, block, x):
        mlp = block.mlp(block.norm2(x))
        return x + (mlp if block.gamma_2 is None else block.gamma_2 * mlp)


class PostNormMixin:
    """Residual post-norm blocks: attention on the raw stream, its output normalised (norm1) before the
    residual, and the MLP's output normalised (norm2)."""

    def attention_input(self, block, x):
        return x

    def branch(self, block, a):
        return block.norm1(a)

    def mlp_residual(self, block, x):
        return x + block.norm2(block.mlp(x))


class EvaPostNormOps(PostNormMixin, TimmBlockOps):
    """``EvaBlockPostNorm``."""


@dataclass
class RelativePositions:
    """The positions of relative-position blocks: the tokens' indices into the bias, (L,) for every sequence
    or (S, L) one row per sequence (None: the whole sequence in order; a subset such as WinCLIP's windows
    keeps each token's own position), and the trunk's bias shared across blocks (None: each block has its own)."""

    token_index: torch.Tensor | None
    shared_bias: torch.Tensor | None


class RelPosOps(TimmBlockOps):
    """``RelPosBlock``: timm's ``Block`` with a relative-position bias on the q·k logits and no inner norm."""

    def qkv(self, block, y, positions, num_prefix):
        return super().qkv(block, y, None, num_prefix)

    def attention_bias(self, block, positions: RelativePositions):
        rel_pos = block.attn.rel_pos
        bias = positions.shared_bias if rel_pos is None else rel_pos.get_bias()
        index = positions.token_index
        if bias is None or index is None:
            return bias
        index = index.reshape(-1, index.shape[-1])  # (S, L); S = 1 for one index of every sequence
        return bias[0][:, index[:, :, None], index[:, None, :]].transpose(0, 1)  # (S, heads, L, L)

    def out(self, block, attended):
        batch, heads, length, head_dim = attended.shape
        return block.attn.proj(attended.transpose(1, 2).reshape(batch, length, heads * head_dim))

    def forward(self, block, x, positions: RelativePositions):
        if positions.token_index is None:
            return block(x, shared_rel_pos=positions.shared_bias)
        q, k, v = self.qkv(block, self.attention_input(block, x), None, 0)
        bias = self.attention_bias(block, positions)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.mlp_residual(block, x + self.branch(block, self.out(block, attended)))


class ResPostRelPosOps(PostNormMixin, RelPosOps):
    """``ResPostRelPosBlock``."""


register_block_ops(Block, Attention, TimmBlockOps())
for _attention in (EvaAttention, AttentionRope):
    register_block_ops(EvaBlock, _attention, EvaBlockOps())
    register_block_ops(EvaBlockPostNorm, _attention, EvaPostNormOps())
register_block_ops(RelPosBlock, RelPosAttention, RelPosOps())
register_block_ops(ResPostRelPosBlock, RelPosAttention, ResPostRelPosOps())


@register_encoder("timm")
class TimmViT(ValueWiseViT):
    """open_clip ``TimmModel`` around a timm ``VisionTransformer``, ``Eva`` or ``VisionTransformerRelPos`` trunk."""

    visual: TimmModel  # the tower it wraps (the base class knows only an nn.Module)

    def __init__(self, tower: TimmModel):
        super().__init__(tower, tower.trunk.blocks)
        self.grid = tuple(tower.trunk.patch_embed.grid_size)

    @classmethod
    def unsupported(cls, tower: nn.Module) -> list[str] | None:
        if not isinstance(tower, TimmModel) or not isinstance(
            tower.trunk, (VisionTransformer, Eva, VisionTransformerRelPos)
        ):
            return None
        trunk, reasons = tower.trunk, []
        if getattr(trunk, "rope_mixed", False):
            reasons.append("depth-dependent (mixed) rotary embeddings")
        if getattr(trunk, "dynamic_img_size", False):
            reasons.append("dynamic image size")
        attn_pool = getattr(trunk, "attn_pool", None)
        if attn_pool is not None and getattr(attn_pool, "pos_embed", None) is not None:
            reasons.append("an attention pool with its own position embedding")
        grid = cast(tuple[int, int], trunk.patch_embed.grid_size)  # torch types a submodule's attributes loosely
        if grid[0] != grid[1] or tower.image_size[0] != tower.image_size[1]:
            reasons.append("a non-square patch grid")
        return reasons

    @classmethod
    def patch_size_of(cls, tower):
        # Hybrid stems (ViTamin, MobileCLIP-B) have no single patch kernel: the stride from pixels to tokens.
        return tower.image_size[0] // tower.trunk.patch_embed.grid_size[0]

    @property
    def num_prefix_tokens(self) -> int:
        return self.visual.trunk.num_prefix_tokens

    def _embed(self, images):
        trunk = self.visual.trunk
        tokens = trunk.patch_embed(images)
        if isinstance(trunk, VisionTransformerRelPos):  # no position embedding: the blocks' bias places tokens
            if trunk.cls_token is not None:
                tokens = torch.cat((trunk.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
            return tokens, self._relative_positions(None)
        if isinstance(trunk, Eva):
            tokens, rope = trunk._pos_embed(tokens)
        else:
            tokens, rope = trunk.patch_drop(trunk._pos_embed(tokens)), None
        return trunk.norm_pre(tokens), rope

    @property
    def positions_in_blocks(self):
        trunk = self.visual.trunk
        return getattr(trunk, "rope", None) is not None or isinstance(trunk, VisionTransformerRelPos)

    def _positions(self, patch_positions, num_patches):
        if not self.positions_in_blocks:
            return None
        grid_patches = self.grid[0] * self.grid[1]
        if patch_positions is None and num_patches != grid_patches:
            kind = (
                "a relative-position bias"
                if isinstance(self.visual.trunk, VisionTransformerRelPos)
                else "rotary positions"
            )
            raise AnovlError(
                f"this tower applies positions inside its blocks ({kind}): give the patch_positions "
                f"of the {num_patches} patch tokens (of {grid_patches})"
            )
        rope_module = getattr(self.visual.trunk, "rope", None)
        if rope_module is not None:
            rope = (
                rope_module.get_embed()
                if hasattr(rope_module, "feat_shape")
                else rope_module.get_embed(shape=self.grid)
            )
            if patch_positions is None:
                return rope
            rows = rope[patch_positions.to(rope.device)]
            return rows if patch_positions.dim() == 1 else rows.unsqueeze(1)  # (S, 1, K, dim): over the heads
        if patch_positions is None:
            return self._relative_positions(None)
        patch_positions = patch_positions.to(self.device)
        prefix = torch.arange(self.num_prefix_tokens, device=self.device).expand(*patch_positions.shape[:-1], -1)
        return self._relative_positions(torch.cat([prefix, self.num_prefix_tokens + patch_positions], dim=-1))

    def _relative_positions(self, token_index):
        shared = self.visual.trunk.shared_rel_pos
        return RelativePositions(token_index, None if shared is None else shared.get_bias())

    def pool(self, tokens, final_norm=True):
        trunk = self.visual.trunk
        return self.visual.head(trunk.forward_head(trunk.norm(tokens) if final_norm else tokens))

    def project_local(self, patch_tokens):
        trunk = self.visual.trunk
        tokens = trunk.norm(patch_tokens)
        pool = getattr(trunk, "attn_pool", None)
        if pool is not None:
            # One key: every latent query's output is that key's value, so q, k and the softmax drop out.
            inner = pool.kv.out_features // 2
            bias = None if pool.kv.bias is None else pool.kv.bias[inner:]
            tokens = pool.proj(F.linear(tokens, pool.kv.weight[inner:], bias))
            if pool.mlp is not None:
                tokens = tokens + pool.mlp(pool.norm(tokens))
        return self.visual.head(trunk.head(trunk.fc_norm(tokens)))
