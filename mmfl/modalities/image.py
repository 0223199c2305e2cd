"""The image modality: PIL images through the backbone's vision tower."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from mmfl.backbone import Backbone
from mmfl.modalities.base import Modality
from mmfl.prompts.base import TrainablePart


class ImageModality(Modality):
    """Images (a ``datasets.Image`` column, PIL images or arrays) → the frozen vision tower.

    Args:
        augment: use the backbone's training transform (random resized crop) when training;
            the evaluation transform otherwise.
    """

    name = "image"
    input_key = "image"
    renders_image = True

    def __init__(self, augment: bool = False) -> None:
        self.augment = augment

    def transform(self, backbone: Backbone, train: bool) -> Callable[[Any], Tensor]:
        """PIL image (any mode) → normalised tensor [3, H, W] by the backbone's preprocessing."""
        preprocess = backbone.preprocess_train if (train and self.augment) else backbone.preprocess_val

        def apply(image: Any) -> Tensor:
            if hasattr(image, "convert"):
                image = image.convert("RGB")
            return preprocess(image)

        return apply

    def validate(self, value: Any) -> None:
        """An undecoded ``datasets.Image`` value (``{"bytes", "path"}``) must decode as an image (raises ValueError
        naming the file when it cannot be); other values (PIL images, arrays) are taken as they are."""
        if not isinstance(value, dict) or not (value.get("bytes") or value.get("path")):
            return
        from PIL import Image

        name = value.get("path") or f"<{len(value['bytes'])} bytes>"
        try:
            with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]) as image:
                image.load()
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
            raise ValueError(f"cannot decode image {name!r}: {type(e).__name__}: {e}") from e

    def encode(self, backbone: Backbone, x: Tensor, parts: Sequence[TrainablePart]) -> Tensor:
        """Images [B, 3, H, W] → joint-space features [B, D] (with the parts' VPT tokens, if any)."""
        return encode_with_vision_tower(backbone, x, parts)

    def cache_id(self, backbone: Backbone, train: bool) -> str | None:
        """The evaluation preprocessing (its repr names sizes, crop and normalisation); None when augmenting."""
        if train and self.augment:
            return None
        return f"image|rgb|{backbone.preprocess_val!r}"


def encode_with_vision_tower(backbone: Backbone, x: Tensor, parts: Sequence[TrainablePart]) -> Tensor:
    """Image-like inputs [B, 3, H, W] → joint-space features [B, D], with the parts' vision prompt tokens.

    For any modality that renders its inputs as images (image, audio spectrograms, a plugin's).
    """
    tokens = [t for t in (p.vision_prompt_tokens() for p in parts) if t is not None]
    if len(tokens) > 1:
        raise ValueError("at most one part may provide vision prompt tokens")
    return backbone.encode_image(x, tokens[0] if tokens else None)
