"""Input-side text prompt: learned vectors placed before every input text of the text modality."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mmfl.backbone import Backbone
from mmfl.prompts.base import TrainablePart


class TextInputPrompt(TrainablePart):
    """Learned prompt vectors ``[SOS][P1..PN] sentence [EOS]`` on the *input* side of text clients.

    The class prompts are untouched (pair it with :class:`~mmfl.prompts.CoOp` for those); this part
    steers how the frozen text tower reads the client's own sentences (prefix tuning at the input).

    Args:
        backbone: the shared frozen backbone.
        class_names: the task's label names (unused).
        n_tokens: number of prompt vectors.
        init: words to initialise the vectors from (e.g. ``"a sentence about"``); random N(0, 0.02)
            when None.
        name: part name in payload keys.
        scope: scope of the vectors (``modality``: shared by the text clients of every task).
        scopes: per-parameter scope overrides.
        modalities: serve only clients of these modalities (None: all it supports).
    """

    modalities = ("text",)

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        n_tokens: int = 4,
        init: str | None = None,
        name: str = "text_prompt",
        scope: str = "modality",
        scopes: Mapping[str, str] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        super().__init__(backbone, class_names, name=name, scope=scope, scopes=scopes, modalities=modalities)
        if init:
            tokens = backbone.tokenize([init])  # [1, L]
            n_tokens = int(backbone.text_lengths(tokens)[0]) - 2
            with torch.no_grad():
                vectors = backbone.embed_tokens(tokens)[0, 1 : 1 + n_tokens].float().cpu()  # [P, W]
        else:
            vectors = torch.empty(n_tokens, backbone.text_width).normal_(0.0, 0.02)
        if n_tokens < 1 or n_tokens > backbone.context_length - 2:
            raise ValueError(f"TextInputPrompt: n_tokens must be in [1, {backbone.context_length - 2}], got {n_tokens}")
        self.tokens = nn.Parameter(vectors.clone())  # [P, W]
        self.check_scopes()

    def text_prompt_tokens(self) -> Tensor:
        """The prompt vectors [P, W]."""
        return self.tokens
