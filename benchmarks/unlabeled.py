"""Do unlabeled clients help, and does the federation improve the backbone? Over seeds, side by side.

``python -m benchmarks.unlabeled --seeds 0 1 2 [--recipe recipes/unlabeled.yaml] [--json FILE] [overrides ...]``

For each seed, the recipe's federation (tasks with ``labeled_fraction`` < 1) runs twice with the same partitions,
shots and training budget:

    labeled alone:   only the labeled clients (the unlabeled ones are left out of the federation);
    with unlabeled:  every client; the unlabeled ones train on pseudo-labels (``training.pseudo_labels``).

Each task is scored on its test split with the final merged state. Then the second run's merged backbone projections
(a ``BackboneProjections`` part of ``global`` scope, if the recipe has one) are exported as ``mmfl export`` does and
scored by the forgetting guard: zero-shot top-1 with hand-written templates of the original and the exported
backbone on the federation's tasks and on bundled sets it never saw. Figures: mean ± std over seeds; differences are
paired by seed (the same seed draws the same partitions and shots).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from mmfl.backbone import Backbone
from mmfl.data import prepare_task
from mmfl.evaluation.forgetting import forgetting_report, guard_tasks
from mmfl.export import export
from mmfl.federated import Simulation
from mmfl.federated.simulation import seed_all
from mmfl.module import quiet_lightning
from mmfl.prompts.alignment import BackboneProjections
from mmfl.recipe import fit_parser

log = logging.getLogger(__name__)

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "unlabeled.yaml"
SETTINGS = ("labeled alone", "with unlabeled")


def run(recipe: str | Path, seed: int, setting: str, overrides: list[str], backbone: Backbone, out: Path) -> dict:
    """One federation; returns each task's final test accuracy (percent) and its run folder."""
    parser = fit_parser()
    cfg = parser.parse_args(["-c", str(recipe), *overrides, f"--seed={seed}"])
    init = parser.instantiate(cfg)
    prepared = [prepare_task(t, seed=seed) for t in init.tasks]
    if setting == "labeled alone":
        for t in prepared:
            t.clients = [c for c in t.clients if c.labeled]
    run_dir = out / f"{setting.replace(' ', '_')}-{seed}"
    sim = Simulation(backbone, prepared, init.parts, init.training, init.federation, seed=seed, output_dir=run_dir)
    parser.save(cfg, run_dir / "config.yaml", overwrite=True)
    t0 = time.perf_counter()
    with quiet_lightning():
        sim.run()
    rows = [r for r in sim.metrics.rows if r["level"] == "task" and r["split"] == "test"]
    last = max(int(r["round"]) for r in rows)
    acc = {f"{r['task']}/{r['modality']}": 100 * float(r["accuracy"]) for r in rows if int(r["round"]) == last}
    zero = {f"{r['task']}/{r['modality']}": 100 * float(r["accuracy"]) for r in rows if int(r["round"]) == 0}
    return {"accuracy": acc, "zero_shot": zero, "run": str(run_dir), "seconds": time.perf_counter() - t0}


def spread(values: list[float]) -> dict:
    """Mean, standard deviation (over seeds) and the values."""
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def fmt(s: dict) -> str:
    return f"{s['mean']:.1f} ± {s['std']:.1f}"


def main(argv: list[str] | None = None) -> dict:
    """Run, print the tables, write ``--json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--guard-limit", type=int, default=500, help="examples per never-seen set")
    p.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = fit_parser().parse_args(["-c", args.recipe, *overrides])
    seed_all(cfg.seed)
    backbone = Backbone(**cfg.backbone.as_dict())
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    out = Path(tmp.name) if tmp is not None else args.out
    results: dict = {s: {} for s in SETTINGS}
    guard: dict[int, list[dict]] = {}
    for seed in args.seeds:
        for setting in SETTINGS:
            results[setting][seed] = run(args.recipe, seed, setting, overrides, backbone, out)
            log.info("seed %d, %s: %s", seed, setting, results[setting][seed]["accuracy"])
        init = fit_parser().instantiate(cfg)
        if any(isinstance(f(backbone, ["x"]), BackboneProjections) for f in init.parts):
            run_dir = results["with unlabeled"][seed]["run"]
            _, path = export(run_dir, Path(run_dir) / "export.safetensors")
            adapted = Backbone(backbone.model_name, pretrained=str(path))
            guard[seed] = forgetting_report(backbone, adapted, guard_tasks(init.tasks, args.guard_limit))
            path.unlink()
    tasks = list(results[SETTINGS[0]][args.seeds[0]]["accuracy"])
    summary: dict = {"seeds": args.seeds, "recipe": args.recipe, "overrides": overrides, "tasks": {}}
    lines = ["task            zero-shot     labeled alone   with unlabeled   difference (paired)"]
    for t in tasks:
        a = [results["labeled alone"][s]["accuracy"][t] for s in args.seeds]
        b = [results["with unlabeled"][s]["accuracy"][t] for s in args.seeds]
        z = [results["labeled alone"][s]["zero_shot"][t] for s in args.seeds]
        row = {"zero_shot": spread(z), "labeled alone": spread(a), "with unlabeled": spread(b)}
        row["difference"] = spread([y - x for x, y in zip(a, b, strict=True)])
        summary["tasks"][t] = row
        lines.append(
            f"{t:<15} {fmt(row['zero_shot']):<13} {fmt(row['labeled alone']):<15} {fmt(row['with unlabeled']):<16} "
            f"{row['difference']['mean']:+.1f} ± {row['difference']['std']:.1f}"
        )
    if guard:
        summary["export"] = {}
        lines += ["", "exported backbone, zero-shot top-1 (hand-written templates, no prompts)"]
        lines.append("set             kind         original      exported      change (paired)")
        for i, r in enumerate(guard[args.seeds[0]]):
            per = [guard[s][i] for s in args.seeds]
            row = {k: spread([100 * x[k] for x in per]) for k in ("original", "adapted", "change")}
            summary["export"][r["set"]] = {"kind": r["kind"], "n": r["n"], **row}
            lines.append(
                f"{r['set']:<15} {r['kind']:<12} {fmt(row['original']):<13} {fmt(row['adapted']):<13} "
                f"{row['change']['mean']:+.1f} ± {row['change']['std']:.1f}"
            )
    summary["runs"] = results
    log.info("results over seeds %s:\n%s", args.seeds, "\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
