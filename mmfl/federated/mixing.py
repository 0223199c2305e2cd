"""Mixed scopes at the server (aggregation with disaggregation, as FedCola): a tensor declared ``mix(FINE, WIDE, ...)``
is held per FINE group; each round the server merges it within each group (``m_g``, with the recipe's rule) and over
the whole WIDE group (``M``: the rule over all the copies, exactly what plain WIDE merging would give), then gives
each group ``own_g · m_g + (1 − own_g) · M``:

- ``own=a``: ``own_g = a`` for every group;
- ``others=s``: the other groups' weight counts ``s`` times (FedCola's weighting of the other modalities): with
  ``W_g`` the group's weight (its example count for weighted FedAvg, else its number of copies) and ``W_o`` the
  other groups', ``own_g = (1 − s) · W_g / (W_g + s · W_o)``, which is ``(W_g m_g + s W_o m_o) / (W_g + s W_o)``
  for FedAvg: a small group next to large ones takes most of ``M``, a large one keeps its own;
- ``similarity``: each group takes a share of every other group's merge in proportion to that group's weight and to
  how alike their updates are this round (the cosine of ``merge − current``, negatives counted as 0), as
  similarity-aware aggregation (FedAMP) does;
- ``own=val``: ``own_g`` is chosen each round from :data:`SHARES`, per group, by the server: it scores each choice
  on the validation split of the tasks whose clients hold the group's keys (a :data:`ShareChooser`, given by the
  simulation) and keeps the largest share within one standard error of the best (:func:`choose_share`). The
  choice is a function of the merges and of the server's own validation data only, so DP's guarantee and SecAgg's
  masking are unaffected.

``own=1`` and ``others=0`` are plain FINE merging, ``own=0`` and ``others=1`` plain WIDE merging, exactly, with any
merge rule."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfl.federated.scopes import qualify

if TYPE_CHECKING:
    from mmfl.prompts.base import TrainablePart

log = logging.getLogger(__name__)

SHARES: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.0)
"""The own shares an ``own=val`` mix tries each round, largest (own merge) first: the order of preference."""

Candidates = dict[str, list[tuple[str, Tensor, Tensor]]]
"""For each group of ``own=val`` keys (:func:`group_of`): its keys that replied this round, each with its own merge
and its wide group's merge (float64)."""

ShareChooser = Callable[[Candidates, Mapping[str, Tensor]], dict[str, float]]
"""Chooses an own share from :data:`SHARES` per group of :data:`Candidates`, given the round's other new tensors
(float64, by key, before the server optimizer's step)."""


@dataclass(frozen=True)
class MixRule:
    """How the server mixes one FINE key.

    Attributes:
        wide: the key of the WIDE group it belongs to (e.g. ``task/digits/coop.ctx`` for
            ``task_modality/digits/image/coop.ctx``); every FINE key with the same ``wide`` is mixed together.
        kind: ``own``, ``others`` or ``similarity`` (see the module's docstring).
        value: the ``own`` share or the ``others`` weight, in [0, 1].
    """

    wide: str
    kind: str = "own"
    value: float = 0.0


def group_of(key: str) -> str:
    """The group a FINE key is held by (its key without the part's tensor name), e.g. ``task_modality/digits/image``
    for ``task_modality/digits/image/coop.ctx``: one own share is chosen per group under ``own=val``."""
    return key.rsplit("/", 1)[0]


def at_share(items: list[tuple[str, Tensor, Tensor]], share: float) -> dict[str, Tensor]:
    """``share · own + (1 − share) · wide`` for each ``(key, own merge, wide merge)`` of a group (see
    :data:`Candidates`)."""
    return {k: share * own + (1.0 - share) * wide for k, own, wide in items}


def choose_share(correct: Mapping[float, Tensor]) -> float:
    """The own share an ``own=val`` group keeps, from each share's per-example validation correctness
    (``correct[a]``: [N] of 0/1, the same N examples for every share of :data:`SHARES`).

    The one-standard-error rule: the largest own share whose accuracy is within one standard error of the best
    share's, the standard error being that of the paired per-example differences (``std(c_best − c_a) / √N``). A
    group leaves its own merge only for a gain its validation data can tell from noise. Shares that predict alike
    keep the larger share; with one example (no standard error) the best share is kept.
    """
    acc = {a: float(c.double().mean()) for a, c in correct.items()}
    best = max(SHARES, key=lambda a: (acc[a], a))  # ties: the larger own share
    n = correct[best].numel()
    for a in SHARES:  # largest own share first
        d = correct[best].double() - correct[a].double()  # [N]
        se = float(d.std(correction=1)) / n**0.5 if n > 1 else 0.0
        if acc[a] >= acc[best] - se:
            return a
    return best


def wide_groups(table: Mapping[str, MixRule]) -> dict[str, list[str]]:
    """The FINE keys of each WIDE group (sorted), by WIDE key (sorted).

    Raises:
        ValueError: the keys of one WIDE group disagree on how to mix.
    """
    out: dict[str, list[str]] = {}
    for key in sorted(table):
        out.setdefault(table[key].wide, []).append(key)
    for wide, keys in out.items():
        rules = {(table[k].kind, table[k].value) for k in keys}
        if len(rules) > 1:
            raise ValueError(f"the keys mixed over {wide!r} declare different mixes {sorted(rules)}")
    return dict(sorted(out.items()))


def rules_for(parts: Mapping[str, TrainablePart], task: str, modality: str) -> dict[str, MixRule]:
    """The mix rules of the keys of mixed scopes held by a client of (task, modality) with these parts (by name)."""
    rules = {}
    for part_name, part in parts.items():
        for scope, pname, _, mix in part.scoped_parameters():
            if mix is not None:
                name = f"{part_name}.{pname}"
                rules[qualify(scope, task, modality, name)] = MixRule(
                    qualify(mix.wide, task, modality, name), mix.kind, mix.value
                )
    return rules


def start_together(table: Mapping[str, MixRule], state: dict[str, Tensor]) -> None:
    """Give the groups of each mixed tensor one starting value in the server's ``state`` (the first group's), as a
    plain tensor of the wide scope would have, and log who is mixed with whom."""
    for wide, keys in wide_groups(table).items():
        for k in keys[1:]:
            state[k] = state[keys[0]].clone()
        rule = table[keys[0]]
        how = {"similarity": "similarity", "val": "own share chosen on validation data"}.get(
            rule.kind, f"{rule.kind}={rule.value:g}"
        )
        log.info("%s: one tensor per group of %s, mixed (%s)", wide, [group_of(k) for k in keys], how)


def own_share(rule: MixRule, mine: float, total: float) -> float:
    """A replying group's share of its own merge under an ``own`` or ``others`` rule (``mine``: its weight,
    ``total``: the weight of every replying group of its WIDE group)."""
    if rule.kind == "own":
        return rule.value
    s = rule.value
    denominator = mine + s * (total - mine)
    return (1.0 - s) * mine / denominator if denominator > 0 else 1.0


def mix(
    merges: Mapping[str, Tensor],
    weights: Mapping[str, float],
    wide_merges: Mapping[str, Tensor],
    current: Mapping[str, Tensor],
    table: Mapping[str, MixRule],
) -> dict[str, Tensor]:
    """The mixed tensors of every FINE key of ``table`` that this round changes (float64).

    Args:
        merges: each FINE group's merge this round (float64), for the groups that replied.
        weights: each replying group's weight in a mean over groups (its example count, or its number of copies).
        wide_merges: each WIDE group's merge over all the copies of its FINE groups (float64), by WIDE key.
        current: the server's tensors before the round (for groups that did not reply, and for the similarity).
        table: the mix rule of each FINE key.

    An ``own=val`` group that replied gets its own merge here (share 1): its share is chosen afterwards, from
    :func:`candidates`. A group that did not reply keeps its tensor under ``similarity``, ``own=val``, ``own=1`` and
    ``others=0``; otherwise it gets ``a · current + (1 − a) · M`` (``own=a``) or ``s · M + (1 − s) · current``
    (``others=s``).
    """
    out: dict[str, Tensor] = {}
    for wide, keys in wide_groups(table).items():
        present = [k for k in keys if k in merges]
        if not present:
            continue
        rule = table[keys[0]]
        if rule.kind == "similarity":
            out.update(_by_similarity(present, merges, weights, current))
            continue
        if rule.kind == "val":
            out.update({k: merges[k] for k in present})
            continue
        m = wide_merges[wide].to(torch.float64)
        total = sum(weights[k] for k in present)
        for k in keys:
            if k in merges:
                own = own_share(rule, weights[k], total)
                out[k] = own * merges[k] + (1.0 - own) * m
            elif k in current:
                keep = rule.value if rule.kind == "own" else 1.0 - rule.value
                if keep < 1.0:
                    out[k] = keep * current[k].to(torch.float64) + (1.0 - keep) * m
    return out


def candidates(
    merges: Mapping[str, Tensor], wide_merges: Mapping[str, Tensor], table: Mapping[str, MixRule]
) -> Candidates:
    """The groups of ``own=val`` keys that replied this round, each key with its own merge and its wide merge."""
    out: Candidates = {}
    for wide, keys in wide_groups(table).items():
        if table[keys[0]].kind == "val":
            for k in keys:
                if k in merges:
                    out.setdefault(group_of(k), []).append((k, merges[k], wide_merges[wide].to(torch.float64)))
    return dict(sorted(out.items()))


def similarities(deltas: Tensor) -> Tensor:
    """Pairwise sharing factors of the groups' updates ``deltas`` [G, P]: ``max(0, cos)``, 1 on the diagonal
    (a zero update shares with nothing). Returns [G, G]."""
    unit = F.normalize(deltas, dim=1)  # [G, P]; a zero row stays zero
    s = (unit @ unit.t()).clamp(min=0.0)  # [G, G]
    s.fill_diagonal_(1.0)
    return s


def _by_similarity(
    keys: list[str], merges: Mapping[str, Tensor], weights: Mapping[str, float], current: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    stacked = torch.stack([merges[k].to(torch.float64) for k in keys])  # [G, ...]
    deltas = torch.stack(
        [(merges[k].to(torch.float64) - current[k].to(torch.float64)).flatten() for k in keys]
    )  # [G, P]
    w = torch.tensor([weights[k] for k in keys], dtype=torch.float64)  # [G]
    if log.isEnabledFor(logging.DEBUG):
        unit = F.normalize(deltas, dim=1)
        cos = [[round(float(x), 4) for x in row] for row in unit @ unit.t()]
        log.debug("cosine similarity of the updates of %s: %s", keys, cos)
    a = similarities(deltas) * w[None, :]  # [G, G]: row g, the weight of group h's merge in g's mixture
    a = a / a.sum(dim=1, keepdim=True)
    mixed = torch.einsum("gh,hp->gp", a, stacked.reshape(len(keys), -1)).reshape(stacked.shape)
    return {k: mixed[i] for i, k in enumerate(keys)}
