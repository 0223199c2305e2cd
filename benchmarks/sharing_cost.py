"""What a way of sharing costs: bytes each client sends per round and the server's time per round, against plain
merging, side by side in one run.

``python -m benchmarks.sharing_cost [--scenario multimodal] [--repeats 30]`` builds the scenario's federation once
per setting of :mod:`benchmarks.collaboration` (no training: the clients' replies are the initial tensors plus
small random changes, the same for every setting), then times the server's round (``Simulation.merge``: merging per
group, mixing, the server step; for ``own val`` also the scoring of each share on the validation splits) in
interleaved repeats and keeps the best of each. Bytes are one direction, fp32,
the mean over clients.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from benchmarks.collaboration import SCENARIOS, SETTINGS, build_backbone, configure
from mmfl.data import prepare_task
from mmfl.federated import Simulation, Update
from mmfl.recipe import fit_parser

log = logging.getLogger(__name__)


def build(recipe: str, setting: str, backbone, val_fraction: float = 0.2) -> tuple[Simulation, list[Update]]:
    """The scenario's federation under ``setting`` and one reply per client (its tensors + N(0, 0.01) noise);
    ``val_fraction`` of each task's training data is held out as the validation data ``own val`` chooses on."""
    parser = fit_parser()
    cfg = parser.parse_args(["-c", str(recipe)])
    configure(cfg, setting)
    init = parser.instantiate(cfg)
    tasks = [prepare_task(t, seed=cfg.seed, val_fraction=val_fraction) for t in init.tasks]
    sim = Simulation(backbone, tasks, init.parts, init.training, init.federation)
    g = torch.Generator().manual_seed(0)
    updates = []
    for c in sim.clients:
        state = c.module.trainable_state_dict(include_local=False)
        noisy = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        updates.append(Update(c.data.cid, noisy, len(c.data.train)))
    return sim, updates


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Time every setting's server round and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="multimodal")
    ap.add_argument("-c", "--recipe", default=None, help="another recipe instead of the scenario's")
    ap.add_argument("--settings", nargs="+", default=[s for s in SETTINGS if s != "recipe"], choices=list(SETTINGS))
    ap.add_argument("--reference", default="task", choices=list(SETTINGS), help="the plain merging to compare with")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--val-fraction", type=float, default=0.2, help="validation data held out (own val chooses on it)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    recipe = args.recipe or SCENARIOS[args.scenario]
    backbone = build_backbone(recipe, [])
    names = list(dict.fromkeys([args.reference, *args.settings]))
    built = {name: build(recipe, name, backbone, args.val_fraction) for name in names}
    best = dict.fromkeys(names, float("inf"))
    for _ in range(args.repeats):
        for name in names:
            sim, updates = built[name]
            t0 = time.perf_counter()
            sim.merge(1, updates, len(updates))
            best[name] = min(best[name], time.perf_counter() - t0)
    out = {}
    for name in names:
        sim, updates = built[name]
        sent = statistics.mean(sum(t.numel() * t.element_size() for t in u.state.values()) for u in updates)
        out[name] = {"bytes_per_client_round": sent, "server_ms_per_round": 1000 * best[name]}
    ref = out[args.reference]
    lines = [
        f"| setting | bytes sent per client-round | ÷ {args.reference} | server ms per round | ÷ {args.reference} |",
        "|---|---|---|---|---|",
    ]
    for name, r in out.items():
        nbytes, ms = r["bytes_per_client_round"], r["server_ms_per_round"]
        ratio_b, ratio_t = nbytes / ref["bytes_per_client_round"], ms / ref["server_ms_per_round"]
        lines.append(f"| {name} | {nbytes:,.0f} | {ratio_b:.2f} | {ms:.2f} | {ratio_t:.2f} |")
    print("\n".join(lines))  # the benchmark's output
    return out


if __name__ == "__main__":
    main()
