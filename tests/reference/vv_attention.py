"""Oracles of the value-wise (V-V) local path (docs/METHOD.md §2), from each block's own weights.

:func:`naive_local_streams` writes the local stream of open_clip's reference ViT out token by token (loops over
images, heads and tokens; tests/test_backbone.py). :func:`naive_local_tokens` does it per block type for every
tower family anovl supports (open_clip's standard and custom blocks, timm's ViT, EVA and relative-position
blocks), with the tower's own embedding, blocks and pooling head (tests/test_backbones_families.py). They
import torch and open_clip only: keep them independent of anovl.backbones.
"""

from __future__ import annotations

import math

import torch
from open_clip.timm_model import TimmModel


def naive_local_streams(visual, images: torch.Tensor) -> list[torch.Tensor]:
    """docs/METHOD.md §2 written out token by token for an open_clip ``VisionTransformer`` ``visual``: returns
    the local stream s_l after every block."""
    h = visual._embeds(images)
    s = h.clone()
    streams = []
    for block in visual.transformer.resblocks:
        attn = block.attn
        heads, width = attn.num_heads, h.shape[-1]
        d_head = width // heads
        y = block.ln_1(h)
        v = y @ attn.in_proj_weight[2 * width :].T + attn.in_proj_bias[2 * width :]
        a_vv = torch.zeros_like(h)
        for b in range(h.shape[0]):
            head_outputs = []
            for head in range(heads):
                vh = v[b, :, head * d_head : (head + 1) * d_head]
                rows = []
                for i in range(vh.shape[0]):
                    scores = torch.stack([vh[i] @ vh[j] for j in range(vh.shape[0])]) / math.sqrt(d_head)
                    weights = scores.exp() / scores.exp().sum()
                    rows.append((weights[:, None] * vh).sum(0))
                head_outputs.append(torch.stack(rows))
            a_vv[b] = attn.out_proj(torch.cat(head_outputs, -1))
        s = s + a_vv
        h = block(h)  # CLIP's own block: the V-V attention is fed the original stream
        streams.append(s)
    return streams


def naive_value_attention(v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(v vᵀ/√d) v per head, written out; v (B, L, heads·d) → (B, L, heads·d)."""
    batch, length, width = v.shape
    d = width // heads
    per_head = v.reshape(batch, length, heads, d).transpose(1, 2)
    weights = torch.softmax(per_head @ per_head.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ per_head).transpose(1, 2).reshape(batch, length, width)


def naive_vv_branch(block, x: torch.Tensor) -> torch.Tensor:
    """The block's V-V residual branch: its value projection, V-V attention, its output path."""
    kind = type(block).__name__
    attn = block.attn
    if kind == "ResidualAttentionBlock":
        width = x.shape[-1]
        v = block.ln_1(x) @ attn.in_proj_weight[2 * width :].T + attn.in_proj_bias[2 * width :]
        return block.ls_1(attn.out_proj(naive_value_attention(v, attn.num_heads)))
    if kind == "CustomResidualAttentionBlock":
        width = x.shape[-1]
        v = block.ln_1(x) @ attn.in_proj_weight[2 * width :].T + attn.in_proj_bias[2 * width :]
        out = naive_value_attention(v, attn.num_heads)
        if attn.head_scale is not None:
            batch, length, _ = out.shape
            out = (out.reshape(batch, length, attn.num_heads, -1) * attn.head_scale.reshape(1, 1, -1, 1)).reshape(
                out.shape
            )
        return block.ls_1(block.ln_attn(attn.out_proj(attn.ln_inner(out))))
    post_norm = kind in ("EvaBlockPostNorm", "ResPostRelPosBlock")
    y = x if post_norm else block.norm1(x)
    if attn.qkv is not None:
        v_bias = getattr(attn, "v_bias", None)
        width = attn.qkv.weight.shape[0] // 3
        v = y @ attn.qkv.weight[2 * width :].T
        bias = v_bias if v_bias is not None else (attn.qkv.bias[2 * width :] if attn.qkv.bias is not None else None)
        v = v + bias if bias is not None else v
    else:
        v = attn.v_proj(y)
    out = naive_value_attention(v, attn.num_heads)  # no relative-position bias: it belongs to q·k
    out = attn.proj(attn.norm(out) if hasattr(attn, "norm") else out)
    if kind in ("Block", "RelPosBlock"):
        return block.ls1(out)
    if post_norm:
        return block.norm1(out)
    return out if block.gamma_1 is None else block.gamma_1 * out


def tower_parts(visual):
    """(embed → (tokens, the blocks' keyword arguments), blocks, number of prefix tokens, pooling head on a
    token sequence)."""
    if isinstance(visual, TimmModel):
        trunk = visual.trunk

        def embed(images):
            x = trunk.patch_embed(images)
            if not hasattr(trunk, "_pos_embed"):  # relative positions: a class token at most, bias in the blocks
                prefix = [] if trunk.cls_token is None else [trunk.cls_token.expand(x.shape[0], -1, -1)]
                shared = trunk.shared_rel_pos
                return torch.cat([*prefix, x], 1), {} if shared is None else {"shared_rel_pos": shared.get_bias()}
            out = trunk._pos_embed(x)
            x, rope = out if isinstance(out, tuple) else (out, None)
            return trunk.norm_pre(x), {} if rope is None else {"rope": rope}

        return (
            embed,
            list(trunk.blocks),
            trunk.num_prefix_tokens,
            lambda x: visual.head(trunk.forward_head(trunk.norm(x))),
        )

    def pool(x):
        return visual._pool(x)[0] @ visual.proj

    return (lambda images: (visual._embeds(images), {})), list(visual.transformer.resblocks), 1, pool


def naive_local_tokens(visual, images, start=0):
    """Local tokens after every block, each projected as the tower's head sees one token alone.

    ``start``: the block where the local stream branches off the original one (AnomalyCLIP's DPAM); before it
    the local stream is the original stream.
    """
    embed, blocks, prefix, pool = tower_parts(visual)
    h, block_kwargs = embed(images)
    projected = []
    for index, block in enumerate(blocks):
        if index == start:
            s = h.clone()
        if index >= start:
            s = s + naive_vv_branch(block, h)
        h = block(h, **block_kwargs)
        patches = (s if index >= start else h)[:, prefix:]
        batch, count, width = patches.shape
        alone = patches.reshape(batch * count, 1, width)
        # the sequence holds the token alone: in every slot (class token, prefix, patch)
        if getattr(visual, "attn_pool", None) is None:
            alone = alone.expand(-1, prefix + 1, -1)
        projected.append(pool(alone).reshape(batch, count, -1))
    return projected
