"""KnowledgeHooks: the knowledge-guidance steps of :class:`~mmfl.module.ClientModule` (:mod:`mmfl.knowledge`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mmfl.knowledge import anchor_loss, prograd_project, total, zero_shot_kl

if TYPE_CHECKING:
    from mmfl.module import ClientModule


class KnowledgeHooks:
    """The terms ``training.knowledge`` adds to a client's loss, ProGrad's gradient projection and the anchors'
    source: a mixin of :class:`~mmfl.module.ClientModule`, whose attributes (``knowledge``, ``parts``,
    ``held_classes``...) it reads."""

    def _guidance(
        self: ClientModule,
        x: Tensor | None,
        y: Tensor,
        encoded: Tensor | None,
        f_x: Tensor,
        f_t: Tensor,
        logits: Tensor,
    ) -> Tensor | float:
        """The knowledge-guidance terms of one training batch (see :mod:`mmfl.knowledge`)."""
        k = self.knowledge
        assert k is not None
        zs_t = self.hand_written_features()  # [C, D]
        zs_x = self.frozen_input_features(x, encoded) if k.needs_frozen_input else None
        scale = self.backbone.logit_scale.exp()
        extra = total(k.terms(f_t, zs_t, logits, f_x, zs_x, scale))
        if k.prograd > 0:  # the zero-shot KL's gradient, kept for on_after_backward's projection
            assert zs_x is not None
            params = [p for p in self.parts.parameters() if p.requires_grad]
            kl = zero_shot_kl(logits, zs_x, zs_t, scale)
            ref = torch.autograd.grad(kl, params, retain_graph=True, allow_unused=True)
            self._prograd_ref = [(p, h) for p, h in zip(params, ref, strict=True) if h is not None]
        if k.anchors > 0 and self.held_classes is not None:
            source = self._anchor_source if self._anchor_source is not None else zs_t  # [C, D]
            anchors = anchor_loss(source, self.held_classes, f_x, y, f_t, scale, self.class_text_features)
            extra = extra + k.anchors * anchors
        return extra

    def on_after_backward(self: ClientModule) -> None:
        """ProGrad (``knowledge.prograd``): remove the part of this step's gradient that contradicts the zero-shot
        prediction (:func:`mmfl.knowledge.prograd_project`)."""
        ref, self._prograd_ref = self._prograd_ref, None
        if ref is None or self.knowledge is None:
            return
        # the tensors the zero-shot KL reaches; the loss reaches them too (through the same logits)
        pairs = [(p.grad, h) for p, h in ref if p.grad is not None]
        prograd_project([g for g, _ in pairs], [h for _, h in pairs], self.knowledge.prograd)

    def on_train_start(self: ClientModule) -> None:
        """With ``knowledge.anchor_source: merged``, fix the class features the anchors are made from: those of the
        parts as received (the merged state), before this local training moves them."""
        self._anchor_source = None
        k = self.knowledge
        if k is None or k.anchors <= 0 or k.anchor_source != "merged" or self.held_classes is None:
            return
        with torch.no_grad():
            try:
                self._anchor_source = self.class_text_features()  # [C, D]
            except ValueError:
                raise ValueError(
                    "training.knowledge.anchor_source: merged needs class features that do not depend on the input "
                    "(CoCoOp's conditional prompts do); use anchor_source: frozen"
                ) from None
