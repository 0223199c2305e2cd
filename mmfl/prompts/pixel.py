"""Pixel-space visual prompts: a learned frame added to the image, for any vision tower (CNNs too)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mmfl.backbone import Backbone
from mmfl.prompts.base import TrainablePart


class PaddingPrompt(TrainablePart):
    """Visual prompting by padding (Bahng et al., 2022): a learned frame ``pad`` pixels wide is added to
    every (normalised) input image; the inside of the image is untouched. Zero-initialised, so a client
    starts from the zero-shot model. Works with any vision tower, including mmfl-mini's CNN.

    Args:
        backbone: the shared frozen backbone (gives the input size).
        class_names: the task's label names (unused).
        pad: frame width in pixels.
        name: part name in payload keys.
        scope: scope of its parameters (``modality`` shares one frame across the tasks of a modality).
        scopes: per-parameter scope overrides.
        modalities: serve only clients of these modalities (None: all it supports).
    """

    modalities = ("image", "audio")  # audio: spectrograms go through the vision tower

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        pad: int = 8,
        name: str = "pixel",
        scope: str = "modality",
        scopes: Mapping[str, str] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        super().__init__(backbone, class_names, name=name, scope=scope, scopes=scopes, modalities=modalities)
        h, w = backbone.image_size
        if not 0 < pad < min(h, w) // 2:
            raise ValueError(f"PaddingPrompt: pad must be in [1, {min(h, w) // 2 - 1}] for {h}x{w} inputs, got {pad}")
        self.pad, self.size = pad, (h, w)
        self.top = nn.Parameter(torch.zeros(3, pad, w))  # [3, p, W]
        self.bottom = nn.Parameter(torch.zeros(3, pad, w))  # [3, p, W]
        self.left = nn.Parameter(torch.zeros(3, h - 2 * pad, pad))  # [3, H-2p, p]
        self.right = nn.Parameter(torch.zeros(3, h - 2 * pad, pad))  # [3, H-2p, p]
        self.check_scopes()

    def frame(self) -> Tensor:
        """The full prompt image, zero inside the frame. Returns [3, H, W]."""
        h, w = self.size
        inside = torch.zeros(3, h - 2 * self.pad, w - 2 * self.pad, dtype=self.top.dtype, device=self.top.device)
        middle = torch.cat([self.left, inside, self.right], dim=2)  # [3, H-2p, W]
        return torch.cat([self.top, middle, self.bottom], dim=1)  # [3, H, W]

    def prompt_input(self, x: Tensor, modality: str) -> Tensor:
        """Images [B, 3, H, W] plus the frame."""
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"PaddingPrompt built for {self.size} inputs got {tuple(x.shape[-2:])}")
        return x + self.frame().to(x.dtype)  # [B, 3, H, W]
