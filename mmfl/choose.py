"""``mmfl choose RUN RUN [...] --output DIR``: sharing chosen per (task, modality) from whole runs.

Which scope pays for a group is often clear only once a run is over: sharing the audio projection across tasks
steadies a 2-shot audio client's projection over the rounds, which no single round's validation score shows
(``own=val`` chooses round by round and misses it), while the same sharing costs a 16-shot group 10 points. So train
the federation once per candidate sharing — the same recipe, seed and clients, only the parts' scopes differ, on
either engine — and let each (task, modality) group keep the run whose state scores highest on the group's
validation split (``evaluation.val_fraction``; the test split plays no part). Measured with
``benchmarks.collaboration --choose`` (docs/measurements.md): two 2-shot audio clients gain +7.5 ± 9.2 and
+8.4 ± 10.3 points over training alone on 20 seeds, the 16-shot groups keep their own merge.

The choice reads what the runs wrote: ``config.yaml`` (the seed and the selection rule), ``metrics.csv`` (the
groups, their clients, and the server's validation and test scores of each group: rows of level ``task``, or
``average`` for an averaged state, at the round the state was kept) and the state the run's
``evaluation.selection`` keeps (``--state`` picks another). It writes ``DIR/choice.json`` (per
group: the run kept, every run's validation and test accuracy) and ``DIR/<task>/<modality>.safetensors``: the kept
run's merged tensors of the scopes the group belongs to (``global``, its task's, its modality's, its own), which
the group's clients load. Their ``local`` tensors stay in the kept run's folder (``local/``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors import safe_open
from torch import Tensor

from mmfl.export import STATES
from mmfl.federated.checkpoint import load_state, save_state

log = logging.getLogger(__name__)

SELECTION_STATE = {"last": "last", "best_val": "best", "average": "average"}
"""The state a run's ``evaluation.selection`` keeps, as a ``--state`` name."""


class ChooseError(ValueError):
    """The runs cannot be compared (not finished, different federations, no validation data)."""


@dataclass(frozen=True)
class RunScores:
    """What one run's kept state scores, per group (``task/modality``).

    Attributes:
        run: the run folder.
        state: the state file compared (``global.safetensors``, ``best.safetensors`` or ``average.safetensors``).
        val: validation accuracy per group.
        test: test accuracy per group.
    """

    run: Path
    state: str
    val: dict[str, float]
    test: dict[str, float]


def _config(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.is_file():
        raise ChooseError(f"{str(run)!r} is not a run folder of `mmfl fit` (it has no config.yaml)")
    return yaml.safe_load(path.read_text()) or {}


def _rows(run: Path) -> list[dict[str, str]]:
    path = run / "metrics.csv"
    if not path.is_file():
        raise ChooseError(f"{str(run)!r} has no metrics.csv: give run folders written by `mmfl fit`")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def groups_of(rows: list[dict[str, str]]) -> dict[str, int]:
    """The (task, modality) groups a run's ``metrics.csv`` rows score, ``task/modality``, with the number of their
    clients that trained (at least 1)."""
    groups = {f"{r['task']}/{r['modality']}" for r in rows if r["level"] == "task"}
    clients = {g: set() for g in groups}
    for r in rows:
        g = f"{r['task']}/{r['modality']}"
        if r["level"] == "client" and r["split"] == "fit" and g in clients:
            clients[g].add(r["client"])
    return {g: max(1, len(clients[g])) for g in sorted(groups)}


def _state_round(path: Path) -> tuple[int, bool]:
    """(the round a state file was written after, whether it is an average of rounds) from its metadata."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "round" in meta:
        return int(meta["round"]), bool(meta.get("average_of_rounds"))
    return int(meta["rounds"].split("-")[-1]), True  # average.safetensors: "first-last"


def run_scores(run: str | Path, state: str = "selected") -> RunScores:
    """Read a finished run's validation and test accuracy per group for one of its states.

    Args:
        run: a run folder of ``mmfl fit`` (either engine).
        state: ``selected`` (what the run's ``evaluation.selection`` keeps), ``last``, ``best`` or ``average``.

    Raises:
        ChooseError: not a run folder, not finished, no such state, or a group without validation scores.
    """
    run = Path(run)
    config = _config(run)
    if state == "selected":
        state = SELECTION_STATE.get((config.get("evaluation") or {}).get("selection") or "last", "last")
    if state not in STATES:
        raise ChooseError(f"--state {state!r}: give selected, {', '.join(STATES)}")
    if not (run / STATES["last"]).is_file():  # written when the last round ends
        raise ChooseError(f"{str(run)!r} has not finished: finish it (`mmfl fit --resume {run}`), then choose")
    path = run / STATES[state]
    if not path.is_file():
        raise ChooseError(
            f"{str(run)!r} has no {STATES[state]}: its evaluation.selection does not keep that state; give another "
            "--state (last, best, average)"
        )
    rnd, averaged = _state_round(path)
    level = "average" if averaged else "task"
    val: dict[str, float] = {}
    test: dict[str, float] = {}
    rows = _rows(run)
    for row in rows:
        if row["level"] == level and int(row["round"]) == rnd and row["split"] in ("val", "test"):
            g = f"{row['task']}/{row['modality']}"
            (val if row["split"] == "val" else test)[g] = float(row["accuracy"])
    bare = sorted(set(groups_of(rows)) - set(val))
    if bare:
        raise ChooseError(
            f"{str(run)!r} has no validation scores for {', '.join(bare)}: the choice is made on validation data "
            "only; run the recipes with evaluation.val_fraction (e.g. 0.2)"
        )
    return RunScores(run, STATES[state], val, test)


def check_same_federation(runs: list[Path]) -> dict[str, int]:
    """Raise unless every run trained the same groups on the same seed; return the groups and their clients."""
    configs = [_config(r) for r in runs]
    groups = [groups_of(_rows(r)) for r in runs]
    for run, config, mine in zip(runs[1:], configs[1:], groups[1:], strict=True):
        if sorted(mine) != sorted(groups[0]):
            raise ChooseError(
                f"{str(run)!r} scored the groups {sorted(mine)}, {str(runs[0])!r} {sorted(groups[0])}: compare "
                "runs of one recipe that differ only in the parts' scopes"
            )
        if config.get("seed") != configs[0].get("seed"):
            raise ChooseError(
                f"{str(run)!r} ran with seed {config.get('seed')}, {str(runs[0])!r} with {configs[0].get('seed')}: "
                "compare runs of one seed (the same clients and data), then repeat per seed"
            )
    return groups[0]


def choose(scores: list[RunScores]) -> dict[str, int]:
    """Per group, the index of the run whose state scores highest on its validation split (ties: the first)."""
    groups = scores[0].val
    return {g: max(range(len(scores)), key=lambda i: (scores[i].val[g], -i)) for g in groups}


def group_state(state: dict[str, Tensor], task: str, modality: str) -> dict[str, Tensor]:
    """The tensors of ``state`` a client of (task, modality) may hold: those of ``global`` and of its task's,
    modality's and (task, modality)'s scope groups."""
    prefixes = ("global/", f"task/{task}/", f"modality/{modality}/", f"task_modality/{task}/{modality}/")
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def run_choose(runs: list[str], output: str, state: str = "selected", overwrite: bool = False) -> dict:
    """``mmfl choose``: check the runs, choose per group, write ``choice.json`` and each group's tensors, and log
    the table. Returns what ``choice.json`` holds."""
    paths = [Path(r) for r in runs]
    if len(paths) < 2:
        raise ChooseError("give at least two run folders to choose between")
    if len(set(p.resolve() for p in paths)) < len(paths):
        raise ChooseError("a run folder is given twice")
    out = Path(output)
    if out.resolve() in {p.resolve() for p in paths}:
        raise ChooseError(f"--output {output!r} is one of the runs; give a new folder")
    if out.exists() and not out.is_dir():
        raise ChooseError(f"--output {output!r} exists and is not a folder")
    if (out / "choice.json").exists() and not overwrite:
        raise ChooseError(f"--output {output!r} already holds a choice; give another folder, or --overwrite")
    clients = check_same_federation(paths)
    scores = [run_scores(p, state) for p in paths]  # every check before anything is written
    picked = choose(scores)
    result = {"runs": [str(p) for p in paths], "groups": {}}
    states = {i: load_state(s.run / s.state) for i, s in enumerate(scores) if i in picked.values()}
    for g, i in picked.items():
        task, modality = g.split("/")
        s = scores[i]
        result["groups"][g] = {
            "run": str(s.run),
            "state": s.state,
            "clients": clients[g],
            "val": [r.val[g] for r in scores],
            "test": [r.test.get(g, math.nan) for r in scores],
        }
        meta = {"run": str(s.run), "state": s.state, "val_accuracy": f"{s.val[g]:.6f}"}
        save_state(out / task / f"{modality}.safetensors", group_state(states[i], task, modality), meta)
    (out / "choice.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("kept per (task, modality), on validation data:\n%s", choice_table(result))
    log.info("wrote %s and one state per group (%s/<task>/<modality>.safetensors)", out / "choice.json", out)
    return result


def choice_table(result: dict) -> str:
    """A Markdown table of a choice: per group, every run's validation / test accuracy and the run kept; the mean
    over clients of each run and of the choice."""
    runs = result["runs"]
    head = "| task / modality | " + " | ".join(f"run {i + 1}: val / test" for i in range(len(runs))) + " | kept |"
    lines = [head, "|" + "---|" * (len(runs) + 2)]
    for g, r in result["groups"].items():
        cells = [f"{100 * v:.1f} / {100 * t:.1f}" for v, t in zip(r["val"], r["test"], strict=True)]
        lines.append(f"| {g} | " + " | ".join(cells) + f" | run {runs.index(r['run']) + 1} |")
    n = sum(r["clients"] for r in result["groups"].values())

    def mean(pick) -> float:
        return sum(r["clients"] * pick(r) for r in result["groups"].values()) / n

    test = [mean(lambda r, i=i: r["test"][i]) for i in range(len(runs))]
    kept = mean(lambda r: r["test"][runs.index(r["run"])])
    lines.append("| test, mean over clients | " + " | ".join(f"{100 * t:.1f}" for t in test) + f" | {100 * kept:.1f} |")
    lines += [f"run {i + 1}: {r}" for i, r in enumerate(runs)]
    return "\n".join(lines)


def choose_parser():
    """Arguments of ``mmfl choose``."""
    from jsonargparse import ActionYesNo

    from mmfl.recipe import Parser

    p = Parser(
        description="Keep, per (task, modality), the run whose state scores highest on the group's validation "
        "split: runs of one recipe and seed that differ only in the parts' scopes (how the tensors are shared).",
        allow_abbrev=False,
    )
    p.add_argument(
        "runs", type=str, nargs="+", help="two or more run folders written by `mmfl fit` or a Flower ServerApp"
    )
    p.add_argument("--output", type=str, required=True, help="the folder to write choice.json and the states to")
    p.add_argument(
        "--state",
        type=str,
        default="selected",
        help="which state of each run: selected (what its evaluation.selection keeps), last, best or average",
    )
    p.add_argument("--overwrite", action=ActionYesNo, default=False, help="replace an earlier choice in --output")
    return p
