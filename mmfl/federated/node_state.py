"""A Flower node's ``local`` tensors on its own disk, per round, so that a resumed Flower run continues them exactly.

Within one Flower run a node keeps its client's local tensors in ``context.state``; a new run (the same app
resumed with ``resume=true``) starts with an empty state. So after every round it trains, the node also writes
them to ``<state-dir>/<run id>/<client>/round-<r>.safetensors`` (``state-dir``: node config, default
``$MMFL_CACHE/flower-state``; run id: a digest of the app's recipe, overrides and output folder, which a resumed
run shares). A node that has nothing in ``context.state`` loads the latest file of a round ≤ the round the server
resumed after (the server says which; 0 for a new run, so stale files are never read). The two latest files
are kept.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from torch import Tensor

from mmfl.federated.checkpoint import load_state, save_state

KEEP = 2
_ROUND = re.compile(r"round-(\d+)\.safetensors$")


def state_folder(run_config: dict, node_config: dict, cid: str) -> Path:
    """Where a node keeps one client's local tensors for the run that ``run_config`` describes."""
    from mmfl.backbones import cache_dir

    root = Path(str(node_config.get("state-dir") or cache_dir() / "flower-state"))
    ident = "\n".join(str(run_config.get(k, "")) for k in ("recipe-yaml", "overrides", "output-dir"))
    run = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return root / run / cid.replace("/", "__")


def save_local(folder: Path, rnd: int, state: dict[str, Tensor]) -> None:
    """Write the local tensors after round ``rnd`` (atomically) and drop all but the :data:`KEEP` latest."""
    folder.mkdir(parents=True, exist_ok=True)
    save_state(folder / f"round-{rnd}.safetensors", state, {"round": str(rnd)})
    for old in sorted(_rounds(folder))[:-KEEP]:
        (folder / f"round-{old}.safetensors").unlink(missing_ok=True)


def load_local(folder: Path, upto: int) -> dict[str, Tensor] | None:
    """The local tensors of the latest round ≤ ``upto`` written in ``folder`` (None: there is none)."""
    rounds = [r for r in _rounds(folder) if r <= upto]
    return load_state(folder / f"round-{max(rounds)}.safetensors") if rounds else None


def latest_round(folder: Path) -> int | None:
    """The latest round whose local tensors are written in ``folder`` (None: none is)."""
    rounds = _rounds(folder)
    return max(rounds) if rounds else None


def _rounds(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return [int(m.group(1)) for f in folder.iterdir() if (m := _ROUND.search(f.name))]
