"""Hand-written prompt features: templates filled with each class name, encoded, ensembled per class (CLIP's
prompt ensembling)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfl.backbone import Backbone
from mmfl.backbones.projections import PROJECTION_NAMES


@torch.no_grad()
def zero_shot_text_features(backbone: Backbone, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
    """Hand-written prompt features: templates filled with each class name, normalised, averaged over
    templates and normalised again (CLIP's prompt ensembling). Returns [C, D]."""
    return template_text_features(backbone, class_names, templates)


def template_text_features(
    backbone: Backbone, class_names: Sequence[str], templates: Sequence[str], trimmed: bool = False
) -> Tensor:
    """:func:`zero_shot_text_features` with gradients (to weights that replace the backbone's). Returns [C, D].

    Args:
        trimmed: encode through :meth:`Backbone.encode_text_embeds`, which cuts the batch to its longest text
            (~6× faster on mmfl-mini's 64-token context; equal to open_clip's path within float rounding).
    """
    tokens = backbone.tokenize(template_texts(class_names, templates))  # [C*T, L]
    if trimmed:
        feats = backbone.encode_text_embeds(backbone.embed_tokens(tokens), tokens)
    else:
        feats = backbone.encode_text(tokens)
    return ensemble(feats, len(class_names), len(templates))


def template_texts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name (``_`` read as a space), class-major: [C*T] texts."""
    return [t.format(c.replace("_", " ")) for c in class_names for t in templates]


def ensemble(feats: Tensor, n_classes: int, n_templates: int) -> Tensor:
    """Class-major template features [C*T, D] → normalised, averaged per class, normalised again. [C, D]"""
    feats = F.normalize(feats.float(), dim=-1).view(n_classes, n_templates, -1).mean(dim=1)  # [C, D]
    return F.normalize(feats, dim=-1)


PROJECTIONS = frozenset(n for names in PROJECTION_NAMES.values() for n in names)
"""State-dict names of every tower's projection into the joint space."""


class AdaptedTemplates:
    """The hand-written templates' class features through weights that replace the backbone's (a client's
    ``backbone_parameters``; call inside :meth:`Backbone.call_with`).

    When the replaced weights are projections only, the text tower's pooled features are frozen: they are encoded
    once (and kept), then only projected at each call.
    """

    def __init__(self, class_names: Sequence[str], templates: Sequence[str]) -> None:
        self.class_names, self.templates = list(class_names), list(templates)
        self._pooled: Tensor | None = None  # [C*T, W]: the templates' text features before the projection

    def __call__(self, backbone: Backbone, replaced: Collection[str]) -> Tensor:
        """Class features [C, D] with the weights named in ``replaced`` swapped in by the caller."""
        if not set(replaced) <= PROJECTIONS:
            return template_text_features(backbone, self.class_names, self.templates, trimmed=True)
        if self._pooled is None or self._pooled.device != backbone.device:
            # not an inference tensor even when first needed in a prediction pass: training reuses it
            with torch.inference_mode(False), torch.no_grad():
                tokens = backbone.tokenize(template_texts(self.class_names, self.templates))  # [C*T, L]
                self._pooled = backbone.encode_text_embeds(backbone.embed_tokens(tokens), tokens, project=False)
        return ensemble(backbone.project_text(self._pooled), len(self.class_names), len(self.templates))
