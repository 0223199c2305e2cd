"""metrics.csv: one row per round × task × modality and per client, appended as rounds finish."""

from __future__ import annotations

import csv
import math
from pathlib import Path

COLUMNS = ["round", "level", "task", "modality", "client", "split", "loss", "accuracy", "examples"]


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
    ) -> None:
        """Record one row."""
        self.rows.append(
            dict(
                zip(
                    COLUMNS,
                    [rnd, level, task, modality, client, split, loss, accuracy, examples],
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
