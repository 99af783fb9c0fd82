"""open_clip's own text transformer run from token embeddings, with learned tokens put into its first blocks.

Prompt learning (AnomalyCLIP's learnable contexts and deep text tokens) needs what ``encode_text`` hides: the
input embeddings (so learned vectors can stand in for some words) and the blocks one by one (so learned
tokens can replace some positions before each of the first blocks). :class:`PromptTextTower` runs both
text tower types of open_clip the way their own forward does (causal or padding masks, CoCa's appended class
token, argmax / last / eos pooling, projection): the built-in tower of ``CLIP`` and ``CustomTextCLIP``'s
``TextTransformer``. Hugging Face text towers (``hf_model_name``) have other blocks and are refused by
:func:`check_prompt_text_tower` from the model config, before any weights are built.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

from anovl.errors import AnovlError


def check_prompt_text_tower(name: str, config: dict[str, Any], why: str) -> None:
    """One clear error when ``name``'s text tower is not open_clip's own transformer (``why`` needs it)."""
    hf_name = config.get("text_cfg", {}).get("hf_model_name")
    if hf_name:
        raise AnovlError(
            f"{why} needs open_clip's own text transformer, but the text tower of {name} is the "
            f"Hugging Face model {hf_name!r}; choose a backbone without hf_model_name in its text_cfg"
        )


class PromptTextTower:
    """The text tower of an open_clip model, run from embeddings with optional deep tokens.

    Holds references to the model's modules (nothing of its own), so it is not an ``nn.Module``.
    """

    def __init__(self, clip: nn.Module):
        text: Any = getattr(clip, "text", clip)  # open_clip's towers, which ship no type information
        if isinstance(text, TextTransformer):
            self.pool_type, self.eos_id = text.pool_type, text.eos_id
            self.cls_emb, self.pad_mask = text.cls_emb, text.use_pad_mask or text.cls_emb is not None
        elif hasattr(text, "transformer") and hasattr(text, "token_embedding"):  # CLIP's built-in tower
            self.pool_type, self.eos_id = text.text_pool_type, getattr(text, "text_eos_id", None)
            self.cls_emb, self.pad_mask = None, False
        else:
            raise AnovlError(f"the text tower {type(text).__name__} is not open_clip's own text transformer")
        self.text = text
        self.blocks = list(text.transformer.resblocks)

    @property
    def width(self) -> int:
        return self.text.token_embedding.weight.shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(P, L) token ids → (P, L, width) input embeddings, before positions."""
        return self.text.token_embedding(token_ids).to(self.text.transformer.get_cast_dtype())

    def encode(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_tokens: Sequence[torch.Tensor] = (),
        deep_start: int = 1,
        deep_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Text embeddings (P, D), unnormalised, of ``embeddings`` (P, L, width) standing for ``token_ids`` (P, L).

        ``deep_tokens[i]`` (T, width) replaces positions ``deep_start .. deep_start+T`` of every sequence before
        block ``i + 1`` (block 0 sees ``embeddings`` as given). ``deep_dtype``: the deep tokens are cast to it and
        back before use (AnomalyCLIP's code casts them to float16). Without deep tokens and with
        ``token_embedding(token_ids)`` this is the tower's ``encode_text``.
        """
        text = self.text
        if len(deep_tokens) >= self.num_layers:
            raise AnovlError(
                f"{len(deep_tokens)} layers of deep text tokens need more than the text tower's "
                f"{self.num_layers} blocks"
            )
        dtype = text.transformer.get_cast_dtype()
        x = embeddings.to(dtype)
        seq_len = x.shape[1]
        if self.cls_emb is not None:  # CoCa appends a class token
            x = torch.cat([x, self.cls_emb.to(dtype).expand(x.shape[0], 1, -1)], 1)
            seq_len += 1
        attn_mask = text.attn_mask
        if self.pad_mask:
            padding = text._build_additive_mask(token_ids, seq_len, x.dtype)
            attn_mask = padding if attn_mask is None else attn_mask[:seq_len, :seq_len].unsqueeze(0) + padding
        x = x + text.positional_embedding[:seq_len].to(dtype)
        batch_first = getattr(text.transformer, "batch_first", True)
        for index, block in enumerate(self.blocks):
            if 0 < index <= len(deep_tokens):
                tokens = deep_tokens[index - 1]
                if deep_dtype is not None:
                    tokens = tokens.to(deep_dtype)
                tokens = tokens.to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :deep_start], tokens, x[:, deep_start + tokens.shape[1] :]], 1)
            if batch_first:
                x = block(x, attn_mask=attn_mask)
            else:
                x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        if self.cls_emb is not None:
            pooled = text.ln_final(text_global_pool(x, pool_type="last"))
        else:
            pooled = text_global_pool(text.ln_final(x), token_ids, self.pool_type, eos_token_id=self.eos_id)
        projection = text.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
