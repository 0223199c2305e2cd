"""A CLIP-style model's projections into the joint space (its image-text alignment), found by their open_clip names,
and calls of the frozen model with some of its parameters replaced (trainable copies of those projections)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")

PROJECTION_NAMES: dict[str, tuple[str, ...]] = {
    "text": ("text_projection", "text.proj.weight", "text.proj.bias", "text.text_projection"),
    "visual": ("visual.proj", "visual.head.proj.weight", "visual.head.proj.bias"),
}
"""Per tower, the open_clip state-dict names of the layers that map its pooled features into the joint space: the
native text tower's ``text_projection`` (``text.text_projection`` in a CustomTextCLIP), an HF text tower's linear
``text.proj``, a ViT's ``visual.proj``, a timm tower's ``visual.head.proj``."""

TOWERS: tuple[str, ...] = tuple(PROJECTION_NAMES)


def find_projections(model: nn.Module, towers: Sequence[str] = TOWERS) -> dict[str, nn.Parameter]:
    """The projection parameters of ``model`` in ``towers``, by state-dict name (those the model has).

    Raises:
        ValueError: an unknown tower name.
    """
    unknown = [t for t in towers if t not in PROJECTION_NAMES]
    if unknown:
        raise ValueError(f"towers {unknown}: use {list(TOWERS)}")
    params = dict(model.named_parameters())
    return {name: params[name] for t in towers for name in PROJECTION_NAMES[t] if name in params}


class _Thunk(nn.Module):
    """Holds the model so that ``torch.func.functional_call`` can replace its parameters around any callable."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[], T]) -> T:
        return fn()


def call_with_parameters(model: nn.Module, params: Mapping[str, Tensor], fn: Callable[[], T]) -> T:
    """Run ``fn`` while ``model``'s parameters named in ``params`` (state-dict names) are ``params``' tensors.

    The model itself is not changed (``torch.func.functional_call`` swaps the tensors in and back), so one frozen
    model can serve clients that each hold their own trainable copy of some of its layers; gradients reach those
    copies.
    """
    if not params:
        return fn()
    return torch.func.functional_call(_Thunk(model), {f"model.{k}": v for k, v in params.items()}, (fn,), strict=False)
