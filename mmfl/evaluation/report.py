"""The evaluation's outputs: ``metrics.json``, ``report.md`` (tables that state the protocol) and PNG plots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt

from mmfl import plots

METHOD_NAMES = {
    "zeroshot": "zero-shot (one template)",
    "ensemble": "zero-shot (template ensemble)",
    "federated": "federated (this recipe)",
    "centralised": "centralised (pooled data, upper reference)",
}


def ordered_methods(summary: dict) -> list[str]:
    """The methods of a summary in report order: the zero-shot baselines, the recipe's own, its variants (in the
    recipe's order), then the centralised reference."""
    first = [m for m in ("zeroshot", "ensemble", "federated") if m in summary]
    variants = [m for m in summary if m not in METHOD_NAMES]
    return first + variants + (["centralised"] if "centralised" in summary else [])


def method_label(m: str) -> str:
    """A method's row label in the report."""
    return METHOD_NAMES.get(m, f"variant `{m}`")


def cell(stat: dict | None, percent: bool = True) -> str:
    """``mean ± std`` of a summary leaf, in percent; ``–`` when missing."""
    if not stat or stat.get("n", 0) == 0 or math.isnan(stat["mean"]):
        return "–"
    k = 100 if percent else 1
    if stat["n"] == 1:
        return f"{k * stat['mean']:.1f}"
    return f"{k * stat['mean']:.1f} ± {k * stat['std']:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _get(tree: dict, *path: str) -> dict | None:
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def write_report(out: Path, protocol_facts: dict, per_seed: dict[int, dict], summary: dict) -> None:
    """Write ``metrics.json`` and ``report.md`` to ``out``.

    Args:
        out: the output folder.
        protocol_facts: what was run (backbone, tasks, rounds, seeds, selection, ...), stated in the report.
        per_seed: ``{seed: {"facts": ..., "methods": {method: results}}}``.
        summary: ``{method: mean ± std tree}`` (see :func:`mmfl.evaluation.runner.summarize`).
    """
    doc = {"protocol": protocol_facts, "seeds": {str(k): v for k, v in per_seed.items()}, "summary": summary}
    (out / "metrics.json").write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    (out / "report.md").write_text("\n".join(report_lines(protocol_facts, summary)) + "\n")


def report_lines(facts: dict, summary: dict) -> list[str]:
    """The Markdown report."""
    methods = ordered_methods(summary)
    keys = list(next(iter(summary.values()))["tasks"]) if summary else []
    b2n = facts["base_to_novel"]
    seeds = facts["seeds"]
    lines = ["# Evaluation report", "", "## Protocol", ""]
    lines += [
        f"- backbone: `{facts['backbone']}` (pretrained: `{facts['pretrained']}`)",
        f"- seeds: {seeds} — every number is the mean ± sample std over these {len(seeds)} runs"
        if len(seeds) > 1
        else f"- seed: {seeds[0]} (one run: no spread is reported)",
        f"- rounds: {facts['rounds']}, client fraction {facts['fraction']}, local epochs {facts['epochs']}"
        f" (max steps {facts['max_steps']}), batch {facts['batch_size']}, parts: {', '.join(facts['parts'])}",
        f"- checkpoint selection: **{facts['selection']}**"
        + (
            " — the round with the best mean validation accuracy"
            + (
                f" (or the average of the last {facts['average_rounds']} rounds, when it scores higher)"
                if facts.get("average_rounds")
                else ""
            )
            + f"; validation = {facts['val_fraction']:.0%} of each "
            "task's training split, held out before partitioning; test data are never read to choose"
            if facts["selection"] == "best_val"
            else " — the mean of the states the last "
            + (f"{facts['average_rounds']} rounds" if facts.get("average_rounds") else "half of the rounds")
            + " ended with (merged and local tensors); test data are never read to choose"
            if facts["selection"] == "average"
            else " — the final round's state; test data are never read to choose"
        ),
        "- classes: "
        + (
            "base-to-novel: the first ceil(C/2) labels are base (trained), the rest novel (never trained)"
            if b2n
            else "all classes are trained and tested"
        ),
        f"- zero-shot baselines: `{facts['template']}` and each task's template ensemble",
        *[f"- variant `{name}`: the recipe with {what}" for name, what in facts.get("variants", {}).items()],
        f"- calibration: expected calibration error (L1, {facts['ece_bins']} equal-width bins, torchmetrics)",
        "",
    ]
    lines += _table(
        ["task", "modality", "classes (base + novel)", "clients (trained + unseen)", "shots", "partitioner", "test"],
        [
            [
                t["name"],
                t["modality"],
                f"{t['base']} + {t['novel']}",
                f"{t['clients']} + {t['unseen']}",
                str(t["shots"]),
                t["partitioner"],
                f"{t['test']}" + (f" + {t['test_novel']}" if t["test_novel"] else ""),
            ]
            for t in facts["tasks"]
        ],
    )
    for name, fact in facts.get("runs", {}).items():
        lines.append(f"\n- {name}: {fact}")

    title = "Base-to-novel top-1 (%)" if b2n else "Test top-1 (%)"
    lines += ["", f"## {title}", ""]
    header = ["method"]
    for k in keys:
        header += [f"{k} base", f"{k} novel", f"{k} HM"] if b2n else [k]
    header += ["mean HM"] if b2n else ["mean"]
    rows = []
    for m in methods:
        row = [method_label(m)]
        for k in keys:
            row += [cell(_get(summary[m], "tasks", k, "base", "top1"))]
            if b2n:
                row += [cell(_get(summary[m], "tasks", k, "novel", "top1")), cell(_get(summary[m], "tasks", k, "hm"))]
        row += [cell(_get(summary[m], "means", "hm" if b2n else "base"))]
        rows.append(row)
    lines += _table(header, rows)
    if b2n:
        lines += ["", "HM = 2·base·novel / (base + novel). Base is scored among base classes, novel among novel ones."]

    lines += ["", "## Calibration: ECE (%, lower is better)", ""]
    split_cols = ["base", "novel"] if b2n else ["base"]
    header = ["method"] + [f"{k} {s}" if b2n else k for k in keys for s in split_cols]
    rows = [
        [method_label(m)] + [cell(_get(summary[m], "tasks", k, s, "ece")) for k in keys for s in split_cols]
        for m in methods
    ]
    lines += _table(header, rows)

    modalities = sorted({k.split("/")[1] for k in keys})
    lines += ["", f"## Per modality (mean {'HM' if b2n else 'top-1'} over the modality's tasks, %)", ""]
    lines += _table(
        ["method", *modalities],
        [[method_label(m)] + [cell(_get(summary[m], "means", "modality", mod)) for mod in modalities] for m in methods],
    )

    lines += ["", "## Local vs global (mean over trained clients, %)", ""]
    lines += [
        "Local: the task's test examples of the client's own classes, classified among those classes; global: all "
        "of the task's test examples and classes.",
        "",
    ]
    rows = [
        [method_label(m)] + [cell(_get(summary[m], "means", f"clients_{side}")) for side in ("local", "global")]
        for m in methods
        if _get(summary[m], "means", "clients_local")
    ]
    lines += _table(["method", "local", "global"], rows)

    unseen = sorted({c for m in methods for c in (_get(summary[m], "unseen") or {})})
    if unseen:
        lines += [
            "",
            "## Unseen clients (never trained; scored on their partition, capped at max_test_examples; %)",
            "",
        ]
        lines += _table(
            ["method"] + [f"{c} local" for c in unseen] + [f"{c} global" for c in unseen],
            [
                [method_label(m)]
                + [cell(_get(summary[m], "unseen", c, "local")) for c in unseen]
                + [cell(_get(summary[m], "unseen", c, "global")) for c in unseen]
                for m in methods
            ],
        )
    targets = sorted({t for m in methods for t in (_get(summary[m], "transfer") or {})})
    if targets:
        lines += ["", "## Cross-dataset transfer (top-1 %, ECE %)", ""]
        lines += ["Tensors learned for the source task, applied with the target's class names; never trained on.", ""]
        lines += _table(
            ["method"] + [f"{t} top-1" for t in targets] + [f"{t} ECE" for t in targets],
            [
                [method_label(m)]
                + [cell(_get(summary[m], "transfer", t, "top1")) for t in targets]
                + [cell(_get(summary[m], "transfer", t, "ece")) for t in targets]
                for m in methods
            ],
        )
    first = summary[methods[0]] if methods else {}
    dom_keys = [(k, d) for k in keys for d in (_get(first, "tasks", k, "domains") or {})]
    if dom_keys:
        lines += ["", "## Domains (top-1 % on each domain's test examples; * = held out of training)", ""]
        held = {
            (k, d) for k, d in dom_keys if (_get(first, "tasks", k, "domains", d, "unseen") or {}).get("mean", 0) > 0
        }
        lines += _table(
            ["method"] + [f"{k} {d}{'*' if (k, d) in held else ''}" for k, d in dom_keys],
            [
                [method_label(m)] + [cell(_get(summary[m], "tasks", k, "domains", d, "top1")) for k, d in dom_keys]
                for m in methods
            ],
        )
    lines += ["", "## Plots", "", "![accuracy per round](accuracy_per_round.png)", ""]
    lines += ["![base, novel, HM per method](base_novel.png)"]
    return lines


def add_means(results: dict) -> dict:
    """Add ``means`` to one method's per-seed results: over tasks (base, novel, hm), per modality, over clients."""
    tasks = results["tasks"]

    def avg(values: list[float]) -> float:
        v = [x for x in values if x is not None and not math.isnan(x)]
        return sum(v) / len(v) if v else math.nan

    by_mod: dict[str, list[float]] = defaultdict(list)
    for k, e in tasks.items():  # HM under base-to-novel, else top-1
        by_mod[k.split("/")[1]].append(e.get("hm", e["base"]["top1"]))
    means = {
        "base": avg([e["base"]["top1"] for e in tasks.values()]),
        "novel": avg([e["novel"]["top1"] for e in tasks.values() if "novel" in e]),
        "hm": avg([e["hm"] for e in tasks.values() if "hm" in e]),
        "modality": {m: avg(v) for m, v in by_mod.items()},
    }
    if results["clients"]:
        means["clients_local"] = avg([c["local"] for c in results["clients"].values()])
        means["clients_global"] = avg([c["global"] for c in results["clients"].values()])
    results["means"] = means
    return results


def plot_rounds(out: Path, metrics_files: list[Path]) -> None:
    """``accuracy_per_round.png``: the federated runs' test accuracy per round, per task and modality (mean over
    seeds; novel classes dashed)."""
    plots.plot_rounds(out / plots.PNG, metrics_files, "Accuracy per round (federated, mean over seeds)")


def plot_methods(out: Path, summary: dict, base_to_novel: bool) -> None:
    """``base_novel.png``: bars of mean base, novel and HM top-1 (over tasks) per method, with the seeds' std."""
    methods = ordered_methods(summary)
    bars = ["base", "novel", "hm"] if base_to_novel else ["base"]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(methods)), 4))
    width = 0.8 / len(bars)
    for i, b in enumerate(bars):
        stats = [_get(summary[m], "means", b) or {"mean": math.nan, "std": 0.0} for m in methods]
        ax.bar(
            [j + i * width for j in range(len(methods))],
            [100 * s["mean"] for s in stats],
            width,
            yerr=[100 * s["std"] for s in stats],
            label={"base": "base" if base_to_novel else "top-1", "novel": "novel", "hm": "HM"}[b],
        )
    ax.set_xticks([j + width * (len(bars) - 1) / 2 for j in range(len(methods))])
    short = {"zeroshot": "zero-shot\n(1 template)", "ensemble": "zero-shot\n(ensemble)"}
    many = len(methods) > 5  # long variant names: slanted so they do not overlap
    ax.set_xticklabels([short.get(m, m) for m in methods], rotation=20 if many else 0, ha="right" if many else "center")
    ax.set_ylabel("top-1 (%), mean over tasks")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "base_novel.png", dpi=100)
    plt.close(fig)
