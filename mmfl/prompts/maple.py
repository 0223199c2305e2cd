"""MaPLe: deep text prompts coupled to vision prompts through learned projections."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mmfl.backbone import Backbone
from mmfl.federated.scopes import check_scope
from mmfl.prompts.coop import CoOp


class MaPLe(CoOp):
    """Multi-modal Prompt Learning (Khattak et al., 2023).

    Text prompts sit in the first ``depth`` (J) blocks of the text tower: the input context ``ctx``
    [M, Wt] (as CoOp, shared by all classes, class token at the end) and ``deep_ctx`` [J−1, M, Wt],
    which replaces the context positions before blocks 1..J−1. The vision prompts are not learned
    on their own: block j's M vision tokens are ``proj_weight[j] · prompt_j + proj_bias[j]`` of the
    text prompt of block j (text width → vision width), so the two towers are tuned together.

    The vision side needs a ViT tower. With ``couple_vision=False`` the part is deep language
    prompting only (no projections), which works on every tower, mmfl-mini's CNN included, and on
    any modality encoded against the task's class prompts.

    Args:
        backbone: the shared frozen backbone.
        class_names: label names of the task, in label order.
        n_ctx: prompt tokens per block (derived from ``ctx_init`` when that is given; the paper uses 2).
        ctx_init: words to initialise the input context from (``"a photo of a"``); random when None.
            The deeper text prompts start random, N(0, 0.02), as in the paper.
        depth: J, the number of blocks with prompts (the paper uses 9 of ViT-B/16's 12); at most the
            text tower's depth and, when coupled, the vision tower's.
        couple_vision: map the text prompts into vision prompts (MaPLe); False: text side only.
        name: part name in payload keys.
        scope: scope of all its tensors (``task_modality`` by default: coupled prompts of one task on
            one modality; ``task`` shares them across the modalities of a task).
        scopes: per-parameter overrides (``ctx``, ``deep_ctx``, ``proj_weight``, ``proj_bias``).
        modalities: serve only clients of these modalities (None: all it supports).
    """

    modalities: tuple[str, ...] | None = ("image", "audio")

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        n_ctx: int | None = None,
        ctx_init: str | None = "a photo of a",
        depth: int = 9,
        couple_vision: bool = True,
        name: str = "maple",
        scope: str = "task_modality",
        scopes: Mapping[str, str] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        # scopes are checked below, once every parameter exists (CoOp checks against its own only)
        super().__init__(backbone, class_names, n_ctx=n_ctx, ctx_init=ctx_init, name=name, scope=scope)
        text_depth = backbone.text_depth
        max_depth = text_depth
        if couple_vision:
            try:
                vision_depth, vision_width = backbone.vision_token_shape()
            except ValueError as err:
                raise ValueError(
                    f"MaPLe couples text prompts to vision prompt tokens, but {err}; or set couple_vision=false "
                    "for deep text prompts only"
                ) from None
            max_depth = min(text_depth, vision_depth)
        if not 1 <= depth <= max_depth:
            raise ValueError(
                f"MaPLe: depth={depth} must be in [1, {max_depth}] for {backbone.model_name!r} "
                f"(text tower: {text_depth} blocks"
                + (f", vision tower: {vision_depth} blocks)" if couple_vision else ")")
            )
        self.depth = depth
        self.couple_vision = couple_vision
        if not couple_vision:
            self.modalities = None  # text side only: any modality encoded against the class prompts
        if modalities is not None and couple_vision:
            self.restrict_to(modalities)
        elif modalities is not None:
            self.modalities = tuple(modalities)
        width = backbone.text_width
        self.deep_ctx = (
            nn.Parameter(torch.empty(depth - 1, self.n_ctx, width).normal_(0.0, 0.02)) if depth > 1 else None
        )  # [J-1, M, Wt]
        self.proj_weight = self.proj_bias = None
        if couple_vision:
            bound = 1.0 / math.sqrt(width)  # nn.Linear's default initialisation, one map per block
            self.proj_weight = nn.Parameter(torch.empty(depth, vision_width, width).uniform_(-bound, bound))
            self.proj_bias = nn.Parameter(torch.empty(depth, vision_width).uniform_(-bound, bound))
        self.scopes = {k: check_scope(v) for k, v in (scopes or {}).items()}
        self.check_scopes()

    def text_prompts(self) -> Tensor:
        """The text prompts of every prompted block, the input context first. [J, M, Wt]."""
        ctx = self.ctx.unsqueeze(0)  # [1, M, Wt]
        return ctx if self.deep_ctx is None else torch.cat([ctx, self.deep_ctx], dim=0)

    def vision_prompt_tokens(self) -> Tensor | None:
        """The coupled vision prompts [J, M, Wv] (None with ``couple_vision=False``)."""
        if self.proj_weight is None:
            return None
        tokens = torch.einsum("jmt,jvt->jmv", self.text_prompts(), self.proj_weight)  # [J, M, Wv]
        return tokens + self.proj_bias.unsqueeze(1)

    def class_text_features(self, input_features: Tensor | None = None) -> Tensor:
        """Class text features [C, D] with the input context and the deep text prompts in place."""
        return self.backbone.encode_text_embeds(
            self.prompt_embeddings(), self.tokens, deep_prompts=self.deep_ctx, text_len=self.text_len
        )
