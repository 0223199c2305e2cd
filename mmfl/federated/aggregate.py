"""Aggregation: pure-torch merging of trainable tensors, per scope group (= per payload key)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmfl.federated.scopes import is_local


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


class FedAvg(Aggregator):
    """Federated averaging (McMahan et al., 2017): the example-weighted mean.

    Args:
        weighted: weight each client by its example count; False gives the plain mean (PromptFL).
    """

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted

    def merge(self, key: str, tensors: Tensor, weights: Tensor, current: Tensor | None = None) -> Tensor:
        """Weighted mean over the client axis. [K, ...] → [...]."""
        w = weights if self.weighted else torch.ones_like(weights)
        if float(w.sum()) <= 0:
            raise ValueError(f"{key}: the clients' weights sum to {float(w.sum())}; cannot average")
        w = (w / w.sum()).reshape(-1, *([1] * (tensors.dim() - 1)))  # [K, 1, ...]
        return (tensors * w).sum(dim=0)


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
        merged = self.base.merge(key, tensors, weights, current)  # [...]
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


def group(updates: Sequence[Update]) -> dict[str, list[tuple[Update, Tensor]]]:
    """The replies of each key, in client order (sorted keys).

    Raises:
        ValueError: a ``local/`` key was sent, or clients disagree on a tensor's shape or dtype.
    """
    by_key: dict[str, list[tuple[Update, Tensor]]] = {}
    for u in updates:
        for key, t in u.state.items():
            if is_local(key):
                raise ValueError(f"client {u.cid} sent local tensor {key!r}; local tensors never leave a client")
            by_key.setdefault(key, []).append((u, t))
    for key, pairs in by_key.items():
        first = pairs[0][1]
        for u, t in pairs[1:]:
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(
                    f"{key}: client {u.cid} sent {tuple(t.shape)} {t.dtype}, client {pairs[0][0].cid} sent "
                    f"{tuple(first.shape)} {first.dtype}"
                )
    return {k: by_key[k] for k in sorted(by_key)}


def aggregate(
    updates: Sequence[Update], aggregator: Aggregator, current: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Merge each key over exactly the clients that returned it.

    Keys carry their scope group (``task/digits/coop.ctx``), so clients of different tasks never mix
    in a ``task`` tensor, while a ``global`` tensor is merged over everyone. Arithmetic is in float64
    and the result is cast back to the clients' dtype.

    Args:
        updates: the clients' replies.
        aggregator: the merge rule.
        current: the server's tensors before the round (needed by server optimizers such as FedAvgM).

    Raises:
        ValueError: a ``local/`` key was sent, or clients disagree on a tensor's shape or dtype.
    """
    merged = {}
    for key, pairs in group(updates).items():
        first = pairs[0][1]
        stacked = torch.stack([t.detach().to(torch.float64) for _, t in pairs])  # [K, ...]
        weights = torch.tensor([float(u.num_examples) for u, _ in pairs], dtype=torch.float64)  # [K]
        cur = current[key].detach().to(torch.float64) if current is not None and key in current else None
        merged[key] = aggregator.merge(key, stacked, weights, cur).to(first.dtype)
    return merged
