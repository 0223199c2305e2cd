"""Aggregation: pure-torch merging of trainable tensors, per scope group (= per payload key)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
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
    """Merges the copies of one tensor returned by the clients of its scope group."""

    @abstractmethod
    def merge(self, key: str, tensors: Tensor, weights: Tensor) -> Tensor:
        """Merge ``tensors`` [K, ...] (one per client, float64) with example counts ``weights`` [K]."""


class FedAvg(Aggregator):
    """Federated averaging (McMahan et al., 2017): the example-weighted mean.

    Args:
        weighted: weight each client by its example count; False gives the plain mean (PromptFL).
    """

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted

    def merge(self, key: str, tensors: Tensor, weights: Tensor) -> Tensor:
        """Weighted mean over the client axis. [K, ...] → [...]."""
        w = weights if self.weighted else torch.ones_like(weights)
        if float(w.sum()) <= 0:
            raise ValueError(f"{key}: the clients' weights sum to {float(w.sum())}; cannot average")
        w = (w / w.sum()).reshape(-1, *([1] * (tensors.dim() - 1)))  # [K, 1, ...]
        return (tensors * w).sum(dim=0)


def aggregate(updates: Sequence[Update], aggregator: Aggregator) -> dict[str, Tensor]:
    """Merge each key over exactly the clients that returned it.

    Keys carry their scope group (``task/digits/coop.ctx``), so clients of different tasks never mix
    in a ``task`` tensor, while a ``global`` tensor is merged over everyone. Arithmetic is in float64
    and the result is cast back to the clients' dtype.

    Raises:
        ValueError: a ``local/`` key was sent, or clients disagree on a tensor's shape or dtype.
    """
    by_key: dict[str, list[tuple[Update, Tensor]]] = {}
    for u in updates:
        for key, t in u.state.items():
            if is_local(key):
                raise ValueError(f"client {u.cid} sent local tensor {key!r}; local tensors never leave a client")
            by_key.setdefault(key, []).append((u, t))
    merged = {}
    for key in sorted(by_key):
        pairs = by_key[key]
        first = pairs[0][1]
        for u, t in pairs[1:]:
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(
                    f"{key}: client {u.cid} sent {tuple(t.shape)} {t.dtype}, client {pairs[0][0].cid} sent "
                    f"{tuple(first.shape)} {first.dtype}"
                )
        stacked = torch.stack([t.detach().to(torch.float64) for _, t in pairs])  # [K, ...]
        weights = torch.tensor([float(u.num_examples) for u, _ in pairs], dtype=torch.float64)  # [K]
        merged[key] = aggregator.merge(key, stacked, weights).to(first.dtype)
    return merged
