"""A round's merge, fed the clients' replies one at a time in client order: mean rules fold each reply into a
float64 sum as it arrives, so a round holds one sum per key instead of every reply (100 sampled MaPLe clients on a
ViT-B/16 would otherwise keep 300 MB of replies until the merge); other rules and mixed keys keep their copies.
Then ``release`` (DP noise), mixing, the server optimizer's step and the cast back to the clients' dtype."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from mmfl.federated.aggregate import Aggregator, RunningMerge, Update, clip_updates
from mmfl.federated.mixing import MixRule, ShareChooser, at_share, candidates, mix, wide_groups
from mmfl.federated.scopes import is_local

Release = Callable[[dict[str, Tensor], dict[str, int]], dict[str, Tensor]]
"""What the server does to the merges (float64, by key) before mixing and its optimizer step, given the number of
copies merged per key: the identity, or DP noise (:meth:`~mmfl.federated.privacy.DifferentialPrivacy.noise`)."""


class RoundMerge:
    """Merge each key over exactly the clients that returned it, taking the replies one at a time.

    Keys carry their scope group (``task/digits/coop.ctx``), so clients of different tasks never mix in a ``task``
    tensor, while a ``global`` tensor is merged over everyone. Arithmetic is in float64 and the result is cast back
    to the clients' dtype. The replies must be added in client order (the order of the sums); the result is the
    same, bit for bit, whether they are added as they arrive or all at the end.

    Args:
        aggregator: the merge rule (and server optimizer).
        current: the server's tensors before the round (needed by clipping, server optimizers and mixing).
        mixing: the keys of mixed scopes and how to mix them (see :mod:`mmfl.federated.mixing`); the result then also
            holds the mixed keys of groups that did not reply, when their share of the wide merge changes them.
        clip: scale each reply's update (over all its keys) to this L2 norm at most (:func:`clip_updates`).
    """

    def __init__(
        self,
        aggregator: Aggregator,
        current: Mapping[str, Tensor] | None = None,
        mixing: Mapping[str, MixRule] | None = None,
        clip: float | None = None,
    ) -> None:
        self.aggregator = aggregator
        self.current = current or {}
        self.mixing = mixing or {}
        self.clip = clip
        self.replies = 0
        self._first: dict[str, tuple[str, torch.Size, torch.dtype]] = {}  # key → the first copy's cid, shape, dtype
        self._running: dict[str, RunningMerge] = {}
        self._held: dict[str, tuple[list[Tensor], list[float]]] = {}  # copies and weights of the keys not running
        self._counts: dict[str, int] = {}  # copies taken per key

    def add(self, update: Update) -> None:
        """Take one client's reply (after every earlier client's in the round's order).

        Raises:
            ValueError: a ``local/`` key was sent, or the reply's tensor differs from an earlier client's in shape or
                dtype.
        """
        for key, t in update.state.items():
            if is_local(key):
                raise ValueError(f"client {update.cid} sent local tensor {key!r}; local tensors never leave a client")
            cid, shape, dtype = self._first.setdefault(key, (update.cid, t.shape, t.dtype))
            if t.shape != shape or t.dtype != dtype:
                raise ValueError(
                    f"{key}: client {update.cid} sent {tuple(t.shape)} {t.dtype}, client {cid} sent {tuple(shape)} "
                    f"{dtype}"
                )
        if self.clip is not None:
            update = clip_updates([update], self.current, self.clip)[0]
        rule = self.aggregator.rule
        for key, t in update.state.items():
            if key not in self._counts:  # a new key: a running merge, or its copies kept (mixed keys, other rules)
                running = None if key in self.mixing else rule.running(key)
                if running is None:
                    self._held[key] = ([], [])
                else:
                    self._running[key] = running
            self._counts[key] = self._counts.get(key, 0) + 1
            if key in self._running:
                self._running[key].add(t, float(update.num_examples))
            else:
                copies, weights = self._held[key]
                copies.append(t)
                weights.append(float(update.num_examples))
        self.replies += 1

    def result(self, release: Release | None = None, choose: ShareChooser | None = None) -> dict[str, Tensor]:
        """The new global tensors of every key some reply held (and of mixed keys their wide group changes).

        Args:
            release: applied to the merges before mixing and the server step (DP noise).
            choose: chooses the own shares of ``own=val`` mixes (needed when the round has such keys).
        """
        rule = self.aggregator.rule
        merges: dict[str, Tensor] = {}  # float64
        copies: dict[str, tuple[Tensor, Tensor]] = {}  # the mixed keys' stacked copies [K, ...] and weights [K]
        counts: dict[str, int] = {}
        for key in sorted(self._first):
            cur = self.current[key].detach().to(torch.float64) if key in self.current else None
            if key in self._running:
                merges[key] = self._running[key].result()
                counts[key] = self._counts[key]
                continue
            held, w = self._held[key]
            weights = torch.tensor(w, dtype=torch.float64)  # [K]
            counts[key] = self._counts[key]
            if key in self.mixing:
                stacked = torch.stack([t.detach().to(torch.float64) for t in held])  # [K, ...]
                merges[key] = rule.merge(key, stacked, weights, cur)
                copies[key] = (stacked, weights)
            else:
                merges[key] = rule.merge_copies(key, held, weights, cur)
        dtypes = {key: dtype for key, (_, _, dtype) in self._first.items()}
        return finish(
            merges, counts, self.aggregator, self.current, dtypes, self.mixing, release, copies, choose=choose
        )


def aggregate(
    updates: Sequence[Update],
    aggregator: Aggregator,
    current: Mapping[str, Tensor] | None = None,
    mixing: Mapping[str, MixRule] | None = None,
    release: Release | None = None,
    choose: ShareChooser | None = None,
) -> dict[str, Tensor]:
    """Merge each key over exactly the clients that returned it (a :class:`RoundMerge` given every reply at once).

    Args:
        updates: the clients' replies, in client order.
        aggregator: the merge rule.
        current: the server's tensors before the round (needed by server optimizers such as FedAvgM, and by mixing).
        mixing: the keys of mixed scopes and how to mix them (see :mod:`mmfl.federated.mixing`).
        release: applied to the merges before mixing and the server step (DP noise).
        choose: chooses the own shares of ``own=val`` mixes.

    Raises:
        ValueError: a ``local/`` key was sent, or clients disagree on a tensor's shape or dtype.
    """
    merge = RoundMerge(aggregator, current, mixing)
    for u in updates:
        merge.add(u)
    return merge.result(release, choose)


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
    choose: ShareChooser | None = None,
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
        choose: chooses the own share of each group of ``own=val`` keys, given the candidates and the round's other
            new tensors (before the server step; those keys at their own merge).

    Raises:
        ValueError: the round has ``own=val`` keys and no ``choose``.
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
        mixed = mix(merges, weights, wide_merges, current, mixing)
        chosen = candidates(merges, wide_merges, mixing)
        if chosen:
            if choose is None:
                raise ValueError(f"{sorted(chosen)}: mix(..., own=val) needs validation data to choose shares on")
            shares = choose(chosen, {**targets, **mixed})
            for group, items in chosen.items():
                mixed.update(at_share(items, shares[group]))
        targets.update(mixed)
    out = {}
    for key, t in targets.items():
        cur = current[key].detach().to(torch.float64) if key in current else None
        dtype = dtypes[key] if key in dtypes else current[key].dtype
        out[key] = aggregator.server_step(key, t, cur).to(dtype)
    return out
