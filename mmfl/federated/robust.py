"""Byzantine-robust merge rules: coordinate-wise median, trimmed mean, (multi-)Krum and FLAME.

Each works per payload key, over the copies returned by that key's scope group (the same grouping as
FedAvg), and ignores example counts: a client cannot buy influence by claiming more examples.
Update-norm clipping (``federation.clip_norm``) is applied before any of them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from mmfl.federated.aggregate import Aggregator, ordered_sum

log = logging.getLogger(__name__)


class Median(Aggregator):
    """Coordinate-wise median (Yin et al., 2018); with an even number of copies, the mean of the two middle ones."""

    coordinatewise = True

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

    coordinatewise = True

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"TrimmedMean needs 0 <= beta < 0.5, got {beta}")
        self.beta = beta

    def merge(self, key: str, tensors: Tensor, weights: Tensor, current: Tensor | None = None) -> Tensor:
        """[K, ...] → [...]."""
        k = tensors.shape[0]
        cut = min(int(self.beta * k), (k - 1) // 2)
        s = tensors.sort(dim=0).values  # [K, ...]
        return ordered_sum(s[cut : k - cut]) / (k - 2 * cut)


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


class Flame(Aggregator):
    """FLAME (Nguyen et al., USENIX Security 2022), per payload key: cluster, clip adaptively, add a little noise.

    With ``Δ_k`` = copy k − the current tensor ([K, ...] → [K, P] flattened):

    1. **Cluster** the updates by cosine distance with HDBSCAN (``min_cluster_size = K // 2 + 1``, one cluster
       allowed): only the majority cluster is admitted, so updates that point elsewhere than most (sign flips,
       backdoors that pull away from the task) are dropped. With fewer than 3 copies, or no cluster, all are admitted.
    2. **Clip adaptively**: ``S`` = the median of all K update norms; each admitted update is scaled to norm ≤ S
       (no hand-set bound: boosted updates shrink to an honest size).
    3. **Average** the admitted, clipped updates (example counts ignored, as the other robust rules) and add
       Gaussian noise of std ``noise · S`` per coordinate (FLAME's λ; 0 turns it off).

    The noise comes from a generator seeded by ``seed``, the key and how many times the key was merged; those counts
    are the rule's state (in checkpoints), so a resumed run draws the same noise. Without a current tensor (the wide
    merge of a mixed scope), updates are taken relative to the copies' mean.

    Args:
        noise: the noise level λ relative to the clipping bound (FLAME: 0.001 for image classification).
        seed: seeds the noise.
    """

    def __init__(self, noise: float = 0.001, seed: int = 0) -> None:
        if not noise >= 0:
            raise ValueError(f"Flame needs noise >= 0, got {noise}")
        self.noise = noise
        self.seed = seed
        self.calls: dict[str, int] = {}
        self.last_admitted: dict[str, list[int]] = {}  # per key, the copies admitted by the latest merge

    def admitted(self, deltas: Tensor) -> list[int]:
        """Indices of the copies in the majority cosine cluster. [K, P] → list."""
        from sklearn.cluster import HDBSCAN

        k = deltas.shape[0]
        if k < 3:
            return list(range(k))
        unit = deltas / deltas.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [K, P]
        distance = (1 - unit @ unit.T).clamp(0, 2).fill_diagonal_(0)  # [K, K] cosine distances
        labels = HDBSCAN(
            min_cluster_size=k // 2 + 1, min_samples=1, metric="precomputed", allow_single_cluster=True, copy=True
        ).fit_predict(distance.numpy())
        clusters = [int(label) for label in labels if label >= 0]
        if not clusters:
            return list(range(k))
        majority = max(set(clusters), key=clusters.count)
        return [i for i in range(k) if labels[i] == majority]

    def merge(self, key: str, tensors: Tensor, weights: Tensor, current: Tensor | None = None) -> Tensor:
        """[K, ...] → [...]."""
        k = tensors.shape[0]
        base = current if current is not None else tensors.mean(dim=0)
        deltas = (tensors - base).reshape(k, -1)  # [K, P]
        norms = deltas.norm(dim=1)  # [K]
        bound = float(norms.median()) if k % 2 else float(norms.sort().values[k // 2 - 1 : k // 2 + 1].mean())
        keep = self.admitted(deltas)
        self.last_admitted[key] = keep
        scale = (bound / norms[keep].clamp_min(1e-300)).clamp(max=1.0)  # [A]
        merged = (deltas[keep] * scale[:, None]).mean(dim=0)  # [P]
        calls = self.calls.get(key, 0)
        self.calls[key] = calls + 1
        if self.noise > 0 and bound > 0:
            g = torch.Generator().manual_seed(hash_seed(self.seed, key, calls))
            merged = merged + self.noise * bound * torch.randn(merged.shape, generator=g, dtype=merged.dtype)
        return base + merged.reshape(base.shape)

    def state_dict(self) -> dict[str, Tensor]:
        """How many times each key was merged (it seeds the noise)."""
        return {f"calls/{k}": torch.tensor(v, dtype=torch.int64) for k, v in self.calls.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        bad = [k for k, v in state.items() if not k.startswith("calls/") or v.numel() != 1]
        if bad:
            raise ValueError(f"Flame state has unexpected entries {bad}")
        self.calls = {k.removeprefix("calls/"): int(v) for k, v in state.items()}


def hash_seed(seed: int, key: str, count: int) -> int:
    """A 63-bit seed from (seed, key, count), stable across processes (Python's str hash is not)."""
    digest = hashlib.sha256(f"{seed}|{key}|{count}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
