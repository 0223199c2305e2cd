"""Round checkpoints and exact resume.

After every round the server writes one safetensors file, atomically (temp file + rename), holding everything
the next round depends on: the merged trainable state, the server optimizer's state, every client's local
(personal) tensors, the best-so-far state of ``selection: best_val``, the running sums of ``selection: average``
(float64), the Python/NumPy/torch RNG states, the
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
from mmfl.federated.metrics import COLUMNS

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
    for c in sim.clients:  # an untouched client's local tensors are rebuilt as they were: only the others' are kept
        for k, v in (sim.local_state(c) if c.touched else {}).items():
            tensors[f"client{SEP}{c.data.cid}{SEP}{k}"] = v
    tensors.update({f"best{SEP}{k}": v for k, v in sim.best_state.items()})
    for cid, state in sim.best_local.items():
        tensors.update({f"best_client{SEP}{cid}{SEP}{k}": v for k, v in state.items()})
    tensors.update({f"avg{SEP}{k}": v for k, v in sim.avg_global.items()})
    for cid, state in sim.avg_local.items():
        tensors.update({f"avg_client{SEP}{cid}{SEP}{k}": v for k, v in state.items()})
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
        "best": json.dumps([sim.best_round, sim.best_score if sim.best_round is not None else None, sim.best_average]),
        "metrics": json.dumps(sim.metrics.rows),
        "clients": json.dumps([c.data.cid for c in sim.clients]),
        "average": json.dumps(sim.avg_count),
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
        parsed["average"] = json.loads(meta.get("average", "0"))  # checkpoints before selection: average have none
        return Checkpoint(int(meta["round"]), int(meta["seed"]), tensors, {**meta, **parsed})
    except (KeyError, ValueError) as e:
        raise ValueError(f"{str(path)!r}: damaged checkpoint metadata ({e})") from e


def completed_round(run_dir: str | Path) -> int | None:
    """The round of a run folder's checkpoint (None: it has none, or it cannot be read)."""
    try:
        return load_checkpoint(Path(run_dir) / CHECKPOINT).round
    except (OSError, ValueError):
        return None


def _is_row(r: object) -> bool:
    """A metrics row as :class:`~mmfl.federated.metrics.MetricsWriter` keeps it."""
    if not (isinstance(r, dict) and set(r) == set(COLUMNS)):
        return False
    ints = all(isinstance(r[k], int) and not isinstance(r[k], bool) for k in ("round", "examples"))
    floats = all(isinstance(r[k], int | float) and not isinstance(r[k], bool) for k in ("loss", "accuracy", "value"))
    return ints and floats and all(isinstance(r[k], str) for k in ("level", "task", "modality", "client", "split"))


def _is_rows(rows: object) -> bool:
    return isinstance(rows, list) and all(_is_row(r) for r in rows)


def _check_structure(ckpt: Checkpoint) -> None:
    """Every metadata entry and RNG tensor has the form :func:`save_checkpoint` writes (the file is input: it may
    have been damaged or edited); raises ValueError naming the first that does not."""
    meta, rng = ckpt.meta, ckpt.section("rng")
    extra = meta["rng"]
    problems = {
        "metrics": not _is_rows(meta["metrics"]),
        "clients": not (isinstance(meta["clients"], list) and all(isinstance(c, str) for c in meta["clients"])),
        "best": not (
            isinstance(meta["best"], list)
            and len(meta["best"]) in (2, 3)  # a third entry since selection: average (None: a round's state)
            and (len(meta["best"]) == 2 or meta["best"][2] is None or isinstance(meta["best"][2], str))
            and (meta["best"][0] is None or isinstance(meta["best"][0], int))
            and (meta["best"][1] is None or isinstance(meta["best"][1], int | float))
        ),
        "average": not (
            isinstance(meta["average"], int) and not isinstance(meta["average"], bool) and meta["average"] >= 0
        ),
        "rng": not (
            isinstance(extra, dict)
            and isinstance(extra.get("python"), list)
            and len(extra["python"]) == 2
            and isinstance(extra["python"][0], int)
            and isinstance(extra.get("numpy"), list)
            and len(extra["numpy"]) == 4
            and extra["numpy"][0] == "MT19937"
            and all(isinstance(v, int | float) for v in extra["numpy"][1:])
            and isinstance(extra["numpy"][1], int)
            and 0 <= extra["numpy"][1] <= 624
        ),
        "rng tensors": not (
            set(rng) == {"torch", "python", "numpy"}
            and rng["torch"].dtype == torch.uint8
            and rng["python"].shape == (625,)
            and rng["numpy"].shape == (624,)
            and bool(((rng["python"][:-1] >= 0) & (rng["python"][:-1] < 2**32)).all())
            and 0 <= int(rng["python"][-1]) <= 624
            and bool(((rng["numpy"] >= 0) & (rng["numpy"] < 2**32)).all())
        ),
    }
    bad = [name for name, wrong in problems.items() if wrong]
    if bad:
        raise ValueError(f"damaged checkpoint: its {bad[0]} entry is not what mmfl writes")


def restore(sim: Simulation, ckpt: Checkpoint) -> int:
    """Put ``sim`` back into the state it had after round ``ckpt.round``; returns that round. Everything is checked
    before anything of ``sim`` changes.

    Raises:
        ValueError: a damaged checkpoint, or one written by another recipe or seed (keys, shapes or clients differ).
    """
    _check_structure(ckpt)
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
    avg_count, avg_global, avg_local = ckpt.meta["average"], ckpt.section("avg"), ckpt.clients("avg_client")
    expected = max(0, ckpt.round - sim.avg_first + 1) if sim.averaging else 0
    if not expected:  # e.g. a run extended by more rounds: its window starts after this round, so it starts anew
        avg_count, avg_global, avg_local = 0, {}, {}
    elif avg_count != expected or set(avg_global) != set(sim.global_state):
        raise ValueError(
            f"it holds the average of {avg_count} round(s) up to round {ckpt.round}, but this run averages rounds "
            f"{sim.avg_first}–{sim.federation.rounds} "
            f"(evaluation.average_rounds: {sim.average_rounds or 'the last half'}), "
            f"{expected} of which have ended, and a sum cannot be split into rounds (their own states are not kept). "
            "Resume with the run's "
            f"federation.rounds, or with enough more rounds that the averaged ones start after round {ckpt.round}"
        )
    sim.federation.aggregator.load_state_dict(ckpt.section("aggregator"))  # raises before anything else changes
    try:
        set_rng_state(ckpt.section("rng"), ckpt.meta["rng"])
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise ValueError(f"damaged checkpoint: its RNG state cannot be restored ({type(e).__name__}: {e})") from e
    sim.global_state = dict(glob)
    local = ckpt.clients("client")
    for c in sim.clients:
        c.restore(glob, local.get(c.data.cid, {}))
    sim.best_state = ckpt.section("best")
    best_round, best_score, *average = ckpt.meta["best"]
    best_local = ckpt.clients("best_client")
    sim.best_local = {cid: best_local.get(cid, {}) for cid in cids} if best_round is not None else {}
    sim.best_round = best_round
    sim.best_average = average[0] if average else None
    sim.best_score = best_score if best_score is not None else float("-inf")
    sim.avg_count, sim.avg_global, sim.avg_local = avg_count, avg_global, avg_local
    sim.metrics.restore(ckpt.meta["metrics"])
    sim.completed = ckpt.round
    return ckpt.round
