"""Oracle of the value-wise (V-V) local path (docs/METHOD.md §2): the local stream written out token by token.

Loops over images, heads and tokens with open_clip's own block weights (in-projection, out_proj, ln_1) and
CLIP's own blocks for the original stream; checked against anovl.backbones.value_wise in
tests/test_backbone.py. It imports torch only: keep it independent of anovl.backbones.
"""

from __future__ import annotations

import math

import torch


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
        v = (y @ attn.in_proj_weight[2 * width:].T + attn.in_proj_bias[2 * width:])
        a_vv = torch.zeros_like(h)
        for b in range(h.shape[0]):
            head_outputs = []
            for head in range(heads):
                vh = v[b, :, head * d_head:(head + 1) * d_head]
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
