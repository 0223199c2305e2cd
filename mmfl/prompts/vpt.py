"""VPT: learnable prompt tokens in a ViT vision tower, shallow (input only) or deep (every block)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mmfl.backbone import Backbone
from mmfl.prompts.base import TrainablePart


class VisualPromptTokens(TrainablePart):
    """Visual Prompt Tuning (Jia et al., 2022) for open_clip ViT towers.

    ``n_tokens`` learned tokens sit after the class token; shallow VPT adds them at the input only,
    deep VPT gives every block its own. They are dropped before pooling. Towers without tokens (CNNs,
    such as mmfl-mini's) raise a clear error naming :class:`~mmfl.prompts.PaddingPrompt` instead.

    Args:
        backbone: the shared frozen backbone (gives the depth and width).
        class_names: the task's label names (unused).
        n_tokens: prompt tokens per block.
        deep: one set per block (``[layers, P, W]``) instead of the input only (``[P, W]``).
        init_std: standard deviation of the initial tokens.
        name: part name in payload keys.
        scope: scope of the tokens (``modality`` shares them across the tasks of a modality).
        scopes: per-parameter scope overrides.
        modalities: serve only clients of these modalities (None: all it supports).
    """

    modalities = ("image", "audio")  # audio: spectrograms go through the vision tower

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        n_tokens: int = 8,
        deep: bool = False,
        init_std: float = 0.02,
        name: str = "vpt",
        scope: str = "modality",
        scopes: Mapping[str, str] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        super().__init__(backbone, class_names, name=name, scope=scope, scopes=scopes, modalities=modalities)
        n_layers, width = backbone.vision_token_shape()
        if n_tokens < 0:
            raise ValueError(f"VisualPromptTokens: n_tokens must be >= 0, got {n_tokens}")
        shape = (n_layers, n_tokens, width) if deep else (n_tokens, width)
        self.tokens = nn.Parameter(torch.empty(shape).normal_(0.0, init_std))  # [(L,) P, W]
        self.deep = deep
        self.check_scopes()

    def vision_prompt_tokens(self) -> Tensor:
        """The tokens, [P, W] or [layers, P, W]."""
        return self.tokens
