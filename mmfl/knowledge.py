"""Knowledge guidance: keep the learned parts close to what the frozen model already knows.

Prompt tuning on a few shots gains on the classes it sees and loses on the others: the learned class features
drift away from the hand-written prompt's, which is what carries the foundation model's knowledge to classes and
data it was never tuned on. These regularisers, added to a client's cross-entropy, pull the learned features back:

- ``text`` — KgCoOp (Yao et al., CVPR 2023): ``1 − cos(t_c, t̂_c)``, the mean over classes ``c`` of one minus the
  cosine between the learned class text feature ``t_c`` and the hand-written prompts' ``t̂_c`` (the task's
  template ensemble); equals half their squared L2 distance, as both are normalised. KgCoOp uses weight 8.
- ``text_l1``, ``input_l1``, ``logits_kl`` — PromptSRC's self-regulating consistency (Khattak et al., ICCV 2023):
  the mean absolute difference between the learned and the frozen class text features (weight 25 in the paper),
  between the input features with and without the parts (10), and ``KL(p̂ ‖ p)`` from the frozen model's class
  probabilities ``p̂`` (its input features against ``t̂``) to the learned ones ``p`` (1).

- ``prograd`` — ProGrad (Zhu et al., ICCV 2023): when the training loss's gradient ``g`` points against the
  gradient ``h`` of ``KL(p̂ ‖ p)`` (the frozen model's general knowledge), its conflicting component is removed:
  ``g ← g − λ · (g·h / ‖h‖²) · h`` over all trainable tensors together; otherwise ``g`` is kept. The weight is ``λ``
  (paper: 1).
- ``anchors`` — synthetic class anchors against label skew: for each class of the task the client does not hold, a
  pseudo input feature made from its hand-written text feature, moved across the modality gap (the batch's mean
  input feature minus the mean hand-written feature of its labels, detached), enters the cross-entropy with that
  class as label, so a client's prompt keeps telling apart the classes it never sees. Built from class names and
  the client's own batch only. With ``anchor_source: merged`` the anchors start from the class features of the
  prompt the client received this round (what the federation learned so far) instead of the hand-written ones.
- ``unseen_blend`` — not a training term: for class names the parts were never trained on (novel classes, another
  data set's), the class features are ``norm((1 − w)·t_c + w·t̂_c)``, the learned features mixed with the
  hand-written ones (WiSE-FT's ensemble of the tuned and the zero-shot classifier, Wortsman et al., CVPR 2022),
  so what the parts learned on a few base classes does not override what the frozen model knows of the others.
  The classes the parts trained on are scored as without it.

One implementation for every part: the terms read only the client's final class text features and input features,
so they apply to CoOp, CoCoOp, MaPLe, adapters and any plugin part alike. With every weight 0 nothing is computed
and training is exactly unguided.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ANCHOR_SOURCES = ("frozen", "merged")


@dataclass
class KnowledgeGuidance:
    """Weights of the knowledge-guidance terms added to each client's training loss (recipe ``training.knowledge``).

    Args:
        text: KgCoOp's ``1 − cos`` between learned and hand-written class text features (paper: 8.0).
        text_l1: PromptSRC's L1 between learned and hand-written class text features (paper: 25.0).
        input_l1: PromptSRC's L1 between the input features with the parts and without them (paper: 10.0).
        logits_kl: PromptSRC's ``KL(zero-shot ‖ learned)`` of the class probabilities (paper: 1.0).
        temperature: softens both distributions of ``logits_kl`` (the term is scaled by its square).
        prograd: ProGrad's ``λ``: how much of the gradient component that contradicts the zero-shot prediction is
            removed (1: all of it, as the paper; 0: off).
        anchors: weight of the cross-entropy of synthetic anchors for the classes a client does not hold.
        anchor_source: the class features the anchors are made from: ``frozen`` (the hand-written prompts') or
            ``merged`` (the received prompt's at the start of each round's local training, held fixed during it).
        unseen_blend: the hand-written features' share ``w`` in [0, 1] of the class features of class names the
            parts were not trained on (0: the learned features alone; 1: the zero-shot classifier). Changes
            scoring only, never training.
    """

    text: float = 0.0
    text_l1: float = 0.0
    input_l1: float = 0.0
    logits_kl: float = 0.0
    temperature: float = 1.0
    prograd: float = 0.0
    anchors: float = 0.0
    anchor_source: str = "frozen"
    unseen_blend: float = 0.0

    def check(self) -> None:
        """Raise a clear error for negative weights, a non-positive temperature, an unknown anchor source or an
        ``unseen_blend`` outside [0, 1]."""
        bad = {
            k: v
            for k, v in vars(self).items()
            if k not in ("temperature", "anchor_source", "unseen_blend") and not v >= 0
        }
        if bad:
            raise ValueError(f"training.knowledge weights must be >= 0, got {bad}")
        if not self.temperature > 0:
            raise ValueError(f"training.knowledge.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.unseen_blend <= 1.0:
            raise ValueError(
                f"training.knowledge.unseen_blend must be in [0, 1] (the hand-written features' share), "
                f"got {self.unseen_blend}"
            )
        if self.anchor_source not in ANCHOR_SOURCES:
            raise ValueError(
                f"training.knowledge.anchor_source must be one of {list(ANCHOR_SOURCES)}, got {self.anchor_source!r}"
            )

    @property
    def active(self) -> bool:
        """Whether any training term has a positive weight (``unseen_blend`` changes scoring only)."""
        return any(w > 0 for w in (self.text, self.text_l1, self.input_l1, self.logits_kl, self.prograd, self.anchors))

    @property
    def needs_frozen_input(self) -> bool:
        """Whether a term needs the frozen model's input features (an extra pass without the parts)."""
        return self.input_l1 > 0 or self.logits_kl > 0 or self.prograd > 0

    def terms(
        self,
        f_t: Tensor,
        zs_t: Tensor,
        logits: Tensor | None = None,
        f_x: Tensor | None = None,
        zs_x: Tensor | None = None,
        logit_scale: Tensor | float = 1.0,
    ) -> dict[str, Tensor]:
        """The weighted terms with a positive weight, by name (each a 0-d tensor; their sum joins the loss).

        Args:
            f_t: learned normalised class text features, [C, D] or [B, C, D] (input-conditioned prompts).
            zs_t: hand-written normalised class text features [C, D].
            logits: the learned logits [B, C] (for ``logits_kl``).
            f_x: normalised input features with the parts [B, D] (for ``input_l1``).
            zs_x: normalised input features of the frozen model [B, D] (for ``input_l1`` and ``logits_kl``).
            logit_scale: the frozen model's ``exp(logit_scale)``, for the zero-shot logits.
        """
        out: dict[str, Tensor] = {}
        ref = zs_t.to(f_t.dtype).expand_as(f_t)  # [C, D] or [B, C, D]
        if self.text > 0:
            out["kg_text"] = self.text * (1.0 - F.cosine_similarity(f_t, ref, dim=-1).mean())
        if self.text_l1 > 0:
            out["src_text"] = self.text_l1 * F.l1_loss(f_t, ref)
        if self.input_l1 > 0:
            assert f_x is not None and zs_x is not None
            out["src_input"] = self.input_l1 * F.l1_loss(f_x, zs_x.to(f_x.dtype))
        if self.logits_kl > 0:
            assert logits is not None and zs_x is not None
            tau = self.temperature
            # KL(q ‖ p) summed over classes, mean over the batch (PromptSRC divides by B·C instead)
            out["src_logits"] = self.logits_kl * tau * tau * zero_shot_kl(logits, zs_x, zs_t, logit_scale, tau)
        return out


def zero_shot_kl(logits: Tensor, zs_x: Tensor, zs_t: Tensor, logit_scale: Tensor | float, tau: float = 1.0) -> Tensor:
    """``KL(p̂ ‖ p)`` summed over classes, mean over the batch: ``p̂`` the frozen model's class probabilities (its
    input features ``zs_x`` [B, D] against the hand-written ``zs_t`` [C, D]), ``p`` the learned ones (``logits``
    [B, C]); both at temperature ``tau``. 0-d."""
    zs_logits = logit_scale * zs_x.float() @ zs_t.float().t()  # [B, C]
    log_p = F.log_softmax(logits.float() / tau, dim=-1)  # [B, C]
    log_q = F.log_softmax(zs_logits / tau, dim=-1)  # [B, C]
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean()


@torch.no_grad()
def prograd_project(grads: list[Tensor], reference: list[Tensor], lam: float) -> None:
    """ProGrad's update, in place: when ``g·h < 0`` over all tensors together, ``g ← g − λ (g·h / ‖h‖²) h``.

    Args:
        grads: the training loss's gradient ``g``, one tensor per parameter (changed in place).
        reference: the gradient ``h`` of the zero-shot KL, same shapes.
        lam: ``λ`` (1 removes the whole conflicting component).
    """
    dot = torch.stack([(g.float() * h.float()).sum() for g, h in zip(grads, reference, strict=True)]).sum()
    norm2 = torch.stack([h.float().pow(2).sum() for h in reference]).sum()
    coef = lam * dot.clamp(max=0.0) / norm2.clamp_min(1e-30)  # 0 unless they conflict: no device sync
    for g, h in zip(grads, reference, strict=True):
        g.sub_((coef * h.float()).to(g.dtype))


def anchor_features(zs_t: Tensor, missing: Tensor, f_x: Tensor, labels: Tensor) -> Tensor:
    """Pseudo input features of the ``missing`` classes: their class text features shifted by the modality gap
    seen in this batch, normalised. [M, D]

    Args:
        zs_t: the normalised class text features anchors are made from (hand-written or merged) [C, D].
        missing: the classes to make anchors for [M].
        f_x: the batch's normalised input features [B, D] (detached here).
        labels: the batch's labels [B].
    """
    gap = (f_x.detach() - zs_t[labels].to(f_x.dtype)).mean(dim=0)  # [D]
    return F.normalize(zs_t[missing].to(f_x.dtype) + gap, dim=-1)  # [M, D]


def anchor_loss(
    source: Tensor,
    held: Sequence[int],
    f_x: Tensor,
    y: Tensor,
    f_t: Tensor,
    scale: Tensor,
    conditioned: Callable[[Tensor], Tensor],
) -> Tensor | float:
    """Cross-entropy of the synthetic anchors (:func:`anchor_features`) of the classes a client does not hold.

    Args:
        source: the class features the anchors are made from [C, D].
        held: the labels of the client's training data (the other classes get anchors; none missing: 0).
        f_x, y: the batch's input features [B, D] and labels [B].
        f_t: the class features the batch was scored with, [C, D] or input-conditioned [B, C, D].
        scale: the logit scale.
        conditioned: input features [M, D] → class features [M, C, D], used when ``f_t`` is input-conditioned (the
            anchors are scored with class features conditioned on themselves).
    """
    missing = sorted(set(range(source.shape[0])) - set(held))
    if not missing:
        return 0.0
    m = torch.tensor(missing, device=f_x.device)
    a = anchor_features(source, m, f_x, y)  # [M, D]
    if f_t.dim() == 3:
        a_logits = scale * torch.einsum("md,mcd->mc", a, conditioned(a).to(a.dtype))
    else:
        a_logits = scale * a @ f_t.t()  # [M, C]
    return F.cross_entropy(a_logits.float(), m)


def unseen_mix(f_t: Tensor, zs_t: Tensor, w: float) -> Tensor:
    """``norm((1 − w)·f_t + w·zs_t)``: the class features of class names the parts were not trained on, mixed with
    the hand-written ones (``KnowledgeGuidance.unseen_blend``).

    Args:
        f_t: the learned normalised class features [C, D] or [B, C, D].
        zs_t: the hand-written normalised class features [C, D].
        w: the hand-written features' share in [0, 1].
    """
    return F.normalize((1.0 - w) * f_t + w * zs_t.to(f_t.dtype), dim=-1)


def total(terms: dict[str, Tensor]) -> Tensor | float:
    """The sum of :meth:`KnowledgeGuidance.terms` (0.0 when empty)."""
    return torch.stack(list(terms.values())).sum() if terms else 0.0
