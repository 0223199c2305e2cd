"""CoOp: learnable text context vectors fed to the frozen text tower in place of prompt words."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
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
        conditional: CoCoOp (Zhou et al., 2022): a meta-net turns each input's encoded features into a
            bias added to every context vector, so each input gets its own class prompts. Its last layer
            starts at zero, so the part starts as plain CoOp. Costs B×C text encodings per batch.
        meta_reduction: hidden width of the meta-net is ``embed_dim // meta_reduction``.
        local_rank: add a personal low-rank term ``U·V`` (rank r, scope ``local``, never sent) to the
            context (as FedPGP); ``U`` starts at zero, so the part starts as the shared context.
        name: part name in payload keys.
        scope: scope of the context (``task`` by default: shared by all clients of the task).
        scopes: per-parameter scope overrides.
        modalities: serve only clients of these modalities (None: all it supports).
    """

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        n_ctx: int | None = None,
        ctx_init: str | None = None,
        class_token_position: Literal["end", "middle", "front"] = "end",
        class_specific: bool = False,
        conditional: bool = False,
        meta_reduction: int = 16,
        local_rank: int = 0,
        name: str = "coop",
        scope: str = "task",
        scopes: Mapping[str, str] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        super().__init__(backbone, class_names, name=name, scope=scope, scopes=scopes, modalities=modalities)
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
        self.conditional = conditional
        self.meta = None
        if conditional:
            hidden = max(backbone.embed_dim // meta_reduction, 1)
            self.meta = nn.Sequential(nn.Linear(backbone.embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, width))
            nn.init.zeros_(self.meta[2].weight)
            nn.init.zeros_(self.meta[2].bias)
        self.local_rank = local_rank
        if local_rank < 0 or local_rank > min(n_ctx, width):
            raise ValueError(f"CoOp: local_rank must be in [0, {min(n_ctx, width)}], got {local_rank}")
        if local_rank:
            lead = (n_cls,) if class_specific else ()
            self.local_u = nn.Parameter(torch.zeros(*lead, n_ctx, local_rank))  # [(C,) M, r]
            self.local_v = nn.Parameter(torch.empty(*lead, local_rank, width).normal_(0.0, 0.02))  # [(C,) r, W]
            self.scopes = {"local_u": "local", "local_v": "local", **self.scopes}  # personal unless overridden

        prompts = [" ".join([PLACEHOLDER] * n_ctx) + " " + c.replace("_", " ") + "." for c in class_names]
        tokens = backbone.tokenize(prompts).cpu()  # [C, L]
        name_lens = [_count_content_tokens(backbone, c.replace("_", " ")) for c in class_names]
        self._check_placeholders(backbone, tokens, n_ctx)
        self.register_buffer("tokens", tokens, persistent=False)  # [C, L]
        # the longest prompt's length to its end token, read once here: the text tower is cut to it at every step
        # without reading the (device) token ids back
        self.text_len = int(backbone.text_lengths(tokens).max())
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

    def context(self) -> Tensor:
        """The context vectors in use: shared (+ personal low-rank term). [C, M, W]."""
        ctx = self.ctx
        if self.local_rank:
            ctx = ctx + self.local_u @ self.local_v  # [(C,) M, W]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.tokens.shape[0], -1, -1)  # [C, M, W]
        return ctx

    def prompt_embeddings(self, bias: Tensor | None = None, ctx: Tensor | None = None) -> Tensor:
        """Embeddings of every class prompt with the learned context in place.

        Args:
            bias: CoCoOp's per-input context bias [B, W]; None for plain CoOp.
            ctx: context to use instead of :meth:`context` ([C, M, W]).

        Returns:
            [C, L, W], or [B, C, L, W] with a bias.
        """
        tokens = self.tokens
        with torch.no_grad():
            embeds = self.backbone.embed_tokens(tokens)  # [C, L, W]
        ctx = (self.context() if ctx is None else ctx).to(embeds.dtype)  # [C, M, W]
        if bias is not None:
            ctx = ctx.unsqueeze(0) + bias.to(embeds.dtype)[:, None, None, :]  # [B, C, M, W]
            embeds = embeds.unsqueeze(0).expand(bias.shape[0], -1, -1, -1)  # [B, C, L, W]
        embeds = torch.cat([embeds[..., :1, :], ctx, embeds[..., 1 + self.n_ctx :, :]], dim=-2)
        if self.class_token_position != "end":
            index = self.order.unsqueeze(-1).expand(*embeds.shape)  # [(B,) C, L, W]
            embeds = torch.gather(embeds, -2, index)
        return embeds

    def class_text_features(self, input_features: Tensor | None = None) -> Tensor:
        """Class text features through the frozen text tower: [C, D]; with ``conditional``, one set per
        input, [B, C, D], from ``input_features`` [B, D]."""
        if not self.conditional:
            return self.backbone.encode_text_embeds(self.prompt_embeddings(), self.tokens, text_len=self.text_len)
        if input_features is None:
            raise ValueError("CoOp(conditional=True) needs the batch's input features")
        embeds = self.prompt_embeddings(self.meta(input_features.to(self.meta[0].weight.dtype)))  # [B, C, L, W]
        b, c = embeds.shape[:2]
        tokens = self.tokens.unsqueeze(0).expand(b, -1, -1).reshape(b * c, -1)  # [B*C, L]
        flat = embeds.reshape(b * c, *embeds.shape[2:])  # [B*C, L, W]
        feats = self.backbone.encode_text_embeds(flat, tokens, text_len=self.text_len)  # [B*C, D]
        return feats.view(b, c, -1)


def _single_token_id(backbone: Backbone, word: str) -> int:
    tokens = backbone.tokenize([word])[0]
    content = tokens[1 : 1 + _count_content_tokens(backbone, word)]
    if content.numel() != 1:
        raise ValueError(f"placeholder {word!r} is not a single token for {backbone.model_name!r}")
    return int(content[0])


def _count_content_tokens(backbone: Backbone, text: str) -> int:
    """Tokens of ``text`` between the start and end tokens."""
    return max(int(backbone.text_lengths(backbone.tokenize([text]))[0]) - 2, 0)


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


class PromptFolio(CoOp):
    """A shared and a personal CoOp context whose class features are mixed (PromptFolio, Pan et al., 2024):
    ``f_t = (1 − θ) · norm(T(ctx)) + θ · norm(T(ctx_local))``. ``ctx`` has the part's scope (``task`` by
    default); ``ctx_local`` is ``local`` and never leaves the client. Both start from the same values.

    Args:
        backbone: the shared frozen backbone.
        class_names: label names of the task, in label order.
        fraction: the personal share ``θ`` in [0, 1].
        kwargs: the :class:`CoOp` options (n_ctx, ctx_init, class_specific, ...).
    """

    def __init__(self, backbone: Backbone, class_names: list[str], fraction: float = 0.2, **kwargs) -> None:
        kwargs.setdefault("name", "folio")
        super().__init__(backbone, class_names, **kwargs)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"PromptFolio: fraction must be in [0, 1], got {fraction}")
        if self.conditional:
            raise ValueError("PromptFolio does not combine with conditional=True")
        self.fraction = fraction
        self.ctx_local = nn.Parameter(self.ctx.detach().clone())  # [M, W] or [C, M, W]
        self.scopes = {"ctx_local": "local", **self.scopes}
        self.check_scopes()

    def class_text_features(self, input_features: Tensor | None = None) -> Tensor:
        """The mixed class features [C, D] (each branch normalised first)."""
        ctx_local = (
            self.ctx_local if self.ctx_local.dim() == 3 else self.ctx_local.expand(len(self.class_names), -1, -1)
        )
        both = torch.cat([self.prompt_embeddings(), self.prompt_embeddings(ctx=ctx_local)])  # [2C, L, W]
        feats = self.backbone.encode_text_embeds(both, self.tokens.repeat(2, 1), text_len=self.text_len)  # [2C, D]
        shared, local = F.normalize(feats, dim=-1).chunk(2)  # [C, D] each: both branches in one pass of the tower
        return (1.0 - self.fraction) * shared + self.fraction * local  # [C, D]
