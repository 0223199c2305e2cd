"""Mixed scopes at the server (aggregation with disaggregation, as FedCola): a tensor declared
``mix(FINE, WIDE, OWN)`` is held per FINE group; each round the server merges it within each group, then gives each
group ``OWN`` of its own merge and ``1 − OWN`` of the merge over the whole WIDE group. ``OWN = 1`` is plain FINE
merging and ``OWN = 0`` plain WIDE merging, exactly, with any merge rule. With ``similarity``, each group takes a
share of every other group's merge in proportion to that group's weight and to how alike their updates are this
round (the cosine of ``merge − current``, negatives counted as 0), as FedAMP-style similarity-aware aggregation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class MixRule:
    """How the server mixes one FINE key.

    Attributes:
        wide: the key of the WIDE group it belongs to (e.g. ``task/digits/coop.ctx`` for
            ``task_modality/digits/image/coop.ctx``); every FINE key with the same ``wide`` is mixed together.
        own: the share a group keeps of its own merge, in [0, 1]; None: set from the similarity of updates.
    """

    wide: str
    own: float | None


def wide_groups(table: Mapping[str, MixRule]) -> dict[str, list[str]]:
    """The FINE keys of each WIDE group (sorted), by WIDE key (sorted).

    Raises:
        ValueError: the keys of one WIDE group disagree on their ``own`` share.
    """
    out: dict[str, list[str]] = {}
    for key in sorted(table):
        out.setdefault(table[key].wide, []).append(key)
    for wide, keys in out.items():
        owns = {table[k].own for k in keys}
        if len(owns) > 1:
            raise ValueError(f"the keys mixed over {wide!r} declare different shares {sorted(map(str, owns))}")
    return dict(sorted(out.items()))


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

    A fixed share ``own``: a group that replied gets ``own · merge + (1 − own) · wide``; one that did not gets
    ``own · current + (1 − own) · wide`` (it is left alone when ``own`` is 1). ``similarity``: a group that replied
    gets ``Σ_h w_h s_gh merge_h / Σ_h w_h s_gh`` over the groups h that replied, ``s_gg = 1`` and ``s_gh =
    max(0, cos(merge_g − current_g, merge_h − current_h))``; the others are left alone.
    """
    out: dict[str, Tensor] = {}
    for wide, keys in wide_groups(table).items():
        present = [k for k in keys if k in merges]
        if not present:
            continue
        own = table[keys[0]].own
        if own is None:
            out.update(_by_similarity(present, merges, weights, current))
            continue
        m = wide_merges[wide].to(torch.float64)
        for k in keys:
            if k in merges:
                out[k] = own * merges[k] + (1.0 - own) * m
            elif k in current and own < 1.0:
                out[k] = own * current[k].to(torch.float64) + (1.0 - own) * m
    return out


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
    a = similarities(deltas) * w[None, :]  # [G, G]: row g, the weight of group h's merge in g's mixture
    a = a / a.sum(dim=1, keepdim=True)
    mixed = torch.einsum("gh,hp->gp", a, stacked.reshape(len(keys), -1)).reshape(stacked.shape)
    return {k: mixed[i] for i, k in enumerate(keys)}
