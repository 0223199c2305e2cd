"""Aggregation: pure-torch merging of trainable tensors, per scope group (= per payload key)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK_BYTES = 64 * 2**20
"""A coordinate-wise rule merges a key whose float64 copies would take more bytes than this without stacking them
(:meth:`Aggregator.merge_large`, in slices of at most this many bytes): 100 replies of a 3 MiB MaPLe tensor (ViT-B/16)
would otherwise be stacked as 600 MB, and weighted as much again. A mean rule never stacks (:meth:`Aggregator.running`).
"""


@dataclass
class Update:
    """One client's reply to a round: its non-local trainable tensors and its example count."""

    cid: str
    state: dict[str, Tensor]
    num_examples: int


class Aggregator(ABC):
    """Merges the copies of one tensor returned by the clients of its scope group.

    Stateful aggregators (server optimizers such as :class:`FedAvgM`) keep their state in
    :meth:`state_dict` so that a checkpoint can restore it exactly.
    """

    coordinatewise: bool = False
    """Each coordinate's merge depends on that coordinate's copies only (a mean, a median), so a large key is merged
    without stacking its copies (:meth:`merge_large`, :data:`CHUNK_BYTES`). Rules over whole vectors (Krum, FLAME)
    see every copy whole."""

    @abstractmethod
    def merge(self, key: str, tensors: Tensor, weights: Tensor, current: Tensor | None = None) -> Tensor:
        """Merge ``tensors`` [K, ...] (one per client, float64) with example counts ``weights`` [K].

        Args:
            key: the payload key (its scope group).
            tensors: the clients' copies, float64 [K, ...].
            weights: the clients' example counts, float64 [K].
            current: the server's tensor before this round, float64 [...] (None when unknown).
        """

    def state_dict(self) -> dict[str, Tensor]:
        """The aggregator's state (server-optimizer buffers); empty for stateless rules."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but was given {sorted(state)}")

    @property
    def rule(self) -> Aggregator:
        """The rule that merges the clients' copies (a server optimizer's base rule; else the aggregator itself)."""
        return self

    def server_step(self, key: str, merged: Tensor, current: Tensor | None) -> Tensor:
        """What the server makes of a key's merge (float64 [...]): a server optimizer's step; else the merge."""
        return merged

    def merge_large(self, key: str, copies: Sequence[Tensor], weights: Tensor, current: Tensor | None) -> Tensor:
        """:meth:`merge` of a key too large to stack (a :attr:`coordinatewise` rule): ``copies`` are the K clients'
        tensors [...] in any float dtype; the result is :meth:`merge`'s bit for bit (default: in slices)."""
        return merge_in_slices(self, key, copies, weights, current)

    def running(self, key: str) -> RunningMerge | None:
        """A merge of ``key`` that takes the copies one at a time as the replies arrive, holding none of them (a mean
        rule); None when the rule needs every copy at once (the default)."""
        return None

    def merge_copies(self, key: str, copies: Sequence[Tensor], weights: Tensor, current: Tensor | None) -> Tensor:
        """:meth:`merge` of the K copies [...] (any float dtype; ``weights`` [K]): stacked in float64, or by
        :meth:`merge_large` for a :attr:`coordinatewise` rule when the stack would pass :data:`CHUNK_BYTES`."""
        if self.coordinatewise and len(copies) * copies[0].numel() * 8 > CHUNK_BYTES:
            return self.merge_large(key, copies, weights, current)
        return self.merge(key, torch.stack([t.detach().to(torch.float64) for t in copies]), weights, current)

    def group_weight(self, weights: Tensor) -> float | None:
        """The weight a group of copies (example counts ``weights`` [K]) carries in a mean over groups, so that the
        mean of group merges equals the merge of all their copies; None for rules that are not weighted means."""
        return None


class FedAvg(Aggregator):
    """Federated averaging (McMahan et al., 2017): the example-weighted mean.

    Args:
        weighted: weight each client by its example count; False gives the plain mean (PromptFL).
    """

    coordinatewise = True

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted

    def running(self, key: str) -> RunningMean:
        """The weighted mean taken one copy at a time (what :meth:`merge` computes too)."""
        return RunningMean(key, self.weighted)

    def merge(self, key: str, tensors: Tensor, weights: Tensor, current: Tensor | None = None) -> Tensor:
        """Weighted mean over the client axis: ``Σ_k w_k t_k / Σ_k w_k``, summed in client order. [K, ...] → [...]."""
        mean = self.running(key)
        for t, w in zip(tensors, weights.tolist(), strict=True):
            mean.add(t, w)
        return mean.result()

    def group_weight(self, weights: Tensor) -> float:
        """The group's example count (weighted), or its number of copies (unweighted)."""
        return float(weights.sum()) if self.weighted else float(weights.numel())


class RunningMerge(ABC):
    """A key's merge fed one copy at a time, in client order (:meth:`Aggregator.running`)."""

    @abstractmethod
    def add(self, copy: Tensor, weight: float) -> None:
        """Take one client's copy [...] (any float dtype) with its example count."""

    @abstractmethod
    def result(self) -> Tensor:
        """The merge of every copy added, float64 [...]."""


class RunningMean(RunningMerge):
    """FedAvg's mean as copies arrive: a float64 sum of ``w_k · t_k`` [...] in client order, divided by ``Σ w_k`` at
    the end (``w_k`` the example count, or 1 when unweighted). Holds one sum, never the copies."""

    def __init__(self, key: str, weighted: bool = True) -> None:
        self.key = key
        self.weighted = weighted
        self.sum: Tensor | None = None  # float64 [...]
        self.total = 0.0

    def add(self, copy: Tensor, weight: float) -> None:
        """Add ``weight · copy`` to the sum."""
        w = float(weight) if self.weighted else 1.0
        term = copy.detach().to(torch.float64) * w  # [...]
        if self.sum is None:
            self.sum = term
        else:
            self.sum += term
        self.total += w

    def result(self) -> Tensor:
        """The weighted mean, float64 [...].

        Raises:
            ValueError: the weights sum to 0 or less (nothing to average).
        """
        if self.sum is None or self.total <= 0:
            raise ValueError(f"{self.key}: the clients' weights sum to {self.total}; cannot average")
        return self.sum / self.total


class FedAvgM(Aggregator):
    """A server optimizer: SGD with momentum on the pseudo-gradient (Hsu et al., 2019; Reddi et al., 2021).

    The base rule merges the clients' copies; the pseudo-gradient is ``current - merged``; the server keeps
    one momentum buffer per key: ``m ← momentum · m + g``, ``new = current - server_lr · m``. With
    ``momentum=0`` and ``server_lr=1`` it equals the base rule.

    Args:
        server_lr: the server's learning rate.
        momentum: the momentum factor in [0, 1).
        base: the rule that merges the clients' copies (FedAvg, or a robust rule).
    """

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, base: Aggregator | None = None) -> None:
        if server_lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"FedAvgM needs server_lr > 0 and 0 <= momentum < 1, got {server_lr}, {momentum}")
        self.server_lr = server_lr
        self.momentum = momentum
        self.base = base or FedAvg()
        self.buffers: dict[str, Tensor] = {}

    def merge(self, key: str, tensors: Tensor, weights: Tensor, current: Tensor | None = None) -> Tensor:
        """``current - server_lr · m`` with the updated momentum buffer ``m`` of ``key``. [K, ...] → [...]."""
        return self.server_step(key, self.base.merge(key, tensors, weights, current), current)

    @property
    def rule(self) -> Aggregator:
        """The base rule."""
        return self.base

    def group_weight(self, weights: Tensor) -> float | None:
        """The base rule's."""
        return self.base.group_weight(weights)

    def server_step(self, key: str, merged: Tensor, current: Tensor | None) -> Tensor:
        """One momentum step from ``current`` towards ``merged`` (float64 [...]), updating ``key``'s buffer."""
        if current is None:
            raise ValueError(f"{key}: FedAvgM needs the server's current tensor")
        g = current - merged  # pseudo-gradient [...]
        m = self.buffers.get(key)
        m = g.clone() if m is None else self.momentum * m + g
        self.buffers[key] = m
        return current - self.server_lr * m

    def state_dict(self) -> dict[str, Tensor]:
        """The momentum buffers by key (float64)."""
        return {f"momentum/{k}": v.clone() for k, v in self.buffers.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the momentum buffers."""
        bad = [k for k in state if not k.startswith("momentum/")]
        if bad:
            raise ValueError(f"FedAvgM state has unexpected entries {bad}")
        self.buffers = {k.removeprefix("momentum/"): v.to(torch.float64).clone() for k, v in state.items()}


def update_norms(updates: Sequence[Update], current: Mapping[str, Tensor]) -> list[float]:
    """Each client's update norm: the L2 norm of (its tensors − the current global ones) over all its keys."""
    norms = []
    for u in updates:
        sq = sum(float(((t.to(torch.float64) - current[k].to(torch.float64)) ** 2).sum()) for k, t in u.state.items())
        norms.append(math.sqrt(sq))
    return norms


def clip_updates(updates: Sequence[Update], current: Mapping[str, Tensor], max_norm: float) -> list[Update]:
    """Scale each client's update (over all its keys together) to L2 norm ≤ ``max_norm``.

    The update of client k is ``Δ_k = θ_k − θ`` over the keys it returned; the clipped reply is
    ``θ + Δ_k · min(1, max_norm / ‖Δ_k‖)`` (computed in float64, cast back to each tensor's dtype).
    """
    if not max_norm > 0:
        raise ValueError(f"clip norm must be > 0, got {max_norm}")
    out = []
    for u, norm in zip(updates, update_norms(updates, current), strict=True):
        scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
        state = {
            k: (current[k].to(torch.float64) + (t.to(torch.float64) - current[k].to(torch.float64)) * scale).to(t.dtype)
            for k, t in u.state.items()
        }
        out.append(Update(u.cid, state, u.num_examples))
    return out


def ordered_sum(rows: Tensor) -> Tensor:
    """The sum over the first axis, one row after another: each coordinate's sum is the same whatever the tensor's
    layout or width (torch's reductions split a sum differently for different widths and threads, which would make a
    merge in slices differ from the whole merge in the last bit). [K, ...] → [...]."""
    out = rows[0].clone()  # [...]
    for row in rows[1:]:
        out += row
    return out


def merge_in_slices(
    rule: Aggregator, key: str, tensors: Sequence[Tensor], weights: Tensor, current: Tensor | None
) -> Tensor:
    """A coordinate-wise ``rule``'s merge of ``tensors`` (K copies [...]) one slice of coordinates at a time, at most
    :data:`CHUNK_BYTES` of float64 copies per slice: each coordinate's result is the whole merge's, bit for bit.

    Args:
        rule: a rule with :attr:`Aggregator.coordinatewise`.
        key: the payload key.
        tensors: the clients' copies, any float dtype, each [...].
        weights: their example counts, float64 [K].
        current: the server's tensor before this round, float64 [...] (or None).
    """
    k, shape = len(tensors), tensors[0].shape
    flat = [t.detach().reshape(-1) for t in tensors]  # K × [P]
    now = current.reshape(-1) if current is not None else None  # [P]
    out = torch.empty(flat[0].numel(), dtype=torch.float64)  # [P]
    step = max(1, CHUNK_BYTES // (8 * k))
    for a in range(0, out.numel(), step):
        b = min(a + step, out.numel())
        part = torch.empty((k, b - a), dtype=torch.float64)  # [K, n]
        for i, f in enumerate(flat):
            part[i].copy_(f[a:b])
        out[a:b] = rule.merge(key, part, weights, None if now is None else now[a:b])
    return out.reshape(shape)
