"""Do unlabeled clients help, and does the federation improve the backbone? Over seeds, side by side.

``python -m benchmarks.unlabeled --seeds 0 1 2 [--recipe recipes/unlabeled.yaml] [--json FILE] [overrides ...]``

For each seed, the recipe's federation (tasks with ``labeled_fraction`` < 1) runs in each setting with the same
partitions, shots and training budget (``--settings``; by default the first three):

    labeled alone:   only the labeled clients (the unlabeled ones are left out of the federation);
    with unlabeled:  every client; the unlabeled ones train on pseudo-labels (the recipe's ``training.pseudo_labels``);
    with unlabeled, …: the same with one of the recipe's pseudo-label settings changed (ablations: SETTINGS).

Each task is scored on its test split with the final merged state (and, with ``--at-rounds R …``, with the state
after each round R of the same runs: nothing in a round depends on how many follow, so that is an R-round run's).
Then the second run's merged backbone projections (a ``BackboneProjections`` part of ``global`` scope, if the recipe has
one) are exported as ``mmfl export`` does, once per ``--mix`` (``mmfl export --mix``: the original projections plus that
share of the federation's change), and each export is scored by the forgetting guard: zero-shot top-1 with hand-written
templates of the original and the exported backbone on the federation's tasks and on bundled sets it never saw. Figures:
mean ± std over seeds; differences are paired by seed (the same seed draws the same partitions and shots).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import datasets

from mmfl.backbone import Backbone
from mmfl.data import prepare_task
from mmfl.evaluation.forgetting import forgetting_report, guard_tasks
from mmfl.export import export
from mmfl.federated import Simulation
from mmfl.federated.simulation import seed_all
from mmfl.module import quiet_lightning
from mmfl.prompts.alignment import BackboneProjections
from mmfl.recipe import fit_parser, lists_replace

log = logging.getLogger(__name__)

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "unlabeled.yaml"
WEIGHTED = "--federation.aggregator={class_path: mmfl.federated.FedAvg, init_args: {weighted: true}}"
SETTINGS: dict[str, list[str]] = {
    "labeled alone": [],
    "with unlabeled": [],
    "with unlabeled, no mixup, no warm-up": [
        "--training.pseudo_labels.mixup=0",
        "--training.pseudo_labels.start_round=1",
    ],
    "with unlabeled, no warm-up": ["--training.pseudo_labels.start_round=1"],
    "with unlabeled, top 64": ["--training.pseudo_labels.top_k=64"],
    "with unlabeled, no threshold": ["--training.pseudo_labels.threshold=0.0"],
    "with unlabeled, weighted": [WEIGHTED],
    "with unlabeled, top 16 above 0.9": [  # the recipe of 2026-12-02
        "--training.pseudo_labels.top_k=16",
        "--training.pseudo_labels.threshold=0.9",
        "--training.pseudo_labels.pick=random",
        WEIGHTED,
    ],
    "with unlabeled, most confident": [  # the recipe before 2026-12-02
        "--training.pseudo_labels.top_k=16",
        "--training.pseudo_labels.threshold=0.9",
        "--training.pseudo_labels.pick=most_confident",
        WEIGHTED,
    ],
}
"""Each setting's extra recipe overrides (``labeled alone`` also leaves the unlabeled clients out)."""


def run(
    recipe: str | Path,
    seed: int,
    setting: str,
    overrides: list[str],
    backbone: Backbone,
    out: Path,
    val_fraction: float = 0.0,
) -> dict:
    """One federation; returns each task's final test (and validation) accuracy (percent) and its run folder."""
    parser = fit_parser()
    cfg = parser.parse_args(["-c", str(recipe), *lists_replace(overrides), *SETTINGS[setting], f"--seed={seed}"])
    init = parser.instantiate(cfg)
    prepared = [prepare_task(t, seed=seed, val_fraction=val_fraction) for t in init.tasks]
    if setting == "labeled alone":
        for t in prepared:
            t.clients = [c for c in t.clients if c.labeled]
    run_dir = out / f"{setting.replace(' ', '_')}-{seed}"
    sim = Simulation(backbone, prepared, init.parts, init.training, init.federation, seed=seed, output_dir=run_dir)
    parser.save(cfg, run_dir / "config.yaml", overwrite=True)
    t0 = time.perf_counter()
    with quiet_lightning():
        sim.run()
    rounds: dict[int, dict[str, dict[str, float]]] = {}  # round -> accuracy (test) / val -> task -> percent
    for r in sim.metrics.rows:
        if r["level"] == "task" and r["split"] in ("test", "val"):
            split = "accuracy" if r["split"] == "test" else "val"
            rounds.setdefault(int(r["round"]), {"accuracy": {}, "val": {}})[split][f"{r['task']}/{r['modality']}"] = (
                100 * float(r["accuracy"])
            )
    last = max(rounds)
    seconds = time.perf_counter() - t0
    return {
        **rounds[last],
        "zero_shot": rounds[0]["accuracy"],
        "rounds": rounds,
        "run": str(run_dir),
        "seconds": seconds,
    }


def spread(values: list[float]) -> dict:
    """Mean, standard deviation (over seeds) and the values."""
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def fmt(s: dict) -> str:
    return f"{s['mean']:.1f} ± {s['std']:.1f}"


def table(results: dict, settings: list[str], seeds: list[int], rnd: int | None) -> tuple[dict, list[str]]:
    """Per task and split (val, test): every setting's accuracy over seeds and its difference to the first setting,
    paired by seed, after the last round (``rnd`` None) or after round ``rnd``; and the printed table's lines."""

    def at(name: str, seed: int) -> dict:
        r = results[name][seed]
        return r if rnd is None else r["rounds"][rnd]

    ref, rows = settings[0], {}
    lines = [f"{'task':<15} {'split':<5} {'zero-shot':<12} " + "  ".join(f"{s:<28}" for s in settings)]
    for t in results[ref][seeds[0]]["accuracy"]:
        for split in ("val", "accuracy"):
            if t not in at(ref, seeds[0])[split]:
                continue
            row: dict = {"zero_shot": spread([results[ref][s]["zero_shot"][t] for s in seeds])}
            cells = []
            base = [at(ref, s)[split][t] for s in seeds]
            for name in settings:
                vals = [at(name, s)[split][t] for s in seeds]
                diff = spread([y - x for x, y in zip(base, vals, strict=True)])
                row[name] = {**spread(vals), "difference": diff}
                cells.append(fmt(row[name]) + ("" if name == ref else f" ({diff['mean']:+.1f} ± {diff['std']:.1f})"))
            label = "test" if split == "accuracy" else "val"
            rows.setdefault(t, {})[label] = row
            lines.append(f"{t:<15} {label:<5} {fmt(row['zero_shot']):<12} " + "  ".join(f"{c:<28}" for c in cells))
    return rows, lines


def main(argv: list[str] | None = None) -> dict:
    """Run, print the tables, write ``--json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--guard-limit", type=int, default=500, help="examples per never-seen set")
    p.add_argument("--no-guard", action="store_true", help="skip the export and its forgetting guard")
    p.add_argument(
        "--mix", type=float, nargs="+", default=[1.0], help="export (and guard) with each of these `mmfl export --mix`"
    )
    p.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS)[:3], choices=list(SETTINGS))
    p.add_argument(
        "--at-rounds",
        type=int,
        nargs="+",
        default=[],
        metavar="R",
        help="also tabulate each run after these rounds (a run's first R rounds are an R-round run)",
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="training data held out as validation data")
    args, overrides = p.parse_known_args(argv)
    if not all(0.0 <= m <= 1.0 for m in args.mix):  # before any training
        p.error(f"--mix {' '.join(map(str, args.mix))}: each must be from 0 (the original) to 1 (the run's change)")
    cfg = fit_parser().parse_args(["-c", args.recipe, *lists_replace(overrides)])
    rounds, every = cfg.federation.rounds, cfg.federation.eval_every
    bad = [r for r in args.at_rounds if not 0 <= r <= rounds]
    if bad:  # before any training
        p.error(f"--at-rounds {bad}: each must be from 0 (before training) to federation.rounds ({rounds})")
    unscored = [r for r in args.at_rounds if r % every and r != rounds]
    if unscored:
        p.error(f"--at-rounds {unscored}: the runs are scored every federation.eval_every={every} rounds; pick those")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    datasets.disable_progress_bars()
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    out = Path(tmp.name) if tmp is not None else args.out
    settings = args.settings
    results: dict = {s: {} for s in settings}
    guard: dict[float, dict[int, list[dict]]] = {m: {} for m in args.mix}
    for seed in args.seeds:
        seed_all(seed)  # as `mmfl fit` (and `mmfl export`) build it: a random-weight backbone depends on the seed
        backbone = Backbone(**cfg.backbone.as_dict())
        for setting in settings:
            results[setting][seed] = run(args.recipe, seed, setting, overrides, backbone, out, args.val_fraction)
            log.info("seed %d, %s: %s", seed, setting, results[setting][seed]["accuracy"])
        init = fit_parser().instantiate(cfg)
        if (
            not args.no_guard
            and "with unlabeled" in settings
            and any(isinstance(f(backbone, ["x"]), BackboneProjections) for f in init.parts)
        ):
            run_dir = results["with unlabeled"][seed]["run"]
            tasks, first = guard_tasks(init.tasks, args.guard_limit), None
            for mix in args.mix:
                _, path = export(run_dir, Path(run_dir) / "export.safetensors", mix=mix)
                adapted = Backbone(backbone.model_name, pretrained=str(path))
                guard[mix][seed] = first = forgetting_report(backbone, adapted, tasks, reference=first)
                path.unlink()
    summary: dict = {"seeds": args.seeds, "recipe": args.recipe, "overrides": overrides}
    summary["tasks"], lines = table(results, settings, args.seeds, None)
    if args.at_rounds:
        summary["at_rounds"] = {}
        for rnd in args.at_rounds:
            summary["at_rounds"][str(rnd)], more = table(results, settings, args.seeds, rnd)
            lines += ["", f"after round {rnd} of the same runs", *more]
    if any(guard.values()):
        summary["exports"] = {}
        for mix, by_seed in guard.items():
            lines += ["", f"exported backbone (--mix {mix}), zero-shot top-1 (hand-written templates, no prompts)"]
            lines.append("set             kind         original      exported      change (paired)")
            rows = summary["exports"][str(mix)] = {}
            for i, r in enumerate(by_seed[args.seeds[0]]):
                per = [by_seed[s][i] for s in args.seeds]
                row = {k: spread([100 * x[k] for x in per]) for k in ("original", "adapted", "change")}
                rows[r["set"]] = {"kind": r["kind"], "n": r["n"], **row}
                lines.append(
                    f"{r['set']:<15} {r['kind']:<12} {fmt(row['original']):<13} {fmt(row['adapted']):<13} "
                    f"{row['change']['mean']:+.1f} ± {row['change']['std']:.1f}"
                )
        summary["export"] = summary["exports"][str(args.mix[0])]  # the first --mix
    summary["runs"] = results
    log.info("results over seeds %s:\n%s", args.seeds, "\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
