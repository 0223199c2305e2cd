"""Robust aggregation under attack: f of n clients are malicious; final accuracy under FedAvg vs each robust rule.

``python -m benchmarks.robust [--quick] [--out DIR]`` runs one federation (digits on mmfl-mini, Dirichlet label
skew, a class-specific CoOp context merged per task) once per (attack, rule) pair, with the same seed, clients,
data and budget. The malicious clients train honestly (or, for the backdoor, on their own data relabelled as the
target class) and then send a doctored reply ``θ + λ·Δ`` (``Δ``: their honest update, ``θ``: the round's global
tensors):

    none:      no attack (the cost of each rule when nobody attacks);
    scaled:    λ = 10 (a boosted update);
    sign flip: λ = −4 (the update reversed and boosted);
    backdoor:  trained to call everything the target class, λ = n/f (model replacement);
    adaptive:  the backdoor update scaled to the norm of the attacker's own honest update, so that it stays under
               any clipping bound an honest client meets (the norm-bounded backdoor of Sun et al., 2019).

"FedAvg + clip" clips every update to the median honest update norm of the seed's unattacked FedAvg run (a
hand-set bound, measured); FLAME sets its own bound each round. ``--seeds 0 1 2`` repeats everything per seed
(data partition, clients, training) and reports mean ± std. The table gives the test accuracy after the last
round and, for the backdoors, the share of test inputs of other classes that are classified as the target class
(attack success). ``DIR/robust.json`` holds every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import statistics
import time
from pathlib import Path

import datasets
import torch
from flwr_datasets.partitioner import DirichletPartitioner

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.evaluation.runner import predict
from mmfl.federated import FedAvg, Federation, Flame, Krum, LocalTraining, Median, Simulation, TrimmedMean, Update
from mmfl.federated.pool import Client
from mmfl.federated.simulation import seed_all
from mmfl.module import quiet_lightning
from mmfl.prompts import CoOp

log = logging.getLogger(__name__)

ATTACKS = {"none": None, "scaled": 10.0, "sign flip": -4.0, "backdoor": "n/f", "adaptive": "honest norm"}
TARGET = 0


def rules(f: int) -> dict[str, dict]:
    """The merge rules compared, as Federation keyword arguments (f: the number of malicious clients)."""
    return {
        "FedAvg": {"aggregator": FedAvg()},
        "FedAvg + clip": {"aggregator": FedAvg(), "clip_norm": "median"},
        "Median": {"aggregator": Median()},
        "TrimmedMean": {"aggregator": TrimmedMean(beta=0.25)},
        "Krum": {"aggregator": Krum(f=f, m=1)},
        "Multi-Krum": {"aggregator": Krum(f=f, m=max(1, 2 * f))},
        "FLAME": {"aggregator": Flame()},
    }


class Attacked(Simulation):
    """A real simulation in which the clients named in ``malicious`` send doctored replies."""

    attack: str = "none"
    malicious: frozenset[str] = frozenset()

    def fit_client(self, client: Client, rnd: int) -> tuple[Update, dict[str, float]]:
        """Honest training, then the attack's reply for a malicious client."""
        if self.attack == "none" or client.data.cid not in self.malicious:
            return super().fit_client(client, rnd)
        g = self.global_state
        if self.attack in ("backdoor", "adaptive"):
            honest_norm = None
            if self.attack == "adaptive":  # its honest update's norm: what a clipping bound lets through
                before = client.local_state()
                honest, _ = super().fit_client(client, rnd)
                honest_norm = sum(float((v - g[k]).pow(2).sum()) for k, v in honest.state.items()) ** 0.5
                client.set_local(before)
            relabelled = client.data.train.map(lambda b: {"label": [TARGET] * len(b["label"])}, batched=True)
            poisoned = dataclasses.replace(client, data=dataclasses.replace(client.data, train=relabelled))
            update, m = super().fit_client(poisoned, rnd)
            client.set_local(poisoned.local_state())
            norm = sum(float((v - g[k]).pow(2).sum()) for k, v in update.state.items()) ** 0.5
            boost = len(self.clients) / len(self.malicious) if honest_norm is None else honest_norm / max(norm, 1e-12)
        else:
            boost = float(ATTACKS[self.attack])
            update, m = super().fit_client(client, rnd)
        state = {k: g[k] + boost * (v - g[k]) for k, v in update.state.items()}  # θ + λ·Δ
        return Update(update.cid, state, update.num_examples), m


def run(backbone: Backbone, task, attack: str, rule: dict, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """One federation under ``attack`` with merge ``rule``; its final accuracy, backdoor success and the median
    honest update norm."""
    seed_all(seed)
    rule = dict(rule)
    if rule.get("clip_norm") == "median":  # the honest clients' median update norm (measured without attack)
        rule["clip_norm"] = args.clip[seed]
    training = LocalTraining(
        epochs=1, batch_size=32, accelerator="cpu", optimizer=lambda p: torch.optim.AdamW(p, lr=0.01)
    )
    fed = Federation(rounds=args.rounds, eval_every=args.rounds, **rule)
    parts = [lambda bb, names: CoOp(bb, names, ctx_init="a photo of a", class_specific=True, scope="task")]
    sim = Attacked(backbone, [task], parts, training, fed, seed=seed)
    sim.attack = attack
    sim.malicious = frozenset(c.data.cid for c in sim.clients[: args.f])
    t0 = time.perf_counter()
    with quiet_lightning():
        for rnd in range(1, args.rounds + 1):
            sim.run_round(rnd)
        logits, labels = predict(sim.evaluator(task), task.test, accelerator="cpu")
    pred = logits.argmax(dim=1)
    others = labels != TARGET
    norms = [float(r["value"]) for r in sim.metrics.rows if r["split"] == "fit"]
    return {
        "accuracy": float((pred == labels).float().mean()),
        "target_rate": float((pred[others] == TARGET).float().mean()),
        "median_norm": statistics.median(norms),
        "seconds": time.perf_counter() - t0,
    }


def _task(args: argparse.Namespace, seed: int):
    partitioner = functools.partial(
        DirichletPartitioner, partition_by="label", alpha=1.0, min_partition_size=5, seed=seed
    )
    data = Task("digits", SklearnDigits(), clients=args.clients, shots=args.shots, max_test_examples=args.test)
    data.partitioner = partitioner
    return prepare_task(data, seed=seed)


def _summary(runs: list[dict[str, float]], clean: list[dict[str, float]]) -> dict:
    """Mean and std over seeds, and the accuracy lost against the same rule's unattacked run (paired by seed)."""

    def spread(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    acc, acc_std = spread([r["accuracy"] for r in runs])
    target, target_std = spread([r["target_rate"] for r in runs])
    drop, drop_std = spread([c["accuracy"] - r["accuracy"] for r, c in zip(runs, clean, strict=True)])
    return {
        "accuracy": acc,
        "accuracy_std": acc_std,
        "target_rate": target,
        "target_rate_std": target_std,
        "drop": drop,
        "drop_std": drop_std,
        "per_seed": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run every (seed, attack, rule) and print the table of means ± std over seeds."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer clients, shots and rounds")
    ap.add_argument("--backbone", default="mmfl-mini")
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--f", type=int, default=None, help="malicious clients")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--shots", type=int, default=None)
    ap.add_argument(
        "--clip_norm", type=float, default=None, help="default: the median update norm of the unattacked FedAvg run"
    )
    ap.add_argument("--test", type=int, default=300, help="test examples")
    ap.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument("--rules", nargs="*", default=None, help=f"rules to compare (default: all of {list(rules(1))})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=None, help="folder for robust.json")
    args = ap.parse_args(argv)
    args.clients = args.clients or (6 if args.quick else 10)
    args.f = args.f if args.f is not None else (1 if args.quick else 2)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.shots = args.shots or (4 if args.quick else 8)
    names = args.rules or list(rules(args.f))
    unknown = sorted(set(names) - set(rules(args.f)))
    if unknown:
        ap.error(f"unknown rules {unknown}; choose from {list(rules(args.f))}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    datasets.disable_progress_bars()
    seed_all(0)
    backbone = Backbone(args.backbone)
    attacks = ["none", *[a for a in args.attacks if a != "none"]]  # "none" first: it is each rule's reference
    runs: dict[str, dict[str, list[dict[str, float]]]] = {a: {n: [] for n in names} for a in attacks}
    args.clip = {}
    for seed in args.seeds:
        task = _task(args, seed)
        if args.clip_norm is not None:
            args.clip[seed] = args.clip_norm
        else:  # the median honest update norm of the unattacked FedAvg run of this seed
            args.clip[seed] = run(backbone, task, "none", rules(args.f)["FedAvg"], args, seed)["median_norm"]
            log.warning("seed %d: clip norm for 'FedAvg + clip': %.4f", seed, args.clip[seed])
        for attack in attacks:
            for name in names:
                r = run(backbone, task, attack, rules(args.f)[name], args, seed)
                runs[attack][name].append(r)
                log.warning(
                    "seed %d %-9s %-12s accuracy %5.1f%%  target %5.1f%%  (%.0f s)",
                    seed,
                    attack,
                    name,
                    100 * r["accuracy"],
                    100 * r["target_rate"],
                    r["seconds"],
                )
    results = {a: {n: _summary(runs[a][n], runs["none"][n]) for n in names} for a in attacks}
    lines = ["| attack | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for attack, row in results.items():
        cells = []
        for n in names:
            cell = f"{100 * row[n]['accuracy']:.1f} ± {100 * row[n]['accuracy_std']:.1f}%"
            if attack in ("backdoor", "adaptive"):
                cell += f" (target {100 * row[n]['target_rate']:.0f} ± {100 * row[n]['target_rate_std']:.0f}%)"
            cells.append(cell)
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    clips = ", ".join(f"{v:.3g}" for v in args.clip.values())
    setting = (
        f"{args.backbone}, digits, {args.clients} clients ({args.f} malicious), Dirichlet α=1, {args.shots} shots, "
        f"{args.rounds} rounds, seeds {args.seeds}, clip norm {clips}, {args.test} test examples"
    )
    print(setting + "\n" + "\n".join(lines))  # the benchmark's output
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "robust.json").write_text(json.dumps({"setting": setting, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
