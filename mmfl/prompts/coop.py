"""CoOp: learnable text context vectors fed to the frozen text tower in place of prompt words."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from mmfl.backbone import Backbone
from mmfl.prompts.base import TrainablePart

log = logging.getLogger(__name__)

PLACEHOLDER = "X"


class CoOp(TrainablePart):
    """Context Optimization (Zhou et al., 2022): ``[SOS][V1..VM][CLASS].[EOS]`` with learned ``V``.

    The prompt of each class is tokenized as ``"X X ... X <class name>."``; the placeholder tokens'
    embeddings are replaced with the learned context, so padding and pooling stay the tokenizer's.
    With ``class_token_position`` ``front`` or ``middle`` the class-name tokens are moved in front of
    (or between the halves of) the context.

    Args:
        backbone: the shared frozen backbone.
        class_names: label names of the task, in label order.
        n_ctx: number of context vectors; derived from ``ctx_init`` when that is given (16 otherwise).
        ctx_init: words to initialise the context from (e.g. ``"a photo of a"``); random N(0, 0.02)
            when None.
        class_token_position: ``end``, ``middle`` or ``front``.
        class_specific: one context per class (``[C, M, W]``) instead of one shared (``[M, W]``).
        name: part name in payload keys.
        scope: scope of the context (``task`` by default: shared by all clients of the task).
        scopes: per-parameter scope overrides.
    """

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        n_ctx: int | None = None,
        ctx_init: str | None = None,
        class_token_position: Literal["end", "middle", "front"] = "end",
        class_specific: bool = False,
        name: str = "coop",
        scope: str = "task",
        scopes: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(backbone, class_names, name=name, scope=scope, scopes=scopes)
        if class_token_position not in ("end", "middle", "front"):
            raise ValueError(f"class_token_position={class_token_position!r}; use 'end', 'middle' or 'front'")
        if not class_names:
            raise ValueError("CoOp needs at least one class name")
        n_cls = len(class_names)
        width = backbone.text_width

        init_vectors = None
        if ctx_init:
            init_tokens = backbone.tokenize([ctx_init])  # [1, L]
            n_init = _count_content_tokens(backbone, ctx_init)
            if n_ctx is not None and n_ctx != n_init:
                raise ValueError(
                    f"CoOp: n_ctx={n_ctx} but ctx_init={ctx_init!r} is {n_init} tokens; "
                    "give one of them, or make them agree"
                )
            n_ctx = n_init
            with torch.no_grad():
                init_vectors = backbone.embed_tokens(init_tokens)[0, 1 : 1 + n_ctx].float().cpu()  # [M, W]
        n_ctx = 16 if n_ctx is None else n_ctx
        if n_ctx < 1:
            raise ValueError(f"CoOp: n_ctx must be >= 1, got {n_ctx}")

        shape = (n_cls, n_ctx, width) if class_specific else (n_ctx, width)
        if init_vectors is not None:
            ctx = init_vectors.expand(shape).clone()
        else:
            ctx = torch.empty(shape).normal_(0.0, 0.02)
        self.ctx = nn.Parameter(ctx)  # [M, W] or [C, M, W]
        self.n_ctx = n_ctx
        self.class_token_position = class_token_position
        self.class_specific = class_specific

        prompts = [" ".join([PLACEHOLDER] * n_ctx) + " " + c.replace("_", " ") + "." for c in class_names]
        tokens = backbone.tokenize(prompts).cpu()  # [C, L]
        name_lens = [_count_content_tokens(backbone, c.replace("_", " ")) for c in class_names]
        self._check_placeholders(backbone, tokens, n_ctx)
        self.register_buffer("tokens", tokens, persistent=False)  # [C, L]
        self.register_buffer(
            "order",
            _position_order(tokens.shape[1], n_ctx, name_lens, class_token_position),
            persistent=False,
        )  # [C, L]
        self.check_scopes()

    @staticmethod
    def _check_placeholders(backbone: Backbone, tokens: Tensor, n_ctx: int) -> None:
        placeholder_id = _single_token_id(backbone, PLACEHOLDER)
        if not bool((tokens[:, 1 : 1 + n_ctx] == placeholder_id).all()):
            raise ValueError(
                f"CoOp: the tokenizer of {backbone.model_name!r} does not keep {n_ctx} placeholder tokens "
                "after the start token (context too long for the context length?)"
            )

    def prompt_embeddings(self) -> Tensor:
        """Embeddings of every class prompt with the learned context in place. Returns [C, L, W]."""
        tokens = self.tokens
        with torch.no_grad():
            embeds = self.backbone.embed_tokens(tokens)  # [C, L, W]
        ctx = self.ctx
        if not self.class_specific:
            ctx = ctx.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # [C, M, W]
        ctx = ctx.to(embeds.dtype)
        embeds = torch.cat([embeds[:, :1], ctx, embeds[:, 1 + self.n_ctx :]], dim=1)  # [C, L, W]
        if self.class_token_position != "end":
            index = self.order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])  # [C, L, W]
            embeds = torch.gather(embeds, 1, index)
        return embeds

    def class_text_features(self) -> Tensor:
        """Class text features [C, D] through the frozen text tower."""
        return self.backbone.encode_text_embeds(self.prompt_embeddings(), self.tokens)


def _single_token_id(backbone: Backbone, word: str) -> int:
    tokens = backbone.tokenize([word])[0]
    content = tokens[1 : 1 + _count_content_tokens(backbone, word)]
    if content.numel() != 1:
        raise ValueError(f"placeholder {word!r} is not a single token for {backbone.model_name!r}")
    return int(content[0])


def _count_content_tokens(backbone: Backbone, text: str) -> int:
    """Tokens of ``text`` between the start and end tokens."""
    tokens = backbone.tokenize([text])[0]
    n_real = int((tokens != backbone.pad_token_id).sum())
    return max(n_real - 2, 0)


def _position_order(length: int, n_ctx: int, name_lens: list[int], position: str) -> Tensor:
    """Per class, which source position fills each output position. Returns [C, L] long.

    Source layout per class: ``[SOS] ctx(M) name(n) rest...``. ``front`` → ``[SOS] name ctx rest``;
    ``middle`` → ``[SOS] ctx[:M//2] name ctx[M//2:] rest``. Positions after the name never move, so
    the EOT token (pooling) and padding stay where the token ids say.
    """
    rows = []
    for n in name_lens:
        ctx = list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + n))
        rest = list(range(1 + n_ctx + n, length))
        if position == "front":
            body = name + ctx
        elif position == "middle":
            half = n_ctx // 2
            body = ctx[:half] + name + ctx[half:]
        else:
            body = ctx + name
        rows.append([0, *body, *rest])
    return torch.tensor(rows, dtype=torch.long)
