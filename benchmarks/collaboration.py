"""Does collaboration across tasks and modalities help? One scenario, several ways of sharing, over seeds.

``python -m benchmarks.collaboration --scenario NAME --seeds 0 1 2 [--rounds R] [--settings ...] --json FILE``
runs a scenario's federation once per setting and seed, with the same clients, data and training budget, changing
only the scopes of its parts. Each part's *base* scope is the widest one of its recipe scope (``task`` for
``task``, ``task+task_modality`` or ``mix(task_modality, task, own=0.8)``); a setting rewrites every part whose base
scope is wider than a (task, modality) (``global``, ``task``, ``modality``) as follows:

    alone:                 ``local`` (every part): each client trains only on its own data;
    same (task, modality): ``task_modality`` (every part): merged only within a (task, modality);
    task:                  ``task`` for a ``global`` or ``task`` base (a task's clients of every modality);
    plain:                 the base scope itself (e.g. ``global`` in scarce-task);
    components:            ``BASE+task_modality``: a shared tensor plus a (task, modality) one from zero;
    own 0.8:               ``mix(task_modality, BASE, own=0.8)``: each (task, modality) keeps 0.8 of its merge;
    others 0.1:            ``mix(task_modality, BASE, others=0.1)``: the other groups' examples count 0.1;
    similarity:            ``mix(task_modality, BASE, similarity)``: shares from the similarity of updates;
    own val:               ``mix(task_modality, BASE, own=val)``: each (task, modality)'s own share chosen every
                           round on its validation split (see ``--val-fraction``);
    by modality:           ``task_modality`` for a ``task`` base, the base itself for the others: a task's prompt
                           kept per (task, modality), a modality's own part (an audio projection, ``modality``)
                           shared by that modality's clients of every task;
    recipe:                the recipe's scopes as written (the default docs/measurements.md recommends).

``--val-fraction F`` (default 0.2) holds F of each task's training pool out as validation data *in every setting*,
so every setting trains on the same clients' data and only ``own val`` looks at the held-out part; ``0`` holds
nothing out (then ``own val`` cannot run).

``--choose A B …`` adds a row where each (task, modality) group keeps, seed by seed, the one of the settings A, B, …
(each also run) whose final state scores highest on the group's validation split (``benchmarks/val_choice.py``): a
choice of sharing from whole runs, at the cost of training every candidate.

``--base modality`` takes ``modality`` as the base scope of every part whose own is wide (e.g. to share a scarce
task's context with the other tasks of its modality only, where the recipe says ``global``).

Scenarios: ``multimodal`` (``recipes/multimodal.yaml``), ``scarce-modality`` and ``scarce-task``
(``benchmarks/scenarios/``). After the last round each client is scored on its (task, modality) test split with
what it would use: the merged tensors of its keys plus its own local ones. The table gives, per (task, modality)
row, the mean over seeds of the row's mean over clients ± the standard deviation over seeds; a second table gives
each setting's difference to ``same (task, modality)`` seed by seed (mean ± std of the paired differences: the same
seed draws the same shots, so this spread is the one to hold a difference against). The JSON file holds all that,
every client's figure per seed, the bytes a client sends per round and the server's seconds per round.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
from jsonargparse import Namespace

from benchmarks.collab_tables import Summary, paired, paired_table, summarize, table
from benchmarks.val_choice import check_choice, choose_per_group, chosen_name
from mmfl.backbone import Backbone
from mmfl.data import prepare_task
from mmfl.evaluation.protocol import Protocol
from mmfl.federated import Simulation
from mmfl.federated.round_merge import RoundMerge
from mmfl.federated.scopes import parse_scope
from mmfl.federated.simulation import seed_all
from mmfl.module import quiet_lightning
from mmfl.recipe import fit_parser, lists_replace

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SCENARIOS = {
    "multimodal": HERE.parent / "recipes" / "multimodal.yaml",
    "scarce-modality": HERE / "scenarios" / "scarce_modality.yaml",
    "scarce-task": HERE / "scenarios" / "scarce_task.yaml",
}
"""Each scenario's recipe."""

WIDE = ("global", "task", "modality")

SETTINGS: dict[str, Callable[[str], str] | None] = {
    "alone": lambda base: "local",
    "same (task, modality)": lambda base: "task_modality",
    "task": lambda base: "task" if base in ("global", "task") else base,
    "plain": lambda base: base,
    "components": lambda base: f"{base}+task_modality",
    "own 0.8": lambda base: f"mix(task_modality, {base}, own=0.8)",
    "others 0.1": lambda base: f"mix(task_modality, {base}, others=0.1)",
    "similarity": lambda base: f"mix(task_modality, {base}, similarity)",
    "own val": lambda base: f"mix(task_modality, {base}, own=val)",
    "by modality": lambda base: "task_modality" if base == "task" else base,
    "recipe": None,
}
"""Each setting's scope for a part of a given base scope (None: the recipe's own scopes)."""

ALL_PARTS = ("alone", "same (task, modality)")
"""Settings that rewrite every part, whatever its base scope."""


def base_scope(scope: str) -> str:
    """The widest scope of a scope spec (a mix's wide scope, else its first component)."""
    spec = parse_scope(scope)
    return spec.mix.wide if spec.mix is not None else spec.components[0]


def configure(cfg: Namespace, setting: str, base: str | None = None) -> None:
    """Rewrite the parts' scopes of a parsed recipe for ``setting`` (in place); per-parameter overrides are dropped
    by a setting that rewrites the part. ``base``: take this as the base scope of every part whose own base scope
    is wide (e.g. ``modality`` instead of a recipe's ``global``), for every setting but ``recipe``."""
    rewrite = SETTINGS[setting]
    if rewrite is None:
        return
    for part in cfg.parts:
        args = part.init_args
        own = base_scope(args.get("scope") or "task")
        if setting in ALL_PARTS or own in WIDE:
            args.scope, args.scopes = rewrite(base if base and own in WIDE else own), None


@dataclass
class SettingResult:
    """One setting and seed: accuracy and (task/modality) row per client id, merged keys, bytes, seconds."""

    accuracy: dict[str, float]
    groups: dict[str, str]
    merged_keys: list[str]
    bytes_per_client_round: float
    server_seconds_per_round: float
    seconds: float
    shares: dict[str, list[float]] = field(default_factory=dict)
    """``own val``: the own share chosen for each group, round by round."""
    averaged: dict[str, float] | None = None
    """With ``average_rounds``: each client's accuracy with its tensors averaged over the last rounds."""
    best_val: dict[str, float] | None = None
    """With ``best_val``: each client's accuracy with the state ``selection: best_val`` keeps."""
    val: dict[str, float] = field(default_factory=dict)
    """Each client's accuracy on its (task, modality) validation split with its final state (when there is one)."""


class _TimedSimulation(Simulation):
    """A simulation that adds up the server's time spent merging (clipping, merging, noise, mixing, step): the
    replies merged as they arrive and the round's end."""

    server_seconds: float = 0.0

    def open_merge(self) -> RoundMerge:
        stream = super().open_merge()
        for name in ("add", "result"):
            setattr(stream, name, self._timed(getattr(stream, name)))
        return stream

    def _timed(self, method):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.server_seconds += time.perf_counter() - t0

        return timed


def build_backbone(recipe: str | Path, overrides: list[str]) -> Backbone:
    """The recipe's frozen backbone (built once and shared by every setting and seed)."""
    cfg = fit_parser().parse_args(["-c", str(recipe), *lists_replace(overrides)])
    seed_all(cfg.seed)
    return Backbone(**cfg.backbone.as_dict())


def run_setting(
    recipe: str | Path,
    setting: str,
    overrides: list[str],
    backbone: Backbone,
    seed: int | None = None,
    edit: Callable[[Namespace], None] | None = None,
    base: str | None = None,
    average_rounds: int | None = None,
    best_val: bool = False,
) -> SettingResult:
    """Run the recipe's federation under ``setting`` and score each client on its (task, modality) test split.

    Args:
        recipe: the scenario's recipe.
        setting: a key of :data:`SETTINGS`.
        overrides: recipe overrides (``--federation.rounds=2``, ...).
        backbone: the frozen backbone.
        seed: the run's seed (None: the recipe's).
        edit: changes the parsed recipe further (the tests shrink the tasks with it).
        base: the base scope to take for the parts of a wide base scope (see :func:`configure`).
        average_rounds: also score each client with its merged and local tensors averaged over this many last
            rounds (``evaluation.selection: average``; :attr:`SettingResult.averaged`), from the same training.
        best_val: also score each client with the state ``evaluation.selection: best_val`` keeps (every round scored
            on the tasks' validation splits; with ``average_rounds``, the average is a candidate too).
    """
    parser = fit_parser()
    cfg = parser.parse_args(
        ["-c", str(recipe), *lists_replace(overrides), *([f"--seed={seed}"] if seed is not None else [])]
    )
    configure(cfg, setting, base)
    if edit is not None:
        edit(cfg)
    init = parser.instantiate(cfg)
    val_fraction = (init.evaluation or Protocol()).val_fraction
    prepared = [prepare_task(t, seed=cfg.seed, val_fraction=val_fraction) for t in init.tasks]
    selection = {"selection": "best_val" if best_val else "average" if average_rounds else "last"}
    selection["average_rounds"] = average_rounds
    sim = _TimedSimulation(backbone, prepared, init.parts, init.training, init.federation, seed=cfg.seed, **selection)
    t0 = time.perf_counter()
    accs, groups, vals = {}, {}, {}
    sent = [
        sum(t.numel() * t.element_size() for t in c.module.trainable_state_dict(False).values()) for c in sim.clients
    ]
    rounds = init.federation.rounds
    with quiet_lightning():
        if best_val:
            sim.evaluate_tasks(0, local_tests=False)  # round 0 is a candidate of best_val, as in `mmfl fit`
        for rnd in range(1, rounds + 1):
            sim.run_round(rnd)
            if best_val:
                sim.evaluate_tasks(rnd, local_tests=False)
            sim.end_average(rnd)  # the running sums of the average; after the last round, the average's score
        for c in sim.clients:
            c.module.load_trainable_state_dict(sim.global_state)  # merged tensors; its local ones stay its own
            accs[c.data.cid] = sim.evaluate(c.module, c.task, c.task.test)["accuracy"]
            groups[c.data.cid] = f"{c.task.name}/{c.task.modality}"
            if c.task.val is not None and len(c.task.val):
                vals[c.data.cid] = sim.evaluate(c.module, c.task, c.task.val)["accuracy"]
        averaged = _score(sim, *sim.averaged()) if average_rounds else None
        chosen = _score(sim, *sim.selected()) if best_val else None
    return SettingResult(
        accs,
        groups,
        sorted(sim.global_state),
        statistics.mean(sent),
        sim.server_seconds / max(rounds, 1),
        time.perf_counter() - t0,
        _shares(sim),
        averaged,
        chosen,
        vals,
    )


def _score(sim: Simulation, glob: dict, local: dict) -> dict[str, float]:
    """Each client's test accuracy with the merged tensors ``glob`` and its local ones from ``local``."""
    accs = {}
    for c in sim.clients:
        module = c.module  # (asking for it again would load its last local tensors back in)
        module.load_trainable_state_dict({**glob, **local[c.data.cid]})
        accs[c.data.cid] = sim.evaluate(module, c.task, c.task.test)["accuracy"]
    return accs


def _shares(sim: Simulation) -> dict[str, list[float]]:
    """The own shares an ``own=val`` mix chose, per group, in round order (its ``mix_share`` rows)."""
    out: dict[str, list[float]] = {}
    for r in sim.metrics.rows:
        if r["split"] == "mix_share":
            out.setdefault(str(r["note"]), []).append(float(r["value"]))
    return out


def main(argv: list[str] | None = None) -> dict[str, Summary]:
    """Run the settings over the seeds, print the table, write the JSON file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="multimodal")
    ap.add_argument("-c", "--recipe", default=None, help="another recipe instead of the scenario's")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=None, help="override the recipe's rounds")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--base", choices=WIDE, default=None, help="the base scope of the wide parts (default: theirs)")
    ap.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of each task's training pool held out as validation data in every setting (own val chooses on it)",
    )
    ap.add_argument(
        "--average-rounds",
        type=int,
        default=None,
        help="also score every setting with the tensors averaged over this many last rounds (evaluation.selection: "
        "average), from the same training: rows 'SETTING, averaged'",
    )
    ap.add_argument(
        "--best-val",
        action="store_true",
        help="also score every setting with the state evaluation.selection: best_val keeps (with --average-rounds, "
        "the average is a candidate): rows 'SETTING, best_val'",
    )
    ap.add_argument(
        "--choose",
        nargs="+",
        action="append",
        default=[],
        choices=list(SETTINGS),
        metavar="SETTING",
        help="also a row where each (task, modality) keeps the one of these settings (each also in --settings) whose "
        "final state scores highest on its validation split: 'chosen on val: A or B' (repeatable)",
    )
    ap.add_argument("--json", default=None, help="write every figure to this file")
    ap.add_argument("overrides", nargs="*", help="recipe overrides after --, e.g. -- --training.epochs=2")
    args = ap.parse_args(argv)
    for names in args.choose:
        check_choice(names, args.settings, args.val_fraction, ap.error)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    datasets.disable_progress_bars()  # else a "Flattening the indices" bar per split, setting and seed
    recipe = args.recipe or SCENARIOS[args.scenario]
    overrides = [f"--evaluation.val_fraction={args.val_fraction}", *args.overrides]
    overrides += [f"--federation.rounds={args.rounds}"] if args.rounds else []
    backbone = build_backbone(recipe, overrides)
    runs: dict[str, dict[int, SettingResult]] = {name: {} for name in args.settings}
    if args.average_rounds:
        runs.update({f"{name}, averaged": {} for name in args.settings})
    if args.best_val:
        runs.update({f"{name}, best_val": {} for name in args.settings})
    for seed in args.seeds:
        for name in args.settings:
            r = run_setting(
                recipe,
                name,
                overrides,
                backbone,
                seed,
                base=args.base,
                average_rounds=args.average_rounds,
                best_val=args.best_val,
            )
            runs[name][seed] = r
            log.warning(
                "seed %d, %s: mean %.1f%% (%.0f s)", seed, name, 100 * statistics.mean(r.accuracy.values()), r.seconds
            )
            if r.averaged is not None:
                runs[f"{name}, averaged"][seed] = dataclasses.replace(r, accuracy=r.averaged, averaged=None)
                mean = 100 * statistics.mean(r.averaged.values())
                log.warning("seed %d, %s, averaged: mean %.1f%%", seed, name, mean)
            if r.best_val is not None:
                runs[f"{name}, best_val"][seed] = dataclasses.replace(r, accuracy=r.best_val, best_val=None)
                log.warning(
                    "seed %d, %s, best_val: mean %.1f%%", seed, name, 100 * statistics.mean(r.best_val.values())
                )
    choices: dict[str, dict[int, dict[str, str]]] = {}
    for names in args.choose:
        row = chosen_name(names)
        # every task holds validation data out (at least one example each: check_choice made sure it is > 0)
        picks = {seed: choose_per_group({n: runs[n][seed] for n in names}, names) for seed in args.seeds}
        runs[row] = {seed: r for seed, (r, _) in picks.items()}
        choices[row] = {seed: c for seed, (_, c) in picks.items()}
        for seed, (r, c) in picks.items():
            log.warning("seed %d, %s: mean %.1f%% %s", seed, row, 100 * statistics.mean(r.accuracy.values()), c)
    summaries = {name: summarize(r) for name, r in runs.items()}
    reference = "same (task, modality)" if "same (task, modality)" in summaries else next(iter(summaries))
    print(table(summaries) + "\n\n" + paired_table(summaries, reference))  # the benchmark's output
    if args.json:
        first = next(iter(runs.values()))
        payload = {
            "scenario": args.scenario,
            "recipe": str(recipe),
            "overrides": overrides,
            "seeds": args.seeds,
            "base": args.base,
            "val_fraction": args.val_fraction,
            "average_rounds": args.average_rounds,
            "best_val": args.best_val,
            "groups": first[args.seeds[0]].groups,
            "settings": {name: asdict(s) for name, s in summaries.items()},
            "paired_reference": reference,
            "paired": paired(summaries, reference),
            "merged_keys": {name: r[args.seeds[0]].merged_keys for name, r in runs.items()},
            "shares": {name: {seed: r[seed].shares for seed in r} for name, r in runs.items() if "val" in name},
            "choices": choices,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return summaries


if __name__ == "__main__":
    main()
