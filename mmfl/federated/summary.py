"""The table a run ends with: per task and modality, zero-shot → final test accuracy, best round, bytes sent."""

from __future__ import annotations

from collections.abc import Sequence


def human_bytes(n: float) -> str:
    """``1234567`` → ``'1.2 MB'`` (decimal units, as network traffic is counted)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_duration(seconds: float, decimals: int = 0) -> str:
    """``75.2`` → ``'1 min 15 s'``, ``3725`` → ``'1 h 2 min'``; under a minute ``'12 s'`` (or with ``decimals``,
    ``'12.3 s'``)."""
    if seconds < 59.5:
        return f"{seconds:.{decimals}f} s"
    m, sec = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m} min" if h else f"{m} min {sec} s"


def run_summary(rows: Sequence[dict], best_round: int | None, seconds: float, best_average: str | None = None) -> str:
    """A plain-text table from a run's metric rows (``metrics.csv``'s), one line per task, modality and test split.

    Args:
        rows: the run's metric rows.
        best_round: the round picked by validation (None: no validation split; the last round is used).
        seconds: this invocation's wall time.
        best_average: the rounds (e.g. ``"3–4"``) whose average validation selected instead of a round.
    """
    acc: dict[tuple[str, str], dict[int, float]] = {}
    averaged: dict[tuple[str, str], float] = {}
    sent: dict[tuple[str, str], float] = {}
    for r in rows:
        name = f"{r['task']}/{r['modality']}"
        key = (name, "novel" if r["split"] == "test_novel" else "")
        if r["level"] == "task" and r["split"] in ("test", "test_novel"):
            acc.setdefault(key, {})[int(r["round"])] = float(r["accuracy"])
        elif r["level"] == "average" and r["split"] in ("test", "test_novel"):
            averaged[key] = float(r["accuracy"])
        elif r["level"] == "traffic":
            sent[name] = sent.get(name, 0.0) + float(r["value"])
    header = ["task/modality", "zero-shot", "final", "best round", "bytes sent"]
    if averaged:  # selection: average — the mean state's accuracy, beside the last round's
        header.insert(3, "averaged")
    table = [header]
    for (name, split), by_round in acc.items():
        last = max(by_round)
        best = "—"
        if best_average is not None:
            acc = averaged.get((name, split))
            best = f"avg {best_average}" + (f" ({100 * acc:.1f}%)" if acc is not None else "")
        elif best_round is not None:
            best = f"{best_round} ({100 * by_round[best_round]:.1f}%)" if best_round in by_round else str(best_round)
        zs = f"{100 * by_round[0]:.1f}%" if 0 in by_round else "—"
        line = [
            f"{name} {split}".strip(),
            zs,
            f"{100 * by_round[last]:.1f}% (round {last})",
            best,
            "" if split else human_bytes(sent.get(name, 0.0)),  # novel classes: the same clients, counted once
        ]
        if averaged:
            line.insert(3, f"{100 * averaged[(name, split)]:.1f}%" if (name, split) in averaged else "—")
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(sent.values())
    lines.append(f"sent by all clients: {human_bytes(total)}; wall time {human_duration(seconds, decimals=1)}")
    if best_round is not None:
        lines.append("best round: the round (or avg: the average of rounds) validation selected (its test accuracy)")
    if averaged:
        lines.append(
            "averaged: the mean of the last rounds' states (evaluation.average_rounds), scored after the last round"
        )
    return "\n".join(lines)
