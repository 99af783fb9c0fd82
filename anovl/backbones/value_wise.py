"""CLIP's vision transformer with AnoVL's training-free value-wise (V-V) attention path (METHOD §2).

One pass runs CLIP's original stream for every image and, for the first ``num_local`` images, the
local stream ``s_l = s_{l-1} + out_proj(softmax(v vᵀ/√d) v)``, whose attention is fed CLIP's own
(original) stream. The original stream is computed from each block's own weights and is CLIP's
forward unchanged, so the global token equals ``encode_image``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from anovl.errors import AnovlError


@dataclass
class VisualTokens:
    """Encoder outputs, all after CLIP's ``ln_post`` and projection (not normalised)."""

    global_tokens: torch.Tensor  # (B, D): CLIP's image embedding of every input image
    patch_tokens: list[torch.Tensor]  # per requested layer, (num_local, N, D): V-V local patch tokens


def check_supported(visual: nn.Module) -> None:
    """Raise a clear error for vision towers whose blocks the V-V path does not know."""
    if not isinstance(visual, VisionTransformer):
        raise AnovlError(
            f"the V-V path needs an open_clip VisionTransformer, got {type(visual).__name__}; "
            "choose a ViT backbone such as ViT-B-16-plus-240"
        )
    unsupported = []
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        unsupported.append("pooling other than the class token")
    if visual.proj is None:
        unsupported.append("no output projection")
    if not isinstance(visual.patch_dropout, nn.Identity):
        unsupported.append("patch dropout")
    for block in visual.transformer.resblocks:
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
            unsupported.append(f"block type {type(block).__name__}")
            break
        if not block.attn._qkv_same_embed_dim or block.attn.in_proj_bias is None:
            unsupported.append("attention without a fused, biased in-projection")
            break
    if unsupported:
        raise AnovlError(f"backbone not supported by the V-V path: {', '.join(unsupported)}")


class ValueWiseViT(nn.Module):
    """Frozen open_clip ``VisionTransformer`` with the dual (original + value-wise) path."""

    def __init__(self, visual: VisionTransformer):
        super().__init__()
        check_supported(visual)
        self.visual = visual
        self.patch_size = visual.patch_size[0]
        self.num_layers = len(visual.transformer.resblocks)

    def grid_size(self, image_size: int) -> int:
        return image_size // self.patch_size

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(tokens) @ self.visual.proj

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in :meth:`embed`'s output (the class token)."""
        return 1

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Input tokens of the first block (B, prefix + N, width): patch, class and position embeddings.

        Every step here acts on each token alone, so a subset of these tokens equals the embedding of that
        subset (what window scoring such as WinCLIP's needs).
        """
        return self.visual._embeds(images)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding (B, D) of any token sequence from :meth:`embed` (prefix tokens first):
        the plain forward of the blocks, then the tower's pooling and projection."""
        for block in self.visual.transformer.resblocks:
            tokens = block(tokens)
        return self._project(tokens[:, 0])

    @staticmethod
    def _dual_attention(block: ResidualAttentionBlock, x: torch.Tensor, num_local: int):
        """Original attention for all of ``x`` and V-V attention for its first ``num_local`` rows.

        Both come from one in-projection and one fused attention call over the stacked queries.
        """
        attn = block.attn
        batch, length, width = x.shape
        heads = attn.num_heads
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        v_local = v[:num_local]
        mixed = F.scaled_dot_product_attention(
            torch.cat([q, v_local]), torch.cat([k, v_local]), torch.cat([v, v_local])
        )
        mixed = attn.out_proj(mixed.transpose(1, 2).reshape(-1, length, width))
        return mixed[:batch], mixed[batch:]

    def forward(
        self, images: torch.Tensor, num_local: int | None = None, layers: Sequence[int] = (-1,),
        chunk_size: int | None = None,
    ) -> VisualTokens:
        """Encode ``images``; the first ``num_local`` (default: all) also get V-V patch tokens.

        ``layers`` are block indices (negative from the end) whose local stream is returned.
        ``chunk_size`` caps the images per pass (None: all in one); results are the same either way.
        """
        num_local = images.shape[0] if num_local is None else num_local
        wanted = sorted({layer % self.num_layers for layer in layers})
        if chunk_size and images.shape[0] > chunk_size:
            parts = [self.forward(images[start:start + chunk_size], min(max(num_local - start, 0), chunk_size), layers)
                     for start in range(0, images.shape[0], chunk_size)]
            return VisualTokens(
                global_tokens=torch.cat([part.global_tokens for part in parts]),
                patch_tokens=[torch.cat([part.patch_tokens[i] for part in parts if part.patch_tokens])
                              for i in range(len(wanted))] if num_local else [],
            )
        visual = self.visual
        h = visual._embeds(images)
        if not visual.transformer.batch_first:
            raise AnovlError("the V-V path needs a batch-first open_clip transformer (open_clip >= 2.24)")
        s = h[:num_local]
        patch_tokens = []
        for index, block in enumerate(visual.transformer.resblocks):
            if num_local and index <= wanted[-1]:
                a_ori, a_vv = self._dual_attention(block, h, num_local)
                s = s + block.ls_1(a_vv)
            else:
                a_ori = block.attention(block.ln_1(h))
            h = h + block.ls_1(a_ori)
            h = h + block.ls_2(block.mlp(block.ln_2(h)))
            if num_local and index in wanted:
                patch_tokens.append(self._project(s[:, 1:]))
        return VisualTokens(global_tokens=self._project(h[:, 0]), patch_tokens=patch_tokens)
