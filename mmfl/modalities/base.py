"""Modality: how one kind of input becomes a joint-space feature."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from torch import Tensor

from mmfl.backbone import Backbone
from mmfl.prompts.base import TrainablePart


class Modality(ABC):
    """One input modality (image, text, audio, or a plugin's).

    A modality names the dataset column its inputs live in (``input_key``), turns one raw example
    into a tensor (``transform``) and encodes a batch into the joint space (``encode``).
    Subclasses are registered under the entry-point group ``mmfl.modalities`` (or with
    :func:`mmfl.modalities.register_modality`) and looked up by ``name``.
    """

    name: ClassVar[str]
    input_key: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    """Python packages this modality needs beyond mmfl's own; checked when it is used."""
    templates: ClassVar[tuple[str, ...] | None] = None
    """Hand-written class prompt templates for this modality's tasks (None: mmfl's image-style default)."""
    renders_image: ClassVar[bool] = False
    """True when ``transform`` makes images [3, H, W] for the vision tower (audio spectrograms, a plugin's
    plots): then every part that works with ``image`` (pixel prompts, VPT, MaPLe) works with it too."""

    @abstractmethod
    def transform(self, backbone: Backbone, train: bool) -> Callable[[Any], Tensor]:
        """A per-example function: raw column value → input tensor (e.g. [3, H, W])."""

    def validate(self, value: Any) -> None:
        """Check one raw example before training starts (e.g. that it decodes); raise ValueError if not.

        Called on the first example of every split and client, so bad data fail before any long work.
        The default accepts everything.
        """
        del value

    @abstractmethod
    def encode(self, backbone: Backbone, x: Tensor, parts: Sequence[TrainablePart]) -> Tensor:
        """Encode a batch of inputs [B, ...] → unnormalised joint-space features [B, D]."""

    def cache_id(self, backbone: Backbone, train: bool) -> str | None:
        """An identifier of ``transform(backbone, train)`` when it is deterministic (the same input always gives
        the same tensor), so that frozen encodings of its inputs may be cached; None when it is random (data
        augmentation) or unknown. Two transforms with the same id must give the same tensors.

        The default (None) turns the frozen-feature cache off for this modality; plugins opt in.
        """
        del backbone, train
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
