"""The text modality: sentences through the frozen text tower, classified against the class prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from torch import Tensor

from mmfl.backbone import Backbone
from mmfl.modalities.base import Modality
from mmfl.prompts.base import TrainablePart


class TextModality(Modality):
    """Sentences (a string column) → token ids → the frozen text tower → the joint space.

    Inputs and class prompts meet in the same space through the same tower, so zero-shot text
    classification works with no training. Parts may add input-side prompt vectors
    (:class:`~mmfl.prompts.TextInputPrompt`); texts longer than the context length are cut, keeping
    the end token.
    """

    name = "text"
    input_key = "text"
    templates: ClassVar[tuple[str, ...]] = ("{}.", "a text about {}.", "this is about {}.")

    def transform(self, backbone: Backbone, train: bool) -> Callable[[Any], Tensor]:
        """A sentence → token ids [L] (long)."""

        def apply(text: Any) -> Tensor:
            self.validate(text)
            return backbone.tokenizer([text])[0]

        return apply

    def cache_id(self, backbone: Backbone, train: bool) -> str | None:
        """The backbone's tokenizer (its type, context length) — the text is its own input."""
        tok = backbone.tokenizer
        return f"text|{type(tok).__module__}.{type(tok).__qualname__}|{backbone.context_length}|{backbone.model_name}"

    def validate(self, value: Any) -> None:
        """Inputs must be strings."""
        if not isinstance(value, str):
            raise TypeError(f"the text modality takes strings, got {type(value).__name__}: {value!r:.80}")

    def encode(self, backbone: Backbone, x: Tensor, parts: Sequence[TrainablePart]) -> Tensor:
        """Token ids [B, L] → joint-space features [B, D] (with the parts' input prompt, if any)."""
        prefixes = [t for t in (p.text_prompt_tokens() for p in parts) if t is not None]
        if len(prefixes) > 1:
            raise ValueError("at most one part may provide input-side text prompts")
        return backbone.encode_text(x, prefixes[0] if prefixes else None)
