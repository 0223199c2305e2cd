"""The forgetting guard: an adapted backbone's zero-shot top-1 (hand-written templates, no prompts) against the
original's, on the federation's own tasks and on bundled data sets the federation never saw."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mmfl.backbone import Backbone
from mmfl.data.bundled import BUNDLED, bundled_names
from mmfl.data.task import Task
from mmfl.evaluation.zeroshot import zero_shot

log = logging.getLogger(__name__)

GUARD_SETS: tuple[str, ...] = ("photos", "fashion", "glosses")
"""Bundled sets a federation is scored on when it did not train on them: scikit-image's photos, Fashion-MNIST
(when installed) and WordNet glosses (text)."""


def guard_tasks(federation: Sequence[Task], limit: int | None = None) -> list[tuple[str, Task]]:
    """What the guard scores: ``("federation", task)`` for each of the federation's tasks (test split), then
    ``("never seen", task)`` for each present :data:`GUARD_SETS` set whose data source the federation does not use.

    Args:
        federation: the run's tasks.
        limit: cap each never-seen set's test split (a fixed subset); the federation's keep their
            ``max_test_examples``.
    """
    out = [("federation", t) for t in federation]
    used = {type(t.data) for t in federation}
    present = set(bundled_names())
    for name in GUARD_SETS:
        cls = BUNDLED[name]
        if name in present and cls not in used:
            out.append(("never seen", Task(name=name, data=cls(), max_test_examples=limit)))
    return out


def forgetting_report(
    original: Backbone,
    adapted: Backbone,
    tasks: Sequence[tuple[str, Task]],
    batch_size: int = 64,
    accelerator: str = "auto",
    reference: Sequence[dict] | None = None,
) -> list[dict]:
    """Zero-shot top-1 of both backbones on each task's test split (the modality's own templates).

    Args:
        reference: the rows of an earlier report with the same ``original`` and ``tasks``: their ``original``
            scores are taken instead of scoring the original backbone again (several exports of one run).

    Returns:
        One row per task: ``set`` (``task/modality``), ``kind`` (``federation`` or ``never seen``), ``n``,
        ``original``, ``adapted`` and ``change`` (fractions; change = adapted − original).
    """
    rows = []
    for i, (kind, task) in enumerate(tasks):
        limit = task.max_test_examples
        if reference is not None:
            a = {"n": reference[i]["n"], "top1": reference[i]["original"]}
        else:
            a = zero_shot(original, task, limit=limit, batch_size=batch_size, accelerator=accelerator)
        b = zero_shot(adapted, task, limit=limit, batch_size=batch_size, accelerator=accelerator)
        rows.append(
            {
                "set": f"{task.name}/{task.modality}",
                "kind": kind,
                "n": int(a["n"]),
                "original": float(a["top1"]),
                "adapted": float(b["top1"]),
                "change": float(b["top1"]) - float(a["top1"]),
            }
        )
        log.info("zero-shot %s (%s): %.1f%% → %.1f%%", rows[-1]["set"], kind, 100 * a["top1"], 100 * b["top1"])
    return rows


def report_table(rows: Sequence[dict], original: str, adapted: str) -> str:
    """The report as a plain-text table (percentages; change in points)."""
    head = ("set", "kind", "n", original, adapted, "change")
    body = [
        (
            r["set"],
            r["kind"],
            str(r["n"]),
            f"{100 * r['original']:.1f}%",
            f"{100 * r['adapted']:.1f}%",
            f"{100 * r['change']:+.1f}",
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
