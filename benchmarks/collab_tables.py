"""The tables of ``benchmarks.collaboration``: per setting, the mean ± std over seeds of each (task, modality) row and
of the mean over clients, and the differences to a reference setting paired by seed."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.collaboration import SettingResult


@dataclass
class Summary:
    """One setting over seeds: per row and over clients, the mean and std over seeds (of the per-seed means)."""

    rows: dict[str, dict] = field(default_factory=dict)
    clients_mean: dict = field(default_factory=dict)
    per_seed: dict[int, dict[str, float]] = field(default_factory=dict)
    bytes_per_client_round: float = 0.0
    server_seconds_per_round: float = 0.0
    seconds: float = 0.0


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def summarize(results: dict[int, SettingResult]) -> Summary:
    """Mean ± std over seeds of each row's mean over its clients, and of the mean over all clients (percent)."""
    seeds = sorted(results)
    groups = results[seeds[0]].groups
    order = list(dict.fromkeys(groups.values()))
    s = Summary(per_seed={seed: {c: 100 * a for c, a in results[seed].accuracy.items()} for seed in seeds})
    for g in order:
        members = [c for c in groups if groups[c] == g]
        s.rows[g] = _spread([statistics.mean(s.per_seed[seed][c] for c in members) for seed in seeds])
    s.clients_mean = _spread([statistics.mean(s.per_seed[seed].values()) for seed in seeds])
    s.bytes_per_client_round = statistics.mean(r.bytes_per_client_round for r in results.values())
    s.server_seconds_per_round = statistics.mean(r.server_seconds_per_round for r in results.values())
    s.seconds = statistics.mean(r.seconds for r in results.values())
    return s


def paired(summaries: dict[str, Summary], reference: str) -> dict[str, dict[str, dict]]:
    """Each setting's difference to ``reference``, seed by seed (same seed: same clients, shots and data order), per
    row and over clients: ``{setting: {row: {mean, std, per_seed}}}`` (the row ``mean over clients`` included).
    The spread of a paired difference is the one to hold a difference against."""
    ref = summaries[reference]
    out: dict[str, dict[str, dict]] = {}
    for name, s in summaries.items():
        rows = {g: (s.rows[g]["per_seed"], ref.rows[g]["per_seed"]) for g in s.rows}
        rows["mean over clients"] = (s.clients_mean["per_seed"], ref.clients_mean["per_seed"])
        out[name] = {g: _spread([x - y for x, y in zip(a, b, strict=True)]) for g, (a, b) in rows.items()}
    return out


def paired_table(summaries: dict[str, Summary], reference: str) -> str:
    """A markdown table of :func:`paired` differences (points), a column per other setting."""
    diff = paired(summaries, reference)
    names = [n for n in summaries if n != reference]
    lines = [f"| minus {reference}, paired by seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for g in next(iter(diff.values())):
        lines.append(
            f"| {g} | " + " | ".join(f"{diff[n][g]['mean']:+.1f} ± {diff[n][g]['std']:.1f}" for n in names) + " |"
        )
    return "\n".join(lines)


def table(summaries: dict[str, Summary]) -> str:
    """A markdown table: a row per (task, modality) and the mean over clients, a column per setting."""
    names = list(summaries)
    first = summaries[names[0]]
    lines = ["| task / modality | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for g in first.rows:
        cells = [f"{summaries[n].rows[g]['mean']:.1f} ± {summaries[n].rows[g]['std']:.1f}" for n in names]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    cells = [f"**{summaries[n].clients_mean['mean']:.1f} ± {summaries[n].clients_mean['std']:.1f}**" for n in names]
    lines.append("| mean over clients | " + " | ".join(cells) + " |")
    lines.append(
        "| bytes sent per client-round | "
        + " | ".join(f"{summaries[n].bytes_per_client_round:,.0f}" for n in names)
        + " |"
    )
    lines.append(
        "| server ms per round | "
        + " | ".join(f"{1000 * summaries[n].server_seconds_per_round:.1f}" for n in names)
        + " |"
    )
    return "\n".join(lines)
