"""Round checkpoints and exact resume.

After every round the server writes one safetensors file, atomically (temp file + rename), holding everything
the next round depends on: the merged trainable state, the server optimizer's state, every client's local
(personal) tensors, the best-so-far state of ``selection: best_val``, the Python/NumPy/torch RNG states, the
round index and every metrics row so far. The client sampler is a pure function of (seed, round), so the
round index and seed are its state. ``mmfl fit -c RECIPE --resume RUN`` restores it and continues with the next
round; on CPU the resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from mmfl.federated.checkpoint import load_state, save_state

if TYPE_CHECKING:
    from mmfl.federated.simulation import Simulation

FORMAT = "mmfl-checkpoint/1"
CHECKPOINT = "checkpoint.safetensors"
SEP = "::"


@dataclass
class Checkpoint:
    """A round checkpoint, read back."""

    round: int
    seed: int
    tensors: dict[str, Tensor]
    meta: dict

    def section(self, name: str) -> dict[str, Tensor]:
        """The tensors stored under ``name::`` with that prefix removed."""
        p = f"{name}{SEP}"
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    def clients(self, name: str) -> dict[str, dict[str, Tensor]]:
        """Per-client tensors stored as ``name::<cid>::<key>``."""
        out: dict[str, dict[str, Tensor]] = {}
        for k, v in self.section(name).items():
            cid, key = k.split(SEP, 1)
            out.setdefault(cid, {})[key] = v
        return out


def rng_state() -> tuple[dict[str, Tensor], dict]:
    """The Python, NumPy and torch (CPU) RNG states as tensors plus JSON-able extras."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),  # [5056] uint8
        "python": torch.tensor(py_state, dtype=torch.int64),  # [625]
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # [624]
    }
    return tensors, {"python": [version, gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}


def set_rng_state(tensors: dict[str, Tensor], extra: dict) -> None:
    """Restore :func:`rng_state`."""
    version, gauss = extra["python"]
    random.setstate((version, tuple(int(x) for x in tensors["python"].tolist()), gauss))
    kind, pos, has_gauss, cached = extra["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])


def save_checkpoint(sim: Simulation, rnd: int) -> Path:
    """Write ``checkpoint.safetensors`` for the completed round ``rnd`` (atomically) and return its path."""
    assert sim.output_dir is not None
    tensors: dict[str, Tensor] = {f"global{SEP}{k}": v for k, v in sim.global_state.items()}
    for c in sim.clients:
        for k, v in sim.local_state(c).items():
            tensors[f"client{SEP}{c.data.cid}{SEP}{k}"] = v
    tensors.update({f"best{SEP}{k}": v for k, v in sim.best_state.items()})
    for cid, state in sim.best_local.items():
        tensors.update({f"best_client{SEP}{cid}{SEP}{k}": v for k, v in state.items()})
    tensors.update({f"aggregator{SEP}{k}": v for k, v in sim.federation.aggregator.state_dict().items()})
    rng, rng_extra = rng_state()
    tensors.update({f"rng{SEP}{k}": v for k, v in rng.items()})
    meta = {
        "format": FORMAT,
        "round": str(rnd),
        "rounds": str(sim.federation.rounds),
        "seed": str(sim.seed),
        "backbone": sim.backbone.model_name,
        "rng": json.dumps(rng_extra),
        "best": json.dumps([sim.best_round, sim.best_score if sim.best_round is not None else None]),
        "metrics": json.dumps(sim.metrics.rows),
        "clients": json.dumps([c.data.cid for c in sim.clients]),
    }
    path = sim.output_dir / CHECKPOINT
    save_state(path, tensors, meta)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint.

    Raises:
        FileNotFoundError: no such file. ValueError: truncated, corrupt, or not an mmfl checkpoint.
    """
    path = Path(path)
    tensors = load_state(path)  # clear errors for missing, truncated or corrupt files
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an mmfl round checkpoint (format {meta.get('format')!r})")
    try:
        parsed = {k: json.loads(meta[k]) for k in ("rng", "best", "metrics", "clients")}
        return Checkpoint(int(meta["round"]), int(meta["seed"]), tensors, {**meta, **parsed})
    except (KeyError, ValueError) as e:
        raise ValueError(f"{str(path)!r}: damaged checkpoint metadata ({e})") from e


def restore(sim: Simulation, ckpt: Checkpoint) -> int:
    """Put ``sim`` back into the state it had after round ``ckpt.round``; returns that round.

    Raises:
        ValueError: the checkpoint was written by another recipe or seed (keys, shapes or clients differ).
    """
    where = "the checkpoint was written by a different recipe"
    if ckpt.seed != sim.seed:
        raise ValueError(f"{where}: seed {ckpt.seed}, this run has --seed {sim.seed}")
    cids = [c.data.cid for c in sim.clients]
    if ckpt.meta["clients"] != cids:
        raise ValueError(f"{where}: its clients are {ckpt.meta['clients']}, this recipe's are {cids}")
    glob = ckpt.section("global")
    if set(glob) != set(sim.global_state):
        diff = sorted(set(glob) ^ set(sim.global_state))
        raise ValueError(f"{where}: trainable keys differ ({diff})")
    for k, v in glob.items():
        ref = sim.global_state[k]
        if v.shape != ref.shape or v.dtype != ref.dtype:
            raise ValueError(f"{where}: {k} is {tuple(v.shape)} {v.dtype}, expected {tuple(ref.shape)} {ref.dtype}")
    sim.global_state = dict(glob)
    local = ckpt.clients("client")
    for c in sim.clients:
        c.module.load_trainable_state_dict({**glob, **local.get(c.data.cid, {})})
    sim.best_state = ckpt.section("best")
    best_round, best_score = ckpt.meta["best"]
    best_local = ckpt.clients("best_client")
    sim.best_local = {cid: best_local.get(cid, {}) for cid in cids} if best_round is not None else {}
    sim.best_round = best_round
    sim.best_score = best_score if best_score is not None else float("-inf")
    sim.federation.aggregator.load_state_dict(ckpt.section("aggregator"))
    sim.metrics.restore(ckpt.meta["metrics"])
    set_rng_state(ckpt.section("rng"), ckpt.meta["rng"])
    sim.completed = ckpt.round
    return ckpt.round
