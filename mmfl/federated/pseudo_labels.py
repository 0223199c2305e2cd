"""Unlabeled clients: each round they label their own data with the merged model's most confident predictions
(class-balanced top-k per class above a confidence threshold, as in unsupervised prompt learning, UPL) and train
on those pseudo-labels like a labeled client."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PseudoLabels:
    """How unlabeled clients choose their pseudo-labels (recipe ``training.pseudo_labels``).

    Each round, before training, an unlabeled client predicts every example of its partition with the model it
    just received (the merged tensors and its own local ones), then keeps, per predicted class, the ``top_k``
    examples with the highest softmax confidence among those whose confidence is at least ``threshold``. The
    kept examples, labelled with their predicted class, are its training data for that round.

    While the merged model is weak, few predictions reach the threshold: an unlabeled client then trains on few
    examples (its weight in the merge is the number it kept) or, with none, sits the round out. On mmfl-mini's
    digits, the 16 most confident zero-shot predictions per class are right 7% of the time, those above 0.9 are
    few (20 of ~350); after four rounds of the labeled clients, 75% and 100% (docs/foundation.md).

    Args:
        top_k: at most this many examples per predicted class (class balance keeps a class the zero-shot model
            favours from taking over); None: every example above the threshold.
        threshold: the lowest softmax confidence a prediction may have to be kept, in [0, 1) (FixMatch keeps
            those above 0.95; UPL has none: 0).
    """

    top_k: int | None = 16
    threshold: float = 0.9

    def check(self) -> None:
        """Raise a clear error for impossible settings."""
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"training.pseudo_labels.top_k must be >= 1 or null (no cap), got {self.top_k}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"training.pseudo_labels.threshold must be in [0, 1), got {self.threshold}")


class NoPseudoLabels(RuntimeError):
    """No prediction of an unlabeled client passed the confidence threshold: it has nothing to train on."""


def select_pseudo_labels(probs: Tensor, top_k: int | None, threshold: float) -> tuple[Tensor, Tensor]:
    """Choose pseudo-labelled examples from predicted class probabilities.

    Per predicted class, the examples of highest confidence (ties: the lower index first) among those whose
    confidence reaches ``threshold``, at most ``top_k`` of them.

    Args:
        probs: class probabilities [N, C].
        top_k: examples kept per predicted class (None: all that pass the threshold).
        threshold: the lowest confidence kept.

    Returns:
        The kept examples' indices [M] (ascending) and their pseudo-labels [M] (long).
    """
    conf, pred = probs.max(dim=1)  # [N], [N]
    kept = []
    for c in range(probs.shape[1]):
        idx = torch.nonzero((pred == c) & (conf >= threshold)).flatten()  # [n_c], ascending
        order = torch.sort(conf[idx], descending=True, stable=True).indices  # stable: ties keep index order
        kept.append(idx[order[: top_k if top_k is not None else len(order)]])
    index = torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long)  # [M]
    return index, pred[index]


def pseudo_label_summary(probs: Tensor, index: Tensor) -> dict[str, float]:
    """What a round's pseudo-labelling did, without any true label: ``kept`` (examples chosen), ``of`` (examples
    predicted), ``confidence`` (mean confidence of the kept ones; NaN when none) and ``classes`` (classes among
    the kept pseudo-labels)."""
    conf, pred = probs.max(dim=1)
    kept = conf[index]
    return {
        "kept": float(index.numel()),
        "of": float(probs.shape[0]),
        "confidence": float(kept.mean()) if index.numel() else math.nan,
        "classes": float(pred[index].unique().numel()),
    }
