"""Pictures of a run: test accuracy per round, drawn from the ``metrics.csv`` files a run writes (``mmfl fit`` at
its end, ``mmfl plot RUN`` at any time, ``mmfl evaluate`` over its seeds)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

PNG = "accuracy_per_round.png"
CSV = "metrics.csv"


def read_curves(metrics_files: list[Path]) -> dict[tuple[str, str], dict[int, list[float]]]:
    """Test accuracy per (``task/modality``, split) and round, one value per file (``test`` and ``test_novel``)."""
    curves: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for f in metrics_files:
        with f.open() as fh:
            for r in csv.DictReader(fh):
                if r["level"] == "task" and r["split"] in ("test", "test_novel"):
                    key = (f"{r['task']}/{r['modality']}", r["split"])
                    curves[key][int(r["round"])].append(float(r["accuracy"]))
    return curves


def plot_rounds(png: Path, metrics_files: list[Path], title: str) -> Path:
    """Draw the test accuracy per round per task and modality (the mean over the files: one per seed; novel
    classes dashed) into ``png``. Returns ``png``."""
    curves = read_curves(metrics_files)
    fig, ax = plt.subplots(figsize=(7, 4))
    b2n = any(s == "test_novel" for _, s in curves)
    for (name, split), pts in sorted(curves.items()):
        xs = sorted(pts)
        ax.plot(
            xs,
            [100 * sum(pts[x]) / len(pts[x]) for x in xs],
            marker="o",
            linestyle="--" if split == "test_novel" else "-",
            label=f"{name} {'novel' if split == 'test_novel' else 'base' if b2n else ''}".strip(),
        )
    ax.set_xlabel("round (0 = before training: zero-shot)")
    ax.set_ylabel("test top-1 (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def plot_run(run: str | Path) -> Path:
    """Redraw ``RUN/accuracy_per_round.png`` from ``RUN/metrics.csv`` (a finished run, or one still running: the
    file holds every completed round). Returns the picture's path.

    Raises:
        FileNotFoundError: ``run`` is not a folder written by ``mmfl fit``.
        ValueError: its metrics.csv holds no test accuracy yet.
    """
    run = Path(run)
    if not (run / CSV).is_file():
        hint = " (an `mmfl evaluate` folder draws its own pictures)" if (run / "report.md").is_file() else ""
        raise FileNotFoundError(f"{str(run)!r} is not a run folder of `mmfl fit`: it has no {CSV}{hint}")
    if not read_curves([run / CSV]):
        raise ValueError(f"{str(run / CSV)!r} holds no test accuracy yet (the run has not finished round 0)")
    return plot_rounds(run / PNG, [run / CSV], f"Accuracy per round: {run.resolve().name}")
