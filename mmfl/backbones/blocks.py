"""Prompt injection into a tower: replace prompt positions of the hidden states before a block, and lay out
token ids around input-side text prompts."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _replace_span(x: Tensor, prompts: Tensor, start: int) -> Tensor:
    """Hidden states [B, L, W] with positions ``start .. start + P - 1`` replaced by ``prompts`` [P, W]."""
    p = prompts.to(x.dtype).expand(x.shape[0], -1, -1)  # [B, P, W]
    return torch.cat([x[:, :start], p, x[:, start + p.shape[1] :]], dim=1)


def run_blocks(
    transformer: nn.Module, x: Tensor, attn_mask: Tensor | None, prompts: Tensor, start: int, first: int
) -> Tensor:
    """Run an open_clip ``Transformer``'s blocks over batch-first ``x`` [B, L, W], replacing the prompt
    positions by ``prompts[k]`` [P, W] before block ``first + k``."""
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(transformer.resblocks):
        k = i - first
        if 0 <= k < prompts.shape[0]:
            x = _replace_span(x, prompts[k], start)
        if batch_first:
            x = block(x, attn_mask=attn_mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


def replace_block_input(
    module: nn.Module, args: tuple, kwargs: dict, prompts: Tensor, start: int
) -> tuple[tuple, dict]:
    """Forward pre-hook for an HF block: replace the prompt positions of its hidden states [B, L, W]."""
    if args:
        return (_replace_span(args[0], prompts, start), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": _replace_span(kwargs["hidden_states"], prompts, start)}


def encode_vit_prompted(visual: nn.Module, images: Tensor, prompts: Tensor) -> Tensor:
    """An open_clip ``VisionTransformer``'s forward with prompt tokens: ``prompts[0]`` [P, W] inserted after the
    class token at the input, positions replaced by ``prompts[k]`` before block k (0 < k < K), the prompts
    dropped again before pooling. Images [B, 3, H, W], prompts [K, P, W] → features [B, D]."""
    x = visual._embeds(images)  # [B, 1+N, W] after ln_pre
    n_prompt = prompts.shape[1]
    x = torch.cat([x[:, :1], prompts[0].expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)  # [B, 1+P+N, W]
    x = run_blocks(visual.transformer, x, None, prompts[1:], start=1, first=1)
    x = torch.cat([x[:, :1], x[:, 1 + n_prompt :]], dim=1)  # [B, 1+N, W]: prompts dropped
    pooled, _ = visual._pool(x)  # [B, W]
    return pooled @ visual.proj if visual.proj is not None else pooled  # [B, D]


def prefix_layout(tokens: Tensor, lengths: Tensor, p: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Token ids [N, L] → ``[start] prompt(p) content [end] pad...`` in the same length L (content that no longer
    fits is cut from its end; the end token is kept; prompt positions hold the start token's id), and the mask of
    the prompt positions [1, L]. ``lengths`` [N]: each row's length up to and including its end token."""
    length = tokens.shape[1]
    real = lengths.unsqueeze(1)  # [N, 1]: start + content + end
    keep = (real - 2).clamp(min=0, max=length - p - 2)  # [N, 1] content tokens that still fit
    j = torch.arange(length, device=tokens.device).unsqueeze(0)  # [1, L] output positions
    is_prompt = (j >= 1) & (j <= p)  # [1, L]
    is_content = (j > p) & (j <= p + keep)  # [N, L]
    is_end = j == p + keep + 1  # [N, L]
    src = torch.where(is_content, j - p, torch.where(is_end, real - 1, 0))  # [N, L] source positions
    new = torch.gather(tokens, 1, src)  # [N, L]
    new = torch.where(is_prompt | (j == 0), tokens[:, :1], new)
    new = torch.where(is_content | is_end | is_prompt | (j == 0), new, pad_id)
    return new, is_prompt
