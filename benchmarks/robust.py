"""Robust aggregation under attack: f of n clients are malicious; final accuracy under FedAvg vs each robust rule.

``python -m benchmarks.robust [--quick] [--out DIR]`` runs one federation (digits on mmfl-mini, Dirichlet label
skew, a class-specific CoOp context merged per task) once per (attack, rule) pair, with the same seed, clients,
data and budget. The malicious clients train honestly (or, for the backdoor, on their own data relabelled as the
target class) and then send a doctored reply ``θ + λ·Δ`` (``Δ``: their honest update, ``θ``: the round's global
tensors):

    none:      no attack (the cost of each rule when nobody attacks);
    scaled:    λ = 10 (a boosted update);
    sign flip: λ = −4 (the update reversed and boosted);
    backdoor:  trained to call everything the target class, λ = n/f (model replacement).

"FedAvg + clip" clips every update to the median honest update norm of the unattacked FedAvg run. The table
gives the test accuracy after the last round and, for the backdoor, the share of test inputs of
other classes that are classified as the target class (attack success). ``DIR/robust.json`` holds the figures.
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
from mmfl.federated import FedAvg, Federation, Krum, LocalTraining, Median, Simulation, TrimmedMean, Update
from mmfl.federated.simulation import _Client, seed_all
from mmfl.module import quiet_lightning
from mmfl.prompts import CoOp

log = logging.getLogger(__name__)

ATTACKS = {"none": None, "scaled": 10.0, "sign flip": -4.0, "backdoor": "n/f"}
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
    }


class Attacked(Simulation):
    """A real simulation in which the clients named in ``malicious`` send doctored replies."""

    attack: str = "none"
    malicious: frozenset[str] = frozenset()

    def fit_client(self, client: _Client, rnd: int) -> tuple[Update, dict[str, float]]:
        """Honest training, then the attack's reply for a malicious client."""
        if self.attack == "none" or client.data.cid not in self.malicious:
            return super().fit_client(client, rnd)
        if self.attack == "backdoor":
            relabelled = client.data.train.map(lambda b: {"label": [TARGET] * len(b["label"])}, batched=True)
            client = _Client(dataclasses.replace(client.data, train=relabelled), client.task, client.module)
            boost = len(self.clients) / len(self.malicious)
        else:
            boost = float(ATTACKS[self.attack])
        update, m = super().fit_client(client, rnd)
        g = self.global_state
        state = {k: g[k] + boost * (v - g[k]) for k, v in update.state.items()}  # θ + λ·Δ
        return Update(update.cid, state, update.num_examples), m


def run(backbone: Backbone, task, attack: str, rule: dict, args: argparse.Namespace) -> dict[str, float]:
    """One federation under ``attack`` with merge ``rule``; its final accuracy and backdoor success."""
    seed_all(0)
    rule = dict(rule)
    if rule.get("clip_norm") == "median":  # the honest clients' median update norm (measured without attack)
        rule["clip_norm"] = args.clip_norm
    training = LocalTraining(
        epochs=1, batch_size=32, accelerator="cpu", optimizer=lambda p: torch.optim.AdamW(p, lr=0.01)
    )
    fed = Federation(rounds=args.rounds, eval_every=args.rounds, **rule)
    parts = [lambda bb, names: CoOp(bb, names, ctx_init="a photo of a", class_specific=True, scope="task")]
    sim = Attacked(backbone, [task], parts, training, fed, seed=0)
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
    if attack == "none" and args.clip_norm is None:
        args.clip_norm = statistics.median(norms)
        log.warning("clip norm for 'FedAvg + clip': %.4f (the median honest update norm)", args.clip_norm)
    return {
        "accuracy": float((pred == labels).float().mean()),
        "target_rate": float((pred[others] == TARGET).float().mean()),
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run every (attack, rule) pair and print the table."""
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
    ap.add_argument("--attacks", nargs="*", default=list(ATTACKS))
    ap.add_argument("--out", default=None, help="folder for robust.json")
    args = ap.parse_args(argv)
    args.clients = args.clients or (6 if args.quick else 10)
    args.f = args.f if args.f is not None else (1 if args.quick else 2)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.shots = args.shots or (4 if args.quick else 8)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    datasets.disable_progress_bars()
    seed_all(0)
    backbone = Backbone(args.backbone)
    task = prepare_task(
        Task(
            "digits",
            SklearnDigits(),
            clients=args.clients,
            shots=args.shots,
            max_test_examples=args.test,
            partitioner=functools.partial(
                DirichletPartitioner, partition_by="label", alpha=1.0, min_partition_size=5, seed=0
            ),
        )
    )
    results: dict[str, dict[str, dict[str, float]]] = {}
    attacks = ["none", *[a for a in args.attacks if a != "none"]]  # "none" first: it measures the clip norm
    for attack in attacks:
        for name, rule in rules(args.f).items():
            r = run(backbone, task, attack, rule, args)
            results.setdefault(attack, {})[name] = r
            log.warning(
                "%-9s %-12s accuracy %5.1f%%  target %5.1f%%  (%.0f s)",
                attack,
                name,
                100 * r["accuracy"],
                100 * r["target_rate"],
                r["seconds"],
            )
    names = list(rules(args.f))
    lines = ["| attack | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for attack, row in results.items():
        cells = [f"{100 * row[n]['accuracy']:.1f}%" for n in names]
        if attack == "backdoor":
            cells = [f"{c} (target {100 * row[n]['target_rate']:.0f}%)" for c, n in zip(cells, names, strict=True)]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    setting = (
        f"{args.backbone}, digits, {args.clients} clients ({args.f} malicious), Dirichlet α=1, {args.shots} shots, "
        f"{args.rounds} rounds, clip norm {args.clip_norm:.3g}, {args.test} test examples"
    )
    print(setting + "\n" + "\n".join(lines))  # the benchmark's output
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "robust.json").write_text(json.dumps({"setting": setting, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
