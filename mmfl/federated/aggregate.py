"""Aggregation: pure-torch merging of trainable tensors, per scope group (= per payload key)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmfl.federated.mixing import MixRule, mix, wide_groups
from mmfl.federated.scopes import is_local

CHUNK_BYTES = 64 * 2**20
"""A coordinate-wise rule merges a key in slices of coordinates whose float64 copies take at most this many bytes:
100 replies of a 3 MiB MaPLe tensor (ViT-B/16) would otherwise be stacked as 600 MB, and weighted as much again."""


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
    in slices of coordinates (:data:`CHUNK_BYTES`). Rules over whole vectors (Krum, FLAME) see every copy whole."""

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

    def _shares(self, key: str, weights: Tensor) -> Tensor:
        w = weights if self.weighted else torch.ones_like(weights)
        if float(w.sum()) <= 0:
            raise ValueError(f"{key}: the clients' weights sum to {float(w.sum())}; cannot average")
        return w / w.sum()  # [K]

    def merge(self, key: str, tensors: Tensor, weights: Tensor, current: Tensor | None = None) -> Tensor:
        """Weighted mean over the client axis, summed in client order. [K, ...] → [...]."""
        w = self._shares(key, weights).reshape(-1, *([1] * (tensors.dim() - 1)))  # [K, 1, ...]
        return ordered_sum(tensors * w)

    def merge_large(self, key: str, copies: Sequence[Tensor], weights: Tensor, current: Tensor | None) -> Tensor:
        """:meth:`merge` one copy at a time (the same products and sums in the same order): a float64 sum [...] and
        one copy's product at a time, whatever the number of copies."""
        w = self._shares(key, weights)  # [K]
        out = copies[0].detach().to(torch.float64) * w[0]  # [...]
        for copy, share in zip(copies[1:], w[1:], strict=True):
            out += copy.detach().to(torch.float64) * share
        return out

    def group_weight(self, weights: Tensor) -> float:
        """The group's example count (weighted), or its number of copies (unweighted)."""
        return float(weights.sum()) if self.weighted else float(weights.numel())


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


Release = Callable[[dict[str, Tensor], dict[str, int]], dict[str, Tensor]]
"""What the server does to the merges (float64, by key) before mixing and its optimizer step, given the number of
copies merged per key: the identity, or DP noise (:meth:`~mmfl.federated.privacy.DifferentialPrivacy.noise`)."""


def aggregate(
    updates: Sequence[Update],
    aggregator: Aggregator,
    current: Mapping[str, Tensor] | None = None,
    mixing: Mapping[str, MixRule] | None = None,
    release: Release | None = None,
) -> dict[str, Tensor]:
    """Merge each key over exactly the clients that returned it.

    Keys carry their scope group (``task/digits/coop.ctx``), so clients of different tasks never mix
    in a ``task`` tensor, while a ``global`` tensor is merged over everyone. Arithmetic is in float64
    and the result is cast back to the clients' dtype.

    Args:
        updates: the clients' replies.
        aggregator: the merge rule.
        current: the server's tensors before the round (needed by server optimizers such as FedAvgM, and by mixing).
        mixing: the keys of mixed scopes and how to mix them (see :mod:`mmfl.federated.mixing`); the result then
            also holds the mixed keys of groups that did not reply, when their share of the wide merge changes them.
        release: applied to the merges before mixing and the server step (DP noise).

    Raises:
        ValueError: a ``local/`` key was sent, or clients disagree on a tensor's shape or dtype.
    """
    mixing = mixing or {}
    rule = aggregator.rule
    merges: dict[str, Tensor] = {}  # float64
    copies: dict[str, tuple[Tensor, Tensor]] = {}  # the mixed keys' stacked copies [K, ...] and weights [K]
    counts: dict[str, int] = {}
    dtypes: dict[str, torch.dtype] = {}
    for key, pairs in group(updates).items():
        dtypes[key] = pairs[0][1].dtype
        weights = torch.tensor([float(u.num_examples) for u, _ in pairs], dtype=torch.float64)  # [K]
        cur = current[key].detach().to(torch.float64) if current is not None and key in current else None
        counts[key] = len(pairs)
        if key not in mixing and rule.coordinatewise and len(pairs) * pairs[0][1].numel() * 8 > CHUNK_BYTES:
            merges[key] = rule.merge_large(key, [t for _, t in pairs], weights, cur)
            continue
        stacked = torch.stack([t.detach().to(torch.float64) for _, t in pairs])  # [K, ...]
        merges[key] = rule.merge(key, stacked, weights, cur)
        if key in mixing:
            copies[key] = (stacked, weights)
    return finish(merges, counts, aggregator, current or {}, dtypes, mixing, release, copies)


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


def finish(
    merges: dict[str, Tensor],
    counts: dict[str, int],
    aggregator: Aggregator,
    current: Mapping[str, Tensor],
    dtypes: Mapping[str, torch.dtype],
    mixing: Mapping[str, MixRule] | None = None,
    release: Release | None = None,
    copies: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    group_weights: Mapping[str, float] | None = None,
) -> dict[str, Tensor]:
    """From each key's merge (float64) to the new global tensors: ``release``, mixing, the server's step, the cast.

    Args:
        merges: the merge rule's result per key (float64).
        counts: the number of copies merged per key.
        aggregator: the recipe's aggregator (its server step; its rule for the wide merges of mixed keys).
        current: the server's tensors before the round.
        dtypes: each merged key's dtype (the clients').
        mixing: the mixed keys' rules.
        release: applied to ``merges`` first (DP noise).
        copies: the mixed keys' stacked copies and weights; the wide merge is then the rule's merge of all the
            copies (exactly a plain merge over the wide group). Without them (or after ``release``) it is the
            weighted mean of the group merges, which needs a mean rule.
        group_weights: each key's weight in that mean (default: the rule's :meth:`Aggregator.group_weight` of the
            copies' weights).
    """
    rule = aggregator.rule
    if release is not None:
        merges = release(merges, counts)
    targets = dict(merges)
    if mixing:
        weights = dict(group_weights or {})
        for k in merges:
            if k in mixing and k not in weights:
                gw = rule.group_weight(copies[k][1]) if copies and k in copies else None
                weights[k] = float(counts[k]) if gw is None else gw
        wide_merges = {}
        for wide, keys in wide_groups(mixing).items():
            present = [k for k in keys if k in merges]
            if not present:
                continue
            if copies is not None and release is None:
                stacked = torch.cat([copies[k][0] for k in present])  # [K, ...] every copy of the wide group
                w = torch.cat([copies[k][1] for k in present])  # [K]
                wide_merges[wide] = rule.merge(wide, stacked, w, None)
            else:
                if rule.group_weight(torch.ones(1, dtype=torch.float64)) is None:
                    raise ValueError(f"{wide}: mixing from group merges needs a mean rule (FedAvg), not {rule}")
                w = torch.tensor([weights[k] for k in present], dtype=torch.float64)  # [G]
                stacked = torch.stack([merges[k] for k in present])  # [G, ...]
                wide_merges[wide] = (stacked * (w / w.sum()).reshape(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0)
        targets.update(mix(merges, weights, wide_merges, current, mixing))
    out = {}
    for key, t in targets.items():
        cur = current[key].detach().to(torch.float64) if key in current else None
        dtype = dtypes[key] if key in dtypes else current[key].dtype
        out[key] = aggregator.server_step(key, t, cur).to(dtype)
    return out
