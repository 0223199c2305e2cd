"""metrics.csv: one row per round × task × modality and per client, appended as rounds finish."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

COLUMNS = ["round", "level", "task", "modality", "client", "split", "loss", "accuracy", "examples", "value", "note"]
"""``value``: a number that is neither a loss nor an accuracy (ε of ``privacy`` rows, the update norm of ``fit``
rows, the bytes its clients sent of ``traffic`` rows, whose ``examples`` counts those clients); ``note``: why a
client was left out (``fit_failed`` rows)."""


class MetricsWriter:
    """Collects metric rows in memory and appends them to a CSV file on ``flush()``.

    Args:
        path: the CSV file (created with a header; None keeps rows in memory only).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rows: list[dict[str, object]] = []
        self._written = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)

    def add(
        self,
        rnd: int,
        level: str,
        task: str,
        modality: str,
        client: str,
        split: str,
        loss: float,
        accuracy: float,
        examples: int,
        value: float = math.nan,
        note: str = "",
    ) -> None:
        """Record one row."""
        self.rows.append(
            dict(
                zip(
                    COLUMNS,
                    [rnd, level, task, modality, client, split, loss, accuracy, examples, value, note],
                    strict=True,
                )
            )
        )

    def mean(self, rnd: int, split: str, column: str) -> float:
        """Example-weighted mean of ``column`` over the rows of one round and split."""
        rows = [r for r in self.rows if r["round"] == rnd and r["split"] == split]
        total = sum(int(r["examples"]) for r in rows)
        if not total:
            return math.nan
        return sum(float(r[column]) * int(r["examples"]) for r in rows) / total

    def restore(self, rows: list[dict[str, object]]) -> None:
        """Replace the rows with ``rows`` (a checkpoint's) and rewrite the file atomically."""
        self.rows = [dict(r) for r in rows]
        self._written = len(self.rows)
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def flush(self) -> None:
        """Append the rows recorded since the last flush."""
        if self.path is None:
            self._written = len(self.rows)
            return
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            for row in self.rows[self._written :]:
                w.writerow(row)
        self._written = len(self.rows)
