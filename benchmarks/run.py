"""mmfl's performance, in one table: ``python -m benchmarks.run --out DIR [--quick]`` (or ``make bench``).

Every figure is a ratio of two measurements taken side by side in this run (these machines are noisy):

    efficiency:              a tight loop of the round's own forward/backward/optimizer passes ÷ the round's wall
                             time (steady state, frozen-feature cache on; target ≥ 0.85);
    rss_100_over_1:          peak resident memory with 100 clients ÷ with 1 (a fresh process each; target ≤ 1.2);
    cache_speedup:           round time without the frozen-feature cache ÷ with it;
    flower_wall_ratio,       Flower's simulation engine ÷ mmfl's in-process engine on the same recipe, clients
    flower_rss_ratio:        and rounds (wall time; peak summed memory of every process of the run);
    bytes_per_client_round:  what one client sends + receives per round (its trainable tensors),
    full_model_bytes:        against a full-model FedAvg of the same backbone (all its tensors, both ways).

``DIR/results.json`` holds every figure, the raw times and the machine. ``--scale`` measures instead how the
in-process engine scales from 10 to 10,000 clients (:mod:`benchmarks.scale`: ``rss_10000_over_10`` and
``client_round_10000_over_10`` per part). ``--quick`` (under 10 minutes on 2
cores) uses fewer clients and repeats; ``--backbone`` picks another backbone (e.g. ``ViT-B-16`` with random
weights on a GPU); ``--no-flower`` skips the Flower comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import datasets
import torch

from benchmarks.perf import Setting, build, efficiency_and_cache, payload_bytes, peak_rss_mib, trainer_cost

log = logging.getLogger(__name__)

KEYS = (
    "efficiency",
    "rss_100_over_1",
    "cache_speedup",
    "flower_wall_ratio",
    "flower_rss_ratio",
    "bytes_per_client_round",
    "full_model_bytes",
)


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__}


def table(r: dict) -> str:
    """The results as a Markdown table."""
    s = r["setting"]
    rows = [
        (
            "efficiency (tight loop ÷ round)",
            f"{r['efficiency']:.2f}",
            f"{r['tight_loop_s']:.2f} s ÷ {r['round_s']:.2f} s",
        ),
        (
            "peak RSS, 100 ÷ 1 clients",
            f"{r['rss_100_over_1']:.2f}",
            " / ".join(f"{n}: {v:.0f} MiB" for n, v in r["peak_rss_mib"].items()),
        ),
        (
            "resident memory after the round, 100 ÷ 1",
            f"{r['end_rss_100_over_1']:.2f}",
            " / ".join(f"{n}: {v:.0f} MiB" for n, v in r["end_rss_mib"].items()),
        ),
        (
            "frozen-feature cache speed-up",
            f"{r['cache_speedup']:.1f}×",
            f"{r['round_uncached_s']:.2f} s ÷ {r['round_s']:.2f} s per round",
        ),
    ]
    if r.get("flower_wall_ratio") is not None:
        rows += [
            (
                "Flower simulation ÷ mmfl, wall time",
                f"{r['flower_wall_ratio']:.1f}×",
                f"{r['flower_wall_s']:.0f} s ÷ {r['mmfl_wall_s']:.0f} s",
            ),
            (
                "Flower simulation ÷ mmfl, peak memory",
                f"{r['flower_rss_ratio']:.1f}×",
                f"{r['flower_peak_rss_mib']:.0f} MiB ÷ {r['mmfl_peak_rss_mib']:.0f} MiB",
            ),
        ]
    rows += [
        (
            "bytes per client per round",
            f"{r['bytes_per_client_round']:,}",
            f"full-model FedAvg: {r['full_model_bytes']:,} ({r['full_model_bytes'] / r['bytes_per_client_round']:,.0f}"
            "×)",
        ),
        ("Trainer construction", f"{r['trainer_ms']:.1f} ms", "per client per round"),
        (
            "other overhead per client-round",
            f"{r['overhead_per_client_round_ms']:.0f} ms",
            "round − tight loop, per client",
        ),
    ]
    m = r["machine"]
    head = (
        f"{s['backbone']} ({s['pretrained'] or 'package/random weights'}), digits, {s['clients']} clients × "
        f"{s['shots']} shots/class, CoOp n_ctx={s['n_ctx']}, batch {s['batch_size']}, accelerator {s['accelerator']}; "
        f"{m['cpus']} CPUs, GPU: {m['gpu'] or 'none'}, torch {m['torch']}"
    )
    lines = [head, "", "| figure | value | measured |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Measure, print the table, write ``results.json``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for results.json")
    ap.add_argument("--quick", action="store_true", help="fewer clients and repeats (under 10 minutes on 2 cores)")
    ap.add_argument("--backbone", default="mmfl-mini")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--no-flower", dest="flower", action="store_false", help="skip the Flower comparison")
    ap.add_argument("--sizes", default="1,10,100", help="client counts of the memory figure")
    ap.add_argument("--scale", action="store_true", help="10 to 10,000 clients instead (benchmarks.scale)")
    args = ap.parse_args(argv)
    if args.scale:
        from benchmarks import scale

        return scale.main(["--out", args.out, *(["--quick"] if args.quick else [])])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mmfl").setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    s = Setting(
        backbone=args.backbone,
        pretrained=args.pretrained,
        accelerator=args.accelerator,
        clients=4 if args.quick else 10,
        shots=8,
    )
    r: dict = {"setting": dict(s.__dict__), "machine": machine(), "quick": args.quick}
    log.warning("efficiency and cache (%s, %d clients)", s.backbone, s.clients)
    r.update(efficiency_and_cache(s, repeats=2 if args.quick else 5))
    r["trainer_ms"] = trainer_cost()
    r.update(payload_bytes(s, build(s, "memory")))
    sizes = [int(x) for x in args.sizes.split(",")]
    mem = Setting(**{**s.__dict__, "shots": 1})  # the same data per client whatever their number
    r["peak_rss_mib"], r["end_rss_mib"] = {}, {}
    for n in sizes:
        log.warning("peak memory with %d clients", n)
        m = peak_rss_mib(mem, n)
        r["peak_rss_mib"][str(n)], r["end_rss_mib"][str(n)] = m["peak_rss_mib"], m["rss_mib"]
    r["rss_100_over_1"] = r["peak_rss_mib"][str(sizes[-1])] / r["peak_rss_mib"][str(sizes[0])]
    r["end_rss_100_over_1"] = r["end_rss_mib"][str(sizes[-1])] / r["end_rss_mib"][str(sizes[0])]
    if args.flower:
        from benchmarks.flower_compare import compare

        log.warning("Flower simulation engine vs in-process (%d clients, 2 rounds)", s.clients)
        r.update(compare(s, rounds=2))
    else:
        r.update({"flower_wall_ratio": None, "flower_rss_ratio": None})
    r["seconds"] = time.perf_counter() - t0
    print(table(r))  # the benchmark's output
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=1))
    missing = [k for k in KEYS if k not in r]
    assert not missing, missing
    return r


if __name__ == "__main__":
    main()
