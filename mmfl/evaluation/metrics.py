"""Metrics of the evaluation protocol, from logits: top-1 (optionally within a class subset), calibration
error, harmonic mean, and mean ± std over seeds."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_calibration_error


def restrict(logits: Tensor, labels: Tensor, classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Keep the examples of ``classes`` and only those classes' logits, relabelled ``0 .. len(classes)-1``.

    Args:
        logits: [N, C].
        labels: [N] in ``0 .. C-1``.
        classes: the subset (each in ``0 .. C-1``).

    Returns:
        ``(logits [M, K], labels [M])`` with K = len(classes).
    """
    cls = torch.as_tensor(list(classes), dtype=torch.long)
    remap = torch.full((logits.shape[1],), -1, dtype=torch.long)
    remap[cls] = torch.arange(len(cls))
    keep = remap[labels] >= 0  # [N]
    return logits[keep][:, cls], remap[labels[keep]]


def accuracy(logits: Tensor, labels: Tensor, classes: Sequence[int] | None = None) -> float:
    """Top-1 accuracy in [0, 1]; within ``classes`` (examples and candidates) when given. NaN when no example."""
    if classes is not None:
        logits, labels = restrict(logits, labels, classes)
    if labels.numel() == 0:
        return math.nan
    return float((logits.argmax(dim=1) == labels).float().mean())


def calibration_error(logits: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (L1, equal-width confidence bins) of the softmax of ``logits`` [N, C]."""
    if labels.numel() == 0:
        return math.nan
    probs = logits.float().softmax(dim=1)  # [N, C]
    return float(multiclass_calibration_error(probs, labels, num_classes=logits.shape[1], n_bins=n_bins, norm="l1"))


def harmonic_mean(base: float, novel: float) -> float:
    """``2·B·N / (B + N)`` — the base-to-novel summary; 0 when both are 0."""
    if math.isnan(base) or math.isnan(novel):
        return math.nan
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def scores(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """``{"top1", "ece", "n"}`` of one set of predictions."""
    return {"top1": accuracy(logits, labels), "ece": calibration_error(logits, labels, n_bins), "n": labels.numel()}


def mean_std(values: Iterable[float]) -> dict[str, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the finite values, and their count."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(v)}


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    """Nested dicts of numbers → ``{"a/b/c": value}``."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, path + "/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[path] = float(v)
    return out
