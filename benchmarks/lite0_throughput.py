"""Image features per second through mmfl-mini's vision tower (EfficientNet-Lite0) on this machine.

``python -m benchmarks.lite0_throughput`` prints images/s for each resolution and batch size, measured
side by side in one run, and the ratio to mmfl-mini's own setting (128 px, batch 32).
"""

from __future__ import annotations

import argparse
import time

import torch

from mmfl.backbone import Backbone


def throughput(backbone: Backbone, size: int, batch: int, n: int) -> float:
    """Images/s of ``encode_image`` on random inputs [n, 3, size, size] (after one warm-up batch)."""
    x = torch.randn(n, 3, size, size)
    with torch.no_grad():
        backbone.model.visual(x[:batch])
        t = time.perf_counter()
        for i in range(0, n, batch):
            backbone.model.visual(x[i : i + batch])
    return n / (time.perf_counter() - t)


def main() -> None:
    """Print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="images per measurement")
    args = parser.parse_args()
    backbone = Backbone("mmfl-mini")
    rows = [(s, b, throughput(backbone, s, b, args.n)) for s in (128, 224) for b in (32, 128)]
    base = next(r for s, b, r in rows if (s, b) == (128, 32))
    print(f"threads={torch.get_num_threads()}  images={args.n}")
    print(f"{'size':>5} {'batch':>6} {'img/s':>8} {'vs 128px/b32':>13}")
    for s, b, r in rows:
        print(f"{s:>5} {b:>6} {r:>8.1f} {r / base:>13.2f}")


if __name__ == "__main__":
    main()
