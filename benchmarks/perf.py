"""In-process performance figures: round efficiency against a tight loop of the same passes, the frozen-feature
cache's speed-up, and the peak memory of a federation (run in a fresh process per size)."""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from flwr_datasets.partitioner import IidPartitioner

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.data.feature_cache import encoded_loader
from mmfl.data.splits import LABEL
from mmfl.federated import Federation, LocalTraining, Simulation
from mmfl.federated.settings import seed_all
from mmfl.module import quiet_lightning
from mmfl.prompts import CoOp


@dataclass
class Setting:
    """One benchmark federation: backbone, clients, data per client, accelerator."""

    backbone: str = "mmfl-mini"
    pretrained: str | None = None
    clients: int = 10
    shots: int = 8
    batch_size: int = 32
    accelerator: str = "auto"
    n_ctx: int = 4

    def args(self) -> list[str]:
        """As command-line arguments of ``python -m benchmarks.perf``."""
        out = [f"--backbone={self.backbone}", f"--clients={self.clients}", f"--shots={self.shots}"]
        out += [f"--batch_size={self.batch_size}", f"--accelerator={self.accelerator}", f"--n_ctx={self.n_ctx}"]
        return out + ([f"--pretrained={self.pretrained}"] if self.pretrained else [])


def build(s: Setting, cache: str = "disk", backbone: Backbone | None = None) -> Simulation:
    """The setting's federation: digits over ``clients`` IID clients, ``shots`` per class each, CoOp per task."""
    seed_all(0)
    bb = backbone or Backbone(s.backbone, pretrained=s.pretrained)
    task = prepare_task(
        Task(
            "digits",
            SklearnDigits(),
            clients=s.clients,
            shots=s.shots,
            max_test_examples=100,
            partitioner=functools.partial(IidPartitioner),
        )
    )
    training = LocalTraining(
        epochs=1,
        batch_size=s.batch_size,
        accelerator=s.accelerator,
        feature_cache=cache,
        optimizer=lambda p: torch.optim.AdamW(p, lr=0.01),
    )
    part = functools.partial(CoOp, n_ctx=s.n_ctx, scope="task")
    return Simulation(bb, [task], [part], training, Federation(rounds=3), seed=0)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_round(sim: Simulation, rnd: int) -> float:
    """Wall seconds of one round (sample, fit every client, merge); no evaluation."""
    _sync()
    t0 = time.perf_counter()
    with quiet_lightning():
        sim.run_round(rnd)
    _sync()
    return time.perf_counter() - t0


def tight_loop(sim: Simulation, rnd: int) -> float:
    """Wall seconds of the same forward/backward/optimizer passes as round ``rnd``'s local training, in a bare
    loop: batches prepared beforehand, no Trainer, no logging, no state copies."""
    device = torch.device("cuda" if torch.cuda.is_available() and sim.training.accelerator != "cpu" else "cpu")
    work = []
    for i in sim.sample(rnd):
        c = sim.clients[i]
        m = c.module
        enc = sim.features.encodings(m.modality, c.data.train, True) if sim.features and m.frozen_encoding() else None
        assert enc is not None, "the tight loop is defined for the cached (frozen-encoder) case"
        loader = encoded_loader(enc, c.data.train[LABEL], sim.training.batch_size, True, seed=rnd)
        batches = [{k: v.to(device) for k, v in b.items()} for b in loader]
        m.to(device)
        sim.backbone.to(device)
        opt = sim.training.optimizer([p for p in m.parts.parameters() if p.requires_grad])
        work.append((m, batches, opt))
    _sync()
    t0 = time.perf_counter()
    for m, batches, opt in work:
        for b in batches:
            loss = F.cross_entropy(m(None, b["encoded"]).float(), b[LABEL])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    _sync()
    return time.perf_counter() - t0


def efficiency_and_cache(s: Setting, repeats: int = 3) -> dict[str, float]:
    """Round efficiency (tight loop / round, steady state, cache on) and the cache's speed-up (round time
    without / with it), side by side in this process."""
    sim = build(s, "disk")
    timed_round(sim, 1)  # warm-up: fills the cache (or reads it from disk)
    rounds, tights = [], []
    for r in range(repeats):
        rounds.append(timed_round(sim, 2 + r))
        tights.append(tight_loop(sim, 2 + r))
    off = build(s, "off", backbone=sim.backbone)
    timed_round(off, 1)
    uncached = [timed_round(off, 2 + r) for r in range(repeats)]
    t_round, t_tight, t_off = min(rounds), min(tights), min(uncached)
    diff = max(float((sim.global_state[k] - off.global_state[k]).abs().max()) for k in sim.global_state)
    steps = sum(-(-len(sim.clients[i].data.train) // s.batch_size) for i in sim.sample(2))
    return {
        "round_s": t_round,
        "tight_loop_s": t_tight,
        "efficiency": t_tight / t_round,
        "round_uncached_s": t_off,
        "cache_speedup": t_off / t_round,
        "steps_per_round": steps,
        "cache_max_abs_diff": diff,  # the same rounds with and without the cache: how far apart they end
        "overhead_per_client_round_ms": 1000 * (t_round - t_tight) / len(sim.clients),
    }


def trainer_cost(n: int = 50) -> float:
    """Milliseconds to construct one quiet Lightning Trainer."""
    from mmfl.module import make_trainer

    with quiet_lightning():
        make_trainer(accelerator="cpu")
        t0 = time.perf_counter()
        for _ in range(n):
            make_trainer(accelerator="cpu")
    return 1000 * (time.perf_counter() - t0) / n


def payload_bytes(s: Setting, sim: Simulation | None = None) -> dict[str, int]:
    """Bytes a client sends and receives per round (its non-local trainable tensors, both ways) against a
    full-model FedAvg of the same backbone (all its tensors, both ways)."""
    sim = sim or build(s, "memory")
    c = sim.clients[0]
    mine = sum(t.numel() * t.element_size() for t in c.module.trainable_state_dict(include_local=False).values())
    full = sum(t.numel() * t.element_size() for t in sim.backbone.model.state_dict().values())
    return {"bytes_per_client_round": 2 * mine, "full_model_bytes": 2 * full}


def peak_rss_mib(s: Setting, clients: int) -> dict[str, float]:
    """Peak resident memory (MiB) of a fresh process that builds the setting with ``clients`` clients and runs
    one round (the feature cache is read from disk, so every size pays the same encoding cost), and its resident
    memory after the round (``rss_mib``)."""
    args = Setting(**{**s.__dict__, "clients": clients}).args()
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.perf", "--rss", *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """``--rss``: build, run one round, print the peak RSS (used by :func:`peak_rss_mib`)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rss", action="store_true")
    for k, v in Setting().__dict__.items():
        ap.add_argument(f"--{k}", type=type(v) if v is not None else str, default=v)
    a = ap.parse_args(argv)
    s = Setting(**{k: getattr(a, k) for k in Setting().__dict__})
    sim = build(s, "disk")
    timed_round(sim, 1)
    status = Path("/proc/self/status").read_text().splitlines()
    now = next(int(x.split()[1]) for x in status if x.startswith("VmRSS:")) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak, "rss_mib": now}))


if __name__ == "__main__":
    main()
