"""A text-conditioned prompt generator (FedTPG-like): context vectors computed from the task's class names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfl.backbone import Backbone
from mmfl.federated.scopes import check_scope
from mmfl.prompts.coop import CoOp


class _Block(nn.Module):
    """Pre-norm attention of the context rows [M, W] over a set of keys [K, E], then a feed-forward layer, both
    residual. Each branch's last linear layer starts at zero, so a fresh block is the identity.

    Args:
        width: the context rows' width W.
        kv_dim: the keys' width E (W for self-attention).
        heads: attention heads (must divide W).
        mult: the feed-forward layer's hidden width is ``mult · W``.
    """

    def __init__(self, width: int, kv_dim: int, heads: int, mult: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.attn = nn.MultiheadAttention(width, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)
        self.ff = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, mult * width), nn.GELU(), nn.Linear(mult * width, width)
        )
        for layer in (self.attn.out_proj, self.ff[3]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, kv: Tensor) -> Tensor:
        """Context rows [M, W] after attending over ``kv`` [K, E]. Returns [M, W]."""
        q, k = self.norm_q(x).unsqueeze(0), self.norm_kv(kv).unsqueeze(0)  # [1, M, W], [1, K, E]
        x = x + self.attn(q, k, k, need_weights=False)[0][0]  # [M, W]
        return x + self.ff(x)  # [M, W]


class PromptGenerator(CoOp):
    """Context vectors generated from the class names a client must tell apart (as FedTPG, Qiu et al., ICLR 2024).

    The frozen text tower encodes each class name (``name_template``, default the bare name) into a normalised
    feature [C, D]. A small network lets the learned context rows (the queries, [M, W], initialised from
    ``ctx_init``) attend over that set, then refines them with ``depth`` self-attention blocks; the result is the
    context of every class prompt ``[SOS][V1..VM][CLASS].[EOS]``, as in :class:`CoOp`. The network's tensors do
    not depend on the number or the names of the classes, so one generator, shared by every task (``global``
    scope, the default), produces context for novel classes and for tasks it was never trained on.

    Every block's output layers start at zero, so a fresh generator gives exactly the ``ctx_init`` prompt (the
    hand-written prompt "a photo of a {class}." by default): training starts from the zero-shot classifier.

    Args:
        backbone: the shared frozen backbone.
        class_names: label names of the task, in label order (the generator's input).
        n_ctx: number of context vectors; derived from ``ctx_init`` when that is given.
        ctx_init: words that initialise the queries (random N(0, 0.02) when None and ``n_ctx`` given).
        heads: attention heads (must divide the text width).
        depth: self-attention blocks after the cross-attention over the class names (FedTPG's default is 0).
        mult: hidden width of each feed-forward layer, in multiples of the text width.
        name_template: how a class name is written before the frozen tower encodes it (``{}`` is the name).
        class_token_position: ``end``, ``middle`` or ``front``, as in :class:`CoOp`.
        local_rank: a personal low-rank term added to the queries, as in :class:`CoOp`.
        name: part name in payload keys.
        scope: scope of every tensor (``global``: one generator for every task and modality).
        scopes: per-parameter scope overrides (e.g. ``{"ctx": "task"}`` for a per-task query).
        modalities: serve only clients of these modalities (None: all).
    """

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        n_ctx: int | None = None,
        ctx_init: str | None = "a photo of a",
        heads: int = 4,
        depth: int = 0,
        mult: int = 2,
        name_template: str = "{}",
        class_token_position: str = "end",
        local_rank: int = 0,
        name: str = "generator",
        scope: str = "global",
        scopes: Mapping[str, str] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            backbone,
            class_names,
            n_ctx=None if ctx_init else n_ctx,
            ctx_init=ctx_init,
            class_token_position=class_token_position,  # type: ignore[arg-type]
            local_rank=local_rank,
            name=name,
            scope=scope,
            modalities=modalities,
        )
        if ctx_init and n_ctx is not None and n_ctx != self.n_ctx:
            raise ValueError(
                f"PromptGenerator: n_ctx={n_ctx} but ctx_init={ctx_init!r} is {self.n_ctx} tokens; give one of them"
            )
        width, embed = backbone.text_width, backbone.embed_dim
        if heads < 1 or width % heads:
            raise ValueError(f"PromptGenerator: heads={heads} must be >= 1 and divide the text width {width}")
        if depth < 0 or mult < 1:
            raise ValueError(f"PromptGenerator: depth must be >= 0 and mult >= 1, got depth={depth}, mult={mult}")
        if "{}" not in name_template:
            raise ValueError(f"PromptGenerator: name_template={name_template!r} must contain '{{}}' for the name")
        self.cross = _Block(width, embed, heads, mult)
        self.blocks = nn.ModuleList(_Block(width, width, heads, mult) for _ in range(depth))
        texts = [name_template.replace("{}", c.replace("_", " ")) for c in class_names]
        with torch.no_grad():
            names = F.normalize(backbone.encode_text(backbone.tokenize(texts)).float(), dim=-1).cpu()  # [C, D]
        self.register_buffer("name_features", names, persistent=False)  # [C, D]
        self.scopes = {**self.scopes, **{k: check_scope(v) for k, v in (scopes or {}).items()}}
        self.check_scopes()

    def generated_context(self) -> Tensor:
        """The context computed from the class names: the queries (+ personal term) through the blocks. [M, W]"""
        queries = self.ctx if not self.local_rank else self.ctx + self.local_u @ self.local_v  # [M, W]
        kv = self.name_features.to(self.cross.norm_kv.weight.dtype)  # [C, D]
        x = self.cross(queries, kv)  # [M, W]
        for block in self.blocks:
            x = block(x, x)
        return x

    def context(self) -> Tensor:
        """The generated context, the same for every class. [C, M, W]"""
        return self.generated_context().unsqueeze(0).expand(self.tokens.shape[0], -1, -1)
