"""Driving a text tower from token embeddings: open_clip's native transformer and HF encoders, with deep prompts.

:class:`mmfl.backbone.Backbone` calls these; they return the pooled features before the tower's projection.
"""

from __future__ import annotations

import functools
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from mmfl.backbones.blocks import replace_block_input, run_blocks


def hf_layers(text: nn.Module, model_name: str) -> nn.ModuleList:
    """The block list of an HF text tower (BERT-, RoBERTa-, T5- and similar encoders)."""
    transformer = text.transformer
    for path in ("encoder.layer", "encoder.layers", "encoder.block", "layers", "layer"):
        found: Any = transformer
        for attr in path.split("."):
            found = getattr(found, attr, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise TypeError(
        f"{model_name!r}: cannot find the block list of its {type(transformer).__name__} text tower, "
        "so deep text prompts cannot be injected; use a text prompt at the input only (mmfl.prompts.CoOp)"
    )


def encode_hf(
    text: nn.Module, embeds: Tensor, tokens: Tensor, deep: Tensor | None, start: int, model_name: str
) -> Tensor:
    """Pooled features [N, W] of an open_clip ``HFTextEncoder`` for token embeddings [N, L, W]; deep prompts
    [K, P, W] replace positions ``start ..`` of the input of blocks 1 .. K."""
    attn_mask = (tokens != text.config.pad_token_id).long()  # [N, L]
    handles = []
    if deep is not None and deep.shape[0] > 0:
        checkpointing = getattr(text.transformer, "is_activation_checkpointing", None)
        if checkpointing is None:  # transformers < 5
            checkpointing = getattr(text.transformer, "is_gradient_checkpointing", False)
        if checkpointing:
            raise ValueError("deep text prompts do not work with gradient checkpointing on the HF text tower")
        # HF blocks are driven by the HF model itself (masks, positions); a pre-hook on block k + 1
        # swaps the prompt positions of its input, and is removed right after the forward.
        for k, layer in enumerate(hf_layers(text, model_name)[1 : 1 + deep.shape[0]]):
            hook = functools.partial(replace_block_input, prompts=deep[k], start=start)
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        out = text.transformer(inputs_embeds=embeds, attention_mask=attn_mask)
    finally:
        for handle in handles:
            handle.remove()
    return text.pooler(out, attn_mask)  # [N, W]


def encode_native(t: nn.Module, embeds: Tensor, tokens: Tensor, deep: Tensor | None, start: int) -> Tensor:
    """Pooled features [N, W] of an open_clip native text transformer (``CLIP`` or ``CustomTextCLIP.text``) for
    token embeddings [N, L, W]; deep prompts [K, P, W] replace positions ``start ..`` before blocks 1 .. K."""
    cast_dtype = t.transformer.get_cast_dtype()
    x = embeds.to(cast_dtype)  # [N, L, W]
    seq_len = x.shape[1]
    cls_emb = getattr(t, "cls_emb", None)
    if cls_emb is not None:  # CoCa-style appended class token
        x = torch.cat([x, cls_emb.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
        seq_len += 1
    attn_mask = t.attn_mask
    if attn_mask is not None:
        attn_mask = attn_mask[:seq_len, :seq_len]
    if getattr(t, "use_pad_mask", False) or cls_emb is not None:
        add_mask = t._build_additive_mask(tokens, seq_len, x.dtype)  # [N*H, L, L]
        attn_mask = add_mask if attn_mask is None else attn_mask.unsqueeze(0) + add_mask
    x = x + t.positional_embedding[:seq_len].to(cast_dtype)
    if deep is None:
        x = t.transformer(x, attn_mask=attn_mask)
    else:
        x = run_blocks(t.transformer, x, attn_mask, deep.to(x.dtype), start, first=1)
    if cls_emb is not None:
        return t.ln_final(x[:, -1])  # [N, W]
    x = t.ln_final(x)
    pool_type = getattr(t, "text_pool_type", None) or getattr(t, "pool_type", "argmax")
    eos_id = getattr(t, "text_eos_id", None) or getattr(t, "eos_id", None)
    return open_clip.transformer.text_global_pool(x, tokens, pool_type, eos_token_id=eos_id)  # [N, W]
