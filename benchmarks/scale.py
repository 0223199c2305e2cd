"""Scale: 10 to 10,000 simulated clients in one process, side by side (``python -m benchmarks.scale --out DIR``,
or ``python -m benchmarks.run --scale --out DIR``).

Each (part, clients) pair runs in a fresh process on one data set, whatever the client count: scikit-learn's digits
tiled to 8 training examples per client of the largest size, split IID over the clients; every sampled client
trains 2 steps of 4 examples. On mmfl-tiny (random weights; a ViT tower, so MaPLe couples its prompts), or
``--backbone ViT-B-16`` (random weights; the tower issue 22 sizes MaPLe by: 14 MB of prompts per client).
The fraction is ``max(0.01, sampled / clients)`` (all 10 clients at 10; 1% at 1,000 and 10,000, as issue 22 sets
it). A process reports:

    build_s:                 preparing the task (loading, checking, partitioning) and building the federation;
    client_round_s:          wall seconds of a training round (sample, fit the sampled clients, merge) per sampled
                             client, best of ``rounds`` rounds after a warm-up round; no evaluation;
    peak_rss_mib, rss_mib:   the process's peak resident memory, and its resident memory after the rounds.

``DIR/results.json`` holds every process's figures and, per part, ``rss_10000_over_10`` and
``client_round_10000_over_10`` (targets ≤ 1.2); ``--quick`` stops at 1,000 clients and runs fewer rounds.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch

from mmfl.data.sources import DataSource

log = logging.getLogger(__name__)

PARTS = {
    "coop": ("mmfl.prompts.CoOp", {"n_ctx": 4}),
    "maple": ("mmfl.prompts.MaPLe", {"depth": 2}),  # both of mmfl-tiny's blocks; context "a photo of a"
}


class TiledDigits(DataSource):
    """scikit-learn's digits repeated ``copies`` times (a data set big enough to give thousands of clients a few
    examples each; what is measured here is cost, not accuracy).

    Args:
        copies: how many times the 1,797 digits are repeated.
    """

    def __init__(self, copies: int = 1) -> None:
        super().__init__("image", "label")
        self.copies = copies

    def load(self) -> datasets.DatasetDict:
        """Both splits: the tiled digits, 10% held out."""
        from sklearn.datasets import load_digits

        from mmfl.data.bundled import DIGIT_NAMES, _image_dataset

        d = load_digits()
        images = np.tile((d.images * (255.0 / 16.0)).round().astype(np.uint8), (self.copies, 1, 1))  # [N, 8, 8]
        labels = np.tile(d.target, self.copies)
        parts = _image_dataset(images, labels, DIGIT_NAMES).train_test_split(test_size=0.1, seed=0)
        return datasets.DatasetDict(train=parts["train"], test=parts["test"])


def fraction(clients: int, sampled: int) -> float:
    """The share of clients trained per round: all of ``sampled`` clients or 1%, whichever is more."""
    return min(1.0, max(0.01, sampled / clients))


def copies_for(clients: int) -> int:
    """Copies of the digits that give ``clients`` clients 8 training examples each (a tenth is held out)."""
    return max(1, math.ceil(8 * clients / (0.9 * 1797)))


def measure(
    part: str,
    clients: int,
    sampled: int,
    rounds: int,
    copies: int,
    per_client: int = 0,
    backbone: str = "mmfl-tiny",
    accelerator: str = "cpu",
) -> dict[str, float]:
    """Build a federation of ``clients`` clients with one ``part`` on ``copies`` copies of the digits and time its
    training rounds (this process); ``per_client``: a module per client (the engine before pooling); ``backbone``:
    an open_clip model name (random weights unless it is mmfl-mini); ``accelerator``: Lightning's (``cuda`` on a
    GPU: ``peak_gpu_mib`` is then PyTorch's peak allocated GPU memory)."""
    from flwr_datasets.partitioner import IidPartitioner

    from mmfl.backbone import Backbone
    from mmfl.data import Task, prepare_task
    from mmfl.federated import Federation, LocalTraining, Simulation
    from mmfl.federated.settings import seed_all
    from mmfl.module import quiet_lightning

    seed_all(0)
    model = Backbone(backbone)
    class_path, kwargs = PARTS[part]
    module, name = class_path.rsplit(".", 1)
    factory = functools.partial(getattr(__import__(module, fromlist=[name]), name), **kwargs)
    t0 = time.perf_counter()
    task = Task(
        "digits",
        TiledDigits(copies),
        clients=clients,
        max_test_examples=50,
        partitioner=functools.partial(IidPartitioner),
    )
    prepared = prepare_task(task)
    training = LocalTraining(epochs=1, max_steps=2, batch_size=4, accelerator=accelerator, feature_cache="off")
    federation = Federation(rounds=rounds + 1, fraction=fraction(clients, sampled), eval_every=10**6)
    sim = Simulation(model, [prepared], [factory], training, federation, seed=0, per_client_modules=bool(per_client))
    build_s = time.perf_counter() - t0
    times = []
    with quiet_lightning():
        for rnd in range(1, rounds + 2):
            t = time.perf_counter()
            sim.run_round(rnd)
            times.append((time.perf_counter() - t) / len(sim.sample(rnd)))
    gpu = {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_initialized() else {}
    return {
        **gpu,
        "clients": clients,
        "train_examples": sum(len(c.train) for c in prepared.clients),
        "sampled_per_round": len(sim.sample(1)),
        "build_s": build_s,
        "client_round_s": min(times[1:]),  # after the warm-up round
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_mib": _rss_now_mib(),
    }


def _rss_now_mib() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(x.split()[1]) for x in status if x.startswith("VmRSS:")) / 1024


def in_fresh_process(
    part: str,
    clients: int,
    sampled: int,
    rounds: int,
    copies: int,
    per_client: bool = False,
    backbone: str = "mmfl-tiny",
    accelerator: str = "cpu",
) -> dict[str, float]:
    """:func:`measure` in a fresh Python process (so each peak RSS is its own)."""
    args = [part, str(clients), str(sampled), str(rounds), str(copies), str(int(per_client))]
    cmd = [sys.executable, "-m", "benchmarks.scale", "--backbone", backbone, "--accelerator", accelerator]
    cmd += ["--one", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    out: Path,
    parts: list[str],
    sizes: list[int],
    sampled: int,
    rounds: int,
    per_client: bool = False,
    backbone: str = "mmfl-tiny",
    accelerator: str = "cpu",
) -> dict:
    """Measure every (part, size), write ``out/results.json``, and return the results."""
    results: dict = {"sizes": sizes, "sampled": sampled, "rounds": rounds, "torch": torch.__version__, "parts": {}}
    results["per_client_modules"] = per_client
    results["backbone"] = backbone
    results["accelerator"] = accelerator
    for part in parts:
        rows = {}
        for n in sizes:
            copies = copies_for(max(sizes))
            rows[str(n)] = in_fresh_process(part, n, sampled, rounds, copies, per_client, backbone, accelerator)
            log.info("%s, %d clients: %s", part, n, rows[str(n)])
        small, big = rows[str(sizes[0])], rows[str(sizes[-1])]
        results["parts"][part] = {
            "runs": rows,
            f"rss_{sizes[-1]}_over_{sizes[0]}": big["peak_rss_mib"] / small["peak_rss_mib"],
            f"client_round_{sizes[-1]}_over_{sizes[0]}": big["client_round_s"] / small["client_round_s"],
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def table(results: dict) -> str:
    """The results as a Markdown table."""
    lines = ["| part | clients | sampled/round | build s | s per sampled client-round | peak RSS MiB | RSS after |"]
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for part, r in results["parts"].items():
        for n, row in r["runs"].items():
            lines.append(
                f"| {part} | {int(n):,} | {row['sampled_per_round']} | {row['build_s']:.1f} | "
                f"{row['client_round_s']:.3f} | {row['peak_rss_mib']:.0f} | {row['rss_mib']:.0f} |"
            )
        ratios = ", ".join(f"{k} = {v:.2f}" for k, v in r.items() if k != "runs")
        lines.append(f"| {part} | ratios | {ratios} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    """Command line: see the module's docstring."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--sizes", nargs="+", type=int, default=None, help="client counts (default 10 1000 10000)")
    ap.add_argument("--sampled", type=int, default=10, help="clients per round at the smallest size")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up round")
    ap.add_argument("--quick", action="store_true", help="10 and 10,000 clients, 2 timed rounds")
    ap.add_argument("--per-client-modules", action="store_true", help="a module per client (the former engine)")
    ap.add_argument("--backbone", default="mmfl-tiny", help="an open_clip model (random weights), e.g. ViT-B-16")
    ap.add_argument("--accelerator", default="cpu", help="Lightning's accelerator for the clients (cuda on a GPU)")
    one = ("PART", "CLIENTS", "SAMPLED", "ROUNDS", "COPIES", "PER_CLIENT")
    ap.add_argument("--one", nargs=6, metavar=one, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    datasets.disable_progress_bars()
    if a.one:
        logging.disable(logging.WARNING)
        part, *numbers = a.one
        row = measure(part, *map(int, numbers), backbone=a.backbone, accelerator=a.accelerator)
        sys.stdout.write(json.dumps(row) + "\n")
        return None
    sizes = a.sizes or ([10, 10000] if a.quick else [10, 1000, 10000])
    rounds = 2 if a.quick else a.rounds
    results = run(a.out, a.parts, sizes, a.sampled, rounds, a.per_client_modules, a.backbone, a.accelerator)
    log.info("%s\nwrote %s", table(results), a.out / "results.json")
    return results


if __name__ == "__main__":
    main()
