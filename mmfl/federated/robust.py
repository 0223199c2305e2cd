"""Byzantine-robust merge rules: coordinate-wise median, trimmed mean and (multi-)Krum.

Each works per payload key, over the copies returned by that key's scope group (the same grouping as
FedAvg), and ignores example counts: a client cannot buy influence by claiming more examples.
Update-norm clipping (``federation.clip_norm``) is applied before any of them.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from mmfl.federated.aggregate import Aggregator

log = logging.getLogger(__name__)


class Median(Aggregator):
    """Coordinate-wise median (Yin et al., 2018); with an even number of copies, the mean of the two middle ones."""

    def merge(self, key: str, tensors: Tensor, weights: Tensor, current: Tensor | None = None) -> Tensor:
        """[K, ...] → [...]."""
        k = tensors.shape[0]
        s = tensors.sort(dim=0).values  # [K, ...]
        if k % 2:
            return s[k // 2]
        return (s[k // 2 - 1] + s[k // 2]) / 2


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., 2018): drop the ``floor(beta · K)`` largest and smallest values
    of each coordinate, average the rest.

    Args:
        beta: the share trimmed at each end, in [0, 0.5). At least one value per coordinate is always kept.
    """

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"TrimmedMean needs 0 <= beta < 0.5, got {beta}")
        self.beta = beta

    def merge(self, key: str, tensors: Tensor, weights: Tensor, current: Tensor | None = None) -> Tensor:
        """[K, ...] → [...]."""
        k = tensors.shape[0]
        cut = min(int(self.beta * k), (k - 1) // 2)
        s = tensors.sort(dim=0).values  # [K, ...]
        return s[cut : k - cut].mean(dim=0)


class Krum(Aggregator):
    """(Multi-)Krum (Blanchard et al., 2017; El Mhamdi et al., 2018).

    Each copy is scored by the sum of squared L2 distances to its ``K - f - 2`` nearest other copies; the
    ``m`` copies with the lowest scores are averaged (``m=1``: Krum). Its guarantee needs ``K ≥ 2f + 3``
    copies of a key; with fewer, the neighbour count is cut to ``max(1, K - f - 2)`` and a warning is logged.

    Args:
        f: the number of Byzantine clients to tolerate (per scope group).
        m: how many selected copies to average (1: Krum; more: multi-Krum).
    """

    def __init__(self, f: int = 1, m: int = 1) -> None:
        if f < 0 or m < 1:
            raise ValueError(f"Krum needs f >= 0 and m >= 1, got f={f}, m={m}")
        self.f = f
        self.m = m
        self._warned: set[str] = set()

    def scores(self, tensors: Tensor) -> Tensor:
        """The Krum score of each copy. [K, ...] → [K]."""
        k = tensors.shape[0]
        flat = tensors.reshape(k, -1)  # [K, P]
        d = torch.cdist(flat, flat).pow(2)  # [K, K] squared distances
        n = max(1, k - self.f - 2)
        d = d + torch.diag(torch.full((k,), torch.inf, dtype=d.dtype))  # a copy is not its own neighbour
        return d.sort(dim=1).values[:, :n].sum(dim=1)  # [K]

    def select(self, tensors: Tensor) -> list[int]:
        """Indices of the ``m`` copies with the lowest scores (ties: the earlier client)."""
        k = tensors.shape[0]
        if k == 1:
            return [0]
        s = self.scores(tensors)
        order = sorted(range(k), key=lambda i: (float(s[i]), i))
        return sorted(order[: min(self.m, k)])

    def merge(self, key: str, tensors: Tensor, weights: Tensor, current: Tensor | None = None) -> Tensor:
        """The mean of the selected copies. [K, ...] → [...]."""
        k = tensors.shape[0]
        if k < 2 * self.f + 3 and key not in self._warned:
            self._warned.add(key)
            log.warning(
                "Krum(f=%d): %s has %d copies, fewer than 2f+3 = %d; no robustness guarantee",
                self.f,
                key,
                k,
                2 * self.f + 3,
            )
        return tensors[self.select(tensors)].mean(dim=0)
