"""Feature-side parts: CLIP-Adapter (residual bottleneck MLP) and projection tuning."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mmfl.backbone import Backbone
from mmfl.prompts.base import TrainablePart

Side = Literal["input", "text", "both"]


def _check_side(side: str) -> str:
    if side not in ("input", "text", "both"):
        raise ValueError(f"side={side!r}; use 'input' (image/audio features), 'text' or 'both'")
    return side


class ClipAdapter(TrainablePart):
    """CLIP-Adapter (Gao et al., 2021): ``f' = α · MLP(f) + (1 − α) · f`` on the joint-space features.

    The MLP is ``Linear(D, D/r) → ReLU → Linear(D/r, D) → ReLU`` without biases. With ``ratio`` 0 the
    adapter is the identity, so the client starts from the zero-shot model.

    Args:
        backbone: the shared frozen backbone.
        class_names: the task's label names (unused; part of every part's signature).
        side: adapt the encoded inputs (``input``), the class text features (``text``) or ``both``.
        reduction: bottleneck reduction ``r``.
        ratio: the residual ratio ``α`` in [0, 1].
        name: part name in payload keys.
        scope: scope of its parameters.
        scopes: per-parameter scope overrides (e.g. ``{"input.0.weight": "local"}``).
        modalities: serve only clients of these modalities (None: all it supports).
    """

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        side: Side = "input",
        reduction: int = 4,
        ratio: float = 0.2,
        name: str = "adapter",
        scope: str = "task",
        scopes: Mapping[str, str] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        super().__init__(backbone, class_names, name=name, scope=scope, scopes=scopes, modalities=modalities)
        self.side = _check_side(side)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ClipAdapter: ratio must be in [0, 1], got {ratio}")
        if reduction < 1 or backbone.embed_dim // reduction < 1:
            raise ValueError(f"ClipAdapter: reduction {reduction} does not fit embed_dim {backbone.embed_dim}")
        self.ratio = ratio
        d, h = backbone.embed_dim, backbone.embed_dim // reduction

        def mlp() -> nn.Sequential:
            return nn.Sequential(nn.Linear(d, h, bias=False), nn.ReLU(), nn.Linear(h, d, bias=False), nn.ReLU())

        self.input = mlp() if side in ("input", "both") else None
        self.text = mlp() if side in ("text", "both") else None
        self.check_scopes()

    def _residual(self, mlp: nn.Sequential | None, f: Tensor) -> Tensor:
        if mlp is None:
            return f
        return self.ratio * mlp(f.to(mlp[0].weight.dtype)) + (1.0 - self.ratio) * f  # [N, D]

    def adapt_input_features(self, f: Tensor) -> Tensor:
        """Encoded inputs [B, D] through the adapter (when ``side`` includes the input)."""
        return self._residual(self.input, f)

    def adapt_text_features(self, f: Tensor) -> Tensor:
        """Class text features [C, D] through the adapter (when ``side`` includes text)."""
        return self._residual(self.text, f)


class ProjectionTuning(TrainablePart):
    """A trainable linear map ``f' = W f + b`` on the joint-space features, initialised to the identity
    (so a client starts from the zero-shot model): linear projection tuning.

    Args:
        backbone: the shared frozen backbone.
        class_names: the task's label names (unused).
        side: project the encoded inputs, the class text features, or both.
        bias: learn a bias too.
        name: part name in payload keys.
        scope: scope of its parameters.
        scopes: per-parameter scope overrides.
        modalities: serve only clients of these modalities (None: all it supports).
    """

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        side: Side = "input",
        bias: bool = True,
        name: str = "proj",
        scope: str = "task",
        scopes: Mapping[str, str] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        super().__init__(backbone, class_names, name=name, scope=scope, scopes=scopes, modalities=modalities)
        self.side = _check_side(side)
        d = backbone.embed_dim

        def identity() -> nn.Linear:
            layer = nn.Linear(d, d, bias=bias)
            with torch.no_grad():
                layer.weight.copy_(torch.eye(d))
                if bias:
                    layer.bias.zero_()
            return layer

        self.input = identity() if side in ("input", "both") else None
        self.text = identity() if side in ("text", "both") else None
        self.check_scopes()

    def adapt_input_features(self, f: Tensor) -> Tensor:
        """Encoded inputs [B, D] through the projection."""
        return f if self.input is None else self.input(f.to(self.input.weight.dtype))

    def adapt_text_features(self, f: Tensor) -> Tensor:
        """Class text features [C, D] through the projection."""
        return f if self.text is None else self.text(f.to(self.text.weight.dtype))
