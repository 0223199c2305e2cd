"""Does collaboration across tasks and modalities help? One recipe, three ways of sharing, side by side.

``python -m benchmarks.collaboration [-c recipes/multimodal.yaml] [--rounds 10] [--out DIR]`` runs the recipe's
federation three times with the same seed, clients, data and training budget, changing only the scopes of its
parts:

    alone:          every tensor ``local`` — each client trains only on its own data;
    same (task, modality): every tensor ``task_modality`` — merged only over clients of the same task and modality;
    mmfl scopes:    the recipe's own scopes (e.g. a task's prompt merged over its image AND audio clients, the
                    audio projection over the audio clients of every task).

After the last round each client is evaluated on its (task, modality) test split with what it would use: the
merged tensors of its keys plus its own local ones. The table gives the mean and the range over the clients of
each (task, modality); ``DIR/collaboration.json`` holds every client's figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from mmfl.backbone import Backbone
from mmfl.data import prepare_task
from mmfl.federated import Simulation
from mmfl.federated.simulation import seed_all
from mmfl.module import quiet_lightning
from mmfl.recipe import fit_parser

log = logging.getLogger(__name__)

SETTINGS = {"alone": "local", "same (task, modality)": "task_modality", "mmfl scopes": None}
"""Each setting's scope for every tensor of every part (None: the recipe's own scopes)."""


@dataclass
class SettingResult:
    """One setting's outcome: accuracy and (task/modality) group per client id, the merged keys, the wall time."""

    accuracy: dict[str, float]
    groups: dict[str, str]
    merged_keys: list[str]
    seconds: float


def build_backbone(recipe: str, overrides: list[str]) -> Backbone:
    """The recipe's frozen backbone (built once and shared by the settings)."""
    cfg = fit_parser().parse_args(["-c", recipe, *overrides])
    seed_all(cfg.seed)
    return Backbone(**cfg.backbone.as_dict())


def run_setting(recipe: str, scope: str | None, overrides: list[str], backbone: Backbone) -> SettingResult:
    """Run the recipe's federation with every part's scope set to ``scope`` (None: as written) and evaluate
    each client on its (task, modality) test split with the merged tensors plus its own local ones."""
    parser = fit_parser()
    cfg = parser.parse_args(["-c", recipe, *overrides])
    if scope is not None:
        for part in cfg.parts:
            part.init_args.scope, part.init_args.scopes = scope, None
    init = parser.instantiate(cfg)
    prepared = [prepare_task(t, seed=cfg.seed) for t in init.tasks]
    sim = Simulation(backbone, prepared, init.parts, init.training, init.federation, seed=cfg.seed)
    t0 = time.perf_counter()
    accs, groups = {}, {}
    with quiet_lightning():
        for rnd in range(1, init.federation.rounds + 1):
            sim.run_round(rnd)
            log.warning("  round %d/%d done", rnd, init.federation.rounds)
        for c in sim.clients:
            c.module.load_trainable_state_dict(sim.global_state)  # merged tensors; its local ones stay its own
            accs[c.data.cid] = sim.evaluate(c.module, c.task, c.task.test)["accuracy"]
            groups[c.data.cid] = f"{c.task.name}/{c.task.modality}"
    return SettingResult(accs, groups, sorted(sim.global_state), time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    """Run the three settings and print the table (and write it with every client's figure)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--recipe", default="recipes/multimodal.yaml")
    ap.add_argument("--rounds", type=int, default=None, help="override the recipe's rounds")
    ap.add_argument("--out", default=None, help="folder for collaboration.json")
    ap.add_argument("overrides", nargs="*", help="more recipe overrides, e.g. --training.epochs=2")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    overrides = list(args.overrides) + ([f"--federation.rounds={args.rounds}"] if args.rounds else [])
    backbone, results, groups = build_backbone(args.recipe, overrides), {}, {}
    for name, scope in SETTINGS.items():
        log.warning("setting %s", name)
        r = run_setting(args.recipe, scope, overrides, backbone)
        results[name], groups = r.accuracy, r.groups
        log.warning("setting %s: %.0f s", name, r.seconds)
    order = list(dict.fromkeys(groups.values()))
    lines = ["| task / modality | " + " | ".join(SETTINGS) + " |", "|---" * (len(SETTINGS) + 1) + "|"]
    for g in order:
        cells = []
        for name in SETTINGS:
            vals = [100 * a for cid, a in results[name].items() if groups[cid] == g]
            cells.append(f"{statistics.mean(vals):.1f}% ({min(vals):.0f}–{max(vals):.0f})")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    means = [statistics.mean(100 * a for a in results[name].values()) for name in SETTINGS]
    lines.append("| mean over clients | " + " | ".join(f"{m:.1f}%" for m in means) + " |")
    print("\n".join(lines))  # the benchmark's output
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        payload = {"recipe": args.recipe, "overrides": overrides, "per_client": results, "groups": groups}
        (Path(args.out) / "collaboration.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
