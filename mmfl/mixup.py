"""Manifold mixup of a batch's joint-space features and of their labels' losses (MixMatch, SemiFL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mix_features(f: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """Each normalised feature [B, D] mixed with another of the batch: ``norm(λ f + (1 − λ) f[perm])``, with
    λ ~ Beta(α, α) per example folded to λ ≥ 0.5 (each mix stays nearer its own example, as in MixMatch).

    Draws λ, then the permutation, from torch's global (CPU) generator. Returns the mixed features [B, D], λ [B]
    and the partners ``perm`` [B].
    """
    b = f.shape[0]
    lam = torch.distributions.Beta(alpha, alpha).sample((b,))  # [B]
    lam = torch.maximum(lam, 1 - lam).to(device=f.device, dtype=f.dtype)
    perm = torch.randperm(b).to(f.device)  # [B]
    return F.normalize(lam[:, None] * f + (1 - lam[:, None]) * f[perm], dim=-1), lam, perm


def mixed_cross_entropy(logits: Tensor, y: Tensor, lam: Tensor, perm: Tensor) -> Tensor:
    """The mean over the batch of ``λ · CE(logits, y) + (1 − λ) · CE(logits, y[perm])`` (logits [B, C], labels [B])."""
    logits, lam = logits.float(), lam.float()
    ce = F.cross_entropy(logits, y, reduction="none")  # [B]
    return (lam * ce + (1 - lam) * F.cross_entropy(logits, y[perm], reduction="none")).mean()
