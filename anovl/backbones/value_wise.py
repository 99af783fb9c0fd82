"""The training-free value-wise (V-V) path of AnoVL (docs/METHOD.md §2), for any vision transformer.

One pass runs the tower's original stream for every image and, for the first ``num_local`` images, the
local stream ``s_l = s_{l-1} + branch(out(softmax(v vᵀ/√d) v))``, whose attention is fed the tower's own
(original) stream. The original stream is the tower's forward unchanged, so the global token equals
``encode_image``.

Two things vary between towers and are kept apart here:

- **how a block computes attention** (:class:`BlockOps`, registered per block and attention type in
  :data:`BLOCK_OPS`): where its value projection is, what follows the attention (head scales, inner
  norms, out-projection, layer scale), and its MLP;
- **how a tower embeds images and pools tokens** (subclasses of :class:`ValueWiseViT`): patch and
  position embedding (or the positions its blocks apply: rotary tables, relative-position bias), and
  the pooling head that maps tokens into the text space.

Local tokens enter the text space through the tower's pooling head applied to each token **as if the
sequence held that token alone** (docs/backbones.md): for a class-token tower that is ``ln_post · proj``
per token (METHOD §2); for average pooling the same; for an attention pool the softmax over a single
key is 1, so the pooled output is the pool's value path, its out-projection and whatever follows (MLP,
norm, projection) applied to the token. The image score keeps using the tower's own global embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anovl.errors import AnovlError
from anovl.registry import Registry


@dataclass
class VisualTokens:
    """Encoder outputs, both in the text space (not normalised)."""

    global_tokens: torch.Tensor  # (B, D): the tower's image embedding of every input image
    patch_tokens: list[torch.Tensor]  # per requested layer, (num_local, N, D): V-V local patch tokens


# What a tower's blocks need to place tokens, beyond the tokens themselves: None (positions are in the tokens), a
# rotary table (a tensor), or a tower's own record (timm's relative positions); each tower's BlockOps reads its own.
Positions = Any


class BlockOps:
    """How one block type computes attention, split so the V-V attention can reuse the block's weights.

    A block's forward is ``x + branch(out(attn(q, k, v)))`` with ``q, k, v = qkv(attention_input(x))``,
    then ``mlp_residual``. Subclasses describe one (block, attention) pair; register them in BLOCK_OPS.
    """

    def unsupported(self, block: nn.Module) -> str | None:
        """Why this block cannot run the V-V path (None: it can)."""
        return None

    def attention_input(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def qkv(
        self, block: nn.Module, y: torch.Tensor, positions: Positions, num_prefix: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v), each (B, heads, L, head_dim); q scaled so that SDPA's default 1/√d gives the block's logits.

        ``positions``: what the tower's ``_embed`` or ``_positions`` gave for these tokens (the rotary table
        of rotary towers, the token indices and shared bias of relative-position towers; None for towers
        whose positions are in the tokens).
        """
        raise NotImplementedError

    def attention_bias(self, block: nn.Module, positions: Positions) -> torch.Tensor | None:
        """An additive bias on the block's q·k logits (relative positions), (1, heads, L, L); None: none."""
        return None

    def out(self, block: nn.Module, attended: torch.Tensor) -> torch.Tensor:
        """(B, heads, L, head_dim) attention result → (B, L, width) through the block's output path."""
        raise NotImplementedError

    def branch(self, block: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """The attention residual branch after ``out`` (layer scale, post-norm)."""
        raise NotImplementedError

    def mlp_residual(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, block: nn.Module, x: torch.Tensor, positions: Positions) -> torch.Tensor:
        """The block's own forward (the original stream)."""
        return block(x) if positions is None else block(x, rope=positions)

    def dual_attention(
        self, block: nn.Module, x: torch.Tensor, num_local: int, positions: Positions, num_prefix: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Original attention for all of ``x`` and V-V attention for its first ``num_local`` rows.

        Both come from one in-projection. They run as two attention calls: stacking them into one costs
        copies that outweigh the saved call (benchmarks/backbones.py, on the CPU).
        """
        q, k, v = self.qkv(block, self.attention_input(block, x), positions, num_prefix)
        bias = self.attention_bias(block, positions)
        original = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        v_local = v[:num_local]
        # The V-V attention replaces the q·k logits, so what is added to them (a relative bias) stays out.
        value_wise = F.scaled_dot_product_attention(v_local, v_local, v_local)
        return self.out(block, original), self.out(block, value_wise)


# (block type, attention module type) → how to run it; filled by the tower modules.
BLOCK_OPS: Registry[tuple[type, type], BlockOps] = Registry("BlockOps", "register_block_ops(block, attention, ops)")


def register_block_ops(block_type: type, attention_type: type, ops: BlockOps) -> None:
    """Teach the V-V path a new block type: one :class:`BlockOps` per (block, attention) pair."""
    BLOCK_OPS.register((block_type, attention_type), ops)


def block_ops_for(blocks: Sequence[nn.Module]) -> tuple[list[BlockOps], list[str]]:
    """The ops of every block, and the reasons (if any) why some block cannot run the V-V path."""
    ops, reasons = [], []
    for block in blocks:
        found = BLOCK_OPS.get((type(block), type(getattr(block, "attn", None))))
        if found is None:
            reasons.append(
                f"blocks of type {type(block).__name__} with attention {type(getattr(block, 'attn', None)).__name__}"
            )
            break
        reason = found.unsupported(block)
        if reason:
            reasons.append(reason)
            break
        ops.append(found)
    return ops, reasons


class TowerEncoder(Protocol):
    """A registered :class:`ValueWiseViT` subclass: built from the tower alone (it finds its own blocks)."""

    def __call__(self, tower: nn.Module, /) -> ValueWiseViT: ...

    def unsupported(self, tower: nn.Module) -> list[str] | None: ...

    def patch_size_of(self, tower: nn.Module) -> int: ...


# Tower encoders by name, tried in registration order; a new tower type is one more registered subclass.
ENCODERS: Registry[str, TowerEncoder] = Registry("tower encoder", "@register_encoder(name)")
register_encoder = ENCODERS.decorator


class ValueWiseViT(nn.Module):
    """A frozen vision tower with the dual (original + value-wise) path; one subclass per tower type.

    Subclasses give the blocks, the embedding, the pooling head and the per-token projection.
    """

    def __init__(self, tower: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.visual = tower
        self.blocks = tuple(blocks)  # a tuple: the blocks are registered once, under ``visual``
        self.block_ops, block_reasons = block_ops_for(blocks)
        reasons = [*(self.unsupported(tower) or []), *block_reasons]
        if reasons:
            raise AnovlError(f"backbone not supported by the V-V path: {', '.join(reasons)}")
        self.num_layers = len(blocks)
        self.patch_size = self.patch_size_of(tower)

    @classmethod
    def unsupported(cls, tower: nn.Module) -> list[str] | None:
        """None if this class does not handle ``tower``; else the reasons it cannot (empty: it can)."""
        raise NotImplementedError

    @classmethod
    def patch_size_of(cls, tower: nn.Module) -> int:
        """Pixels per token side (works on a ``meta``-device tower)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    def grid_size(self, image_size: int) -> int:
        return image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in :meth:`embed`'s output (class and register tokens)."""
        raise NotImplementedError

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Positions]:
        """Input tokens of the first block, and the positions its blocks apply to all of them (None for
        towers whose positions are in the tokens)."""
        raise NotImplementedError

    def _positions(self, patch_positions: torch.Tensor | None, num_patches: int) -> Positions:
        """The positions the blocks apply to the prefix tokens and the given patches (None: all patches)."""
        return None

    @property
    def positions_in_blocks(self) -> bool:
        """Positions are applied inside the blocks (rotary, relative-position bias): :meth:`encode_tokens`
        of a token subset needs the subset's patch positions."""
        return False

    def pool(self, tokens: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """The tower's image embedding (B, D) from the last block's tokens: its own pooling head.

        ``final_norm=False`` leaves out the tower's last norm before pooling (``ln_post``, the trunk's
        ``norm``), as AnomalyCLIP's image embedding does (docs/METHOD.md, AnomalyCLIP).
        """
        raise NotImplementedError

    def project_local(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, width) → (B, N, D): the pooling head applied to each token as a one-token sequence."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Input tokens of the first block (B, prefix + N, width): patch, prefix and position embeddings.

        For towers with learned or fixed position embeddings, a subset of these tokens equals the
        embedding of that subset (what window scoring such as WinCLIP's needs); towers whose blocks apply
        the positions (:attr:`positions_in_blocks`) need the patches' positions in :meth:`encode_tokens`.
        """
        return self._embed(images)[0]

    def encode_tokens(self, tokens: torch.Tensor, patch_positions: torch.Tensor | None = None) -> torch.Tensor:
        """The tower's image embedding (B, D) of any token sequence from :meth:`embed` (prefix tokens
        first): the plain forward of the blocks, then the tower's pooling and projection.

        ``patch_positions`` (K,), or (B, K) one row per sequence: grid indices (row-major) of the K patch
        tokens after the prefix; needed only by towers with :attr:`positions_in_blocks` when ``tokens`` is a
        subset.
        """
        positions = self._positions(patch_positions, tokens.shape[1] - self.num_prefix_tokens)
        for ops, block in zip(self.block_ops, self.blocks):
            tokens = ops.forward(block, tokens, positions)
        return self.pool(tokens)

    def vv_tokens(
        self, images: torch.Tensor, layers: Sequence[int] = (-1,), chunk_size: int | None = None
    ) -> list[torch.Tensor]:
        """V-V patch tokens (B, N, D) in the text space, one per requested block (in block order, each once)."""
        return self.forward(images, layers=layers, chunk_size=chunk_size).patch_tokens

    def plain_tokens(
        self, images: torch.Tensor, layers: Sequence[int] = (-1,), project: bool = True
    ) -> list[torch.Tensor]:
        """The tower's ordinary (not V-V) patch tokens after each requested block (in block order, each once):
        (B, N, D) in the text space, each token through the pooling head as a one-token sequence (as V-V tokens
        are, :meth:`project_local`), or (B, N, width) as the block gives them with ``project=False``. The blocks
        after the last requested one are not run."""
        return self._plain_forward(images, layers, project, all_blocks=False)[1]

    def forward_intermediates(
        self, images: torch.Tensor, layers: Sequence[int] = (-1,), project: bool = True
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The tower's plain forward, as timm's ``forward_intermediates``: its image embedding (B, D) (what
        ``encode_image`` gives) and the :meth:`plain_tokens` of ``layers``."""
        tokens, intermediates = self._plain_forward(images, layers, project, all_blocks=True)
        return self.pool(tokens), intermediates

    def _plain_forward(
        self, images: torch.Tensor, layers: Sequence[int], project: bool, all_blocks: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last run block's tokens and the requested blocks' patch tokens (see :meth:`plain_tokens`)."""
        wanted = sorted({layer % self.num_layers for layer in layers})
        h, positions = self._embed(images)
        tokens = []
        for index, (ops, block) in enumerate(zip(self.block_ops, self.blocks)):
            if index > wanted[-1] and not all_blocks:
                break
            h = ops.forward(block, h, positions)
            if index in wanted:
                patches = h[:, self.num_prefix_tokens :]
                tokens.append(self.project_local(patches) if project else patches)
        return h, tokens

    def forward(
        self,
        images: torch.Tensor,
        num_local: int | None = None,
        layers: Sequence[int] = (-1,),
        chunk_size: int | None = None,
        local_start: int = 0,
        final_norm: bool = True,
    ) -> VisualTokens:
        """Encode ``images``; the first ``num_local`` (default: all) also get V-V patch tokens.

        ``layers`` are block indices (negative from the end) whose local stream is returned.
        ``chunk_size`` caps the images per pass (None: all in one); results are the same either way.
        ``local_start``: the block where the local stream leaves the original one (0: AnoVL's, from the
        embedding; AnomalyCLIP's DPAM starts it at a later block; ``num_layers``: never). Before it the local
        stream is the original stream, so a requested layer there gives the original tokens through the
        per-token head.
        ``final_norm``: see :meth:`pool` (the global tokens).
        """
        num_local = images.shape[0] if num_local is None else num_local
        wanted = sorted({layer % self.num_layers for layer in layers})
        if not 0 <= local_start <= self.num_layers:
            raise AnovlError(f"local_start {local_start} out of range for a tower of {self.num_layers} blocks")
        if chunk_size and images.shape[0] > chunk_size:
            parts = [
                self.forward(
                    images[start : start + chunk_size],
                    min(max(num_local - start, 0), chunk_size),
                    layers,
                    local_start=local_start,
                    final_norm=final_norm,
                )
                for start in range(0, images.shape[0], chunk_size)
            ]
            return VisualTokens(
                global_tokens=torch.cat([part.global_tokens for part in parts]),
                patch_tokens=[
                    torch.cat([part.patch_tokens[i] for part in parts if part.patch_tokens]) for i in range(len(wanted))
                ]
                if num_local
                else [],
            )
        h, positions = self._embed(images)
        prefix = self.num_prefix_tokens
        patch_tokens = []
        for index, (ops, block) in enumerate(zip(self.block_ops, self.blocks)):
            if index == local_start:
                s = h[:num_local]
            if num_local and local_start <= index <= wanted[-1]:
                a_ori, a_vv = ops.dual_attention(block, h, num_local, positions, prefix)
                s = s + ops.branch(block, a_vv)
                h = ops.mlp_residual(block, h + ops.branch(block, a_ori))
            else:
                h = ops.forward(block, h, positions)
            if num_local and index in wanted:
                patch_tokens.append(self.project_local((s if index >= local_start else h[:num_local])[:, prefix:]))
        return VisualTokens(global_tokens=self.pool(h, final_norm), patch_tokens=patch_tokens)
