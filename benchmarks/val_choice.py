"""Sharing chosen per (task, modality) on validation data from whole runs: ``benchmarks.collaboration --choose``.

``own=val`` chooses a group's share every round from what the candidate shares do to that round's merged tensors; it
cannot see what sharing does over the following rounds (a 2-shot client's projection steadied by another client's
data, docs/measurements.md). Here each candidate setting is a whole federation run with the same clients, data and
budget, and each (task, modality) group keeps the setting whose *final* state scores highest on the group's
validation split. Deployed, that is one federation per candidate trained side by side: the cost is their sum.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.collaboration import SettingResult


def check_choice(
    names: Sequence[str], settings: Sequence[str], val_fraction: float, error: Callable[[str], Any]
) -> None:
    """Call ``error`` with what is wrong (before anything runs) unless ``names`` can be chosen among: at least two
    distinct settings, each also run (``settings``), and validation data held out (``val_fraction`` > 0)."""
    if len(set(names)) < 2:
        error(f"--choose needs at least two different settings, got {list(names)}")
    absent = [n for n in names if n not in settings]
    if absent:
        error(f"--choose {list(names)}: {absent} not in --settings; run every setting a choice is among")
    if val_fraction <= 0:
        error("--choose needs validation data: --val-fraction must be > 0")


def chosen_name(names: Sequence[str]) -> str:
    """The row name of a choice among ``names``."""
    return "chosen on val: " + " or ".join(names)


def choose_per_group(results: dict[str, SettingResult], names: Sequence[str]) -> tuple[SettingResult, dict[str, str]]:
    """One seed: for each (task, modality) group, the setting among ``names`` whose clients' mean validation accuracy
    is highest (a tie keeps the earlier name); the group's clients count with that setting's test figures.

    Args:
        results: each setting's result for this seed (the same clients and groups in each), with validation figures.
        names: the candidate settings, in order of preference on a tie.

    Returns:
        The choice as a result (test and validation figures of the chosen settings; merged keys, bytes and seconds
        of all candidates together, since every candidate federation is trained) and the chosen setting per group.

    Raises:
        ValueError: fewer than two names, a name without a result, or a result without validation figures.
    """
    if len(names) < 2:
        raise ValueError(f"a choice needs at least two settings, got {list(names)}")
    missing = [n for n in names if n not in results]
    if missing:
        raise ValueError(f"no result for {missing}: a choice is among settings that were run")
    first = results[names[0]]
    bare = [n for n in names if set(results[n].val) != set(first.accuracy)]
    if bare:
        raise ValueError(f"{bare} have no validation figure for every client: hold data out (--val-fraction > 0)")
    choice: dict[str, str] = {}
    for g in dict.fromkeys(first.groups.values()):
        members = [c for c, gg in first.groups.items() if gg == g]
        score = {n: statistics.mean(results[n].val[c] for c in members) for n in names}
        choice[g] = max(names, key=score.__getitem__)  # max keeps the first of equal scores: the earlier name
    picked = {c: results[choice[g]] for c, g in first.groups.items()}
    runs = [results[n] for n in names]
    chosen = type(first)(
        accuracy={c: r.accuracy[c] for c, r in picked.items()},
        groups=dict(first.groups),
        merged_keys=sorted({k for r in runs for k in r.merged_keys}),
        bytes_per_client_round=sum(r.bytes_per_client_round for r in runs),
        server_seconds_per_round=sum(r.server_seconds_per_round for r in runs),
        seconds=sum(r.seconds for r in runs),
        val={c: r.val[c] for c, r in picked.items()},
    )
    return chosen, choice
