"""Fuzzing as a benchmark: mutated client replies, round checkpoints, command lines and recipes thrown at mmfl.

``python -m benchmarks.fuzz --n 10000 [--seed 0] [--json FILE]`` draws ``n`` inputs (by default half replies, 30%
checkpoints, 10% command lines, 10% recipes; ``--mix``), each a seeded random mutation of a valid input, and feeds
each to the code a user or a client reaches:

- **reply**: a client's reply (keys, shapes, dtypes, NaN/Inf values, example counts, wrong types) →
  ``validate_update``; an accepted one is merged with an honest one by FedAvg;
- **checkpoint**: a real round checkpoint with bytes flipped, cut short, or its JSON header or metadata edited →
  ``Simulation.resume`` (what ``mmfl fit --resume`` calls);
- **command**: an ``mmfl`` command line (fit, zeroshot, plot, flower-app, export, modalities, --resume) with tokens
  dropped, repeated, swapped or replaced by junk → ``mmfl.cli.main``;
- **recipe**: the tiny recipe with values replaced, deleted or added, or its YAML text damaged → ``mmfl fit``.

Every outcome is one of: **run** (accepted and completed), **clean error** (a refusal with one message: a string
from the validator, a ValueError/FileNotFoundError from resume, or exit 1/2 with ``error:`` and no traceback from
the command), **traceback** (anything else: an exception escaping, a ``Traceback`` in the output, exit 2 with no
message). A case running past ``--case_timeout`` seconds is stopped and counted as a ``timeouts`` (an endless
setting that was not refused). The JSON holds ``tried``, ``clean_errors``, ``runs``, ``tracebacks``, ``timeouts``,
the counts per kind, and the first inputs that gave a traceback or a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from benchmarks.fuzz_inputs import BASE_RECIPE, mutate_checkpoint, mutate_command, mutate_recipe, random_reply

log = logging.getLogger("benchmarks.fuzz")  # progress goes to the real stderr; the cases' output is captured
log.propagate = False
log.addHandler(logging.StreamHandler(sys.__stderr__))
log.setLevel(logging.INFO)

MIX = {"reply": 0.5, "checkpoint": 0.3, "command": 0.1, "recipe": 0.1}
OUTCOMES = ("runs", "clean_errors", "tracebacks", "timeouts")


class CaseTimeout(BaseException):
    """A case ran past its time (a BaseException: mmfl's own `except Exception` guards must not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`CaseTimeout` in the main thread after ``seconds``."""

    def fire(signum, frame):
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Console:
    """What a user would see: stderr and every log record, captured per case."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        handler = logging.StreamHandler(self.buffer)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root = logging.getLogger()
        self.saved = root.handlers
        root.handlers = [handler]  # mmfl's CLI keeps handlers it finds (logging.basicConfig does nothing then)

    def close(self) -> None:
        """Give the root logger its handlers back."""
        logging.getLogger().handlers = self.saved

    @contextlib.contextmanager
    def capture(self) -> Iterator[io.StringIO]:
        self.buffer.seek(0)
        self.buffer.truncate()
        with contextlib.redirect_stderr(self.buffer), contextlib.redirect_stdout(io.StringIO()):
            yield self.buffer


def judge_command(run: Callable[[], int | None], console: Console) -> tuple[str, str]:
    """Run one command line; (outcome, what was shown when it was not clean)."""
    with console.capture() as out:
        try:
            code = run()
        except SystemExit as e:  # the argument parser's report
            code = e.code
    text = out.getvalue()
    if "Traceback" in text:
        return "tracebacks", text[-1500:]
    if code in (0, None):
        return "runs", ""
    if code in (1, 2) and "error:" in text:
        return "clean_errors", ""
    return "tracebacks", f"exit {code} with no error message: {text[-800:]}"


class Fuzzer:
    """The inputs' fixtures (a tiny recipe, a finished run, its checkpoint, a federation to resume) and the cases."""

    def __init__(self, work: Path, seed: int) -> None:
        from mmfl import cli

        self.cli, self.work, self.seed = cli, work, seed
        self.console = Console()
        self.recipe = work / "recipe.yaml"
        self.recipe.write_text(yaml.safe_dump(BASE_RECIPE))
        self.run_dir = work / "finished"
        self.case = 0
        try:
            with self.console.capture() as out:
                code = cli.main(["fit", "-c", str(self.recipe), "--output_dir", str(self.run_dir)])
            if code != 0:
                raise RuntimeError(f"the base recipe did not run: {out.getvalue()[-2000:]}")
            self.checkpoint = (self.run_dir / "checkpoint.safetensors").read_bytes()
            self.sim = self._federation()
        except BaseException:
            self.console.close()
            raise

    def _federation(self):
        from mmfl.backbone import Backbone
        from mmfl.data.task import prepare_task
        from mmfl.federated.simulation import Simulation
        from mmfl.recipe import check_recipe, fit_parser

        parser = fit_parser()
        cfg = parser.parse_args(["-c", str(self.recipe)])
        init, tasks, federation = check_recipe(parser, cfg)
        prepared = [prepare_task(t, seed=cfg.seed) for t in tasks]
        backbone = Backbone(**cfg.backbone.as_dict())
        return Simulation(backbone, prepared, init.parts, init.training, federation, seed=cfg.seed)

    def folder(self) -> Path:
        self.case += 1
        return self.work / f"case{self.case}"

    def reply(self, rng: random.Random) -> tuple[str, str]:
        import torch

        from mmfl.federated import FedAvg, Update, aggregate
        from mmfl.federated.faults import validate_update

        spec = {"task/a/p": ((2, 3), torch.float32), "global/q": ((4,), torch.float32)}
        reply = random_reply(rng, spec)
        problem = validate_update(reply, spec)
        if problem is not None:
            return ("clean_errors", "") if isinstance(problem, str) and problem else ("tracebacks", repr(problem))
        honest = Update("h", {k: torch.zeros(s, dtype=d) for k, (s, d) in spec.items()}, 5)
        merged = aggregate([honest, reply], FedAvg())
        finite = all(bool(torch.isfinite(v).all()) for v in merged.values())
        return ("runs", "") if finite else ("tracebacks", "accepted a reply whose merge is not finite")

    def resume(self, rng: random.Random) -> tuple[str, str]:
        folder = self.folder()
        folder.mkdir()
        (folder / "checkpoint.safetensors").write_bytes(mutate_checkpoint(rng, self.checkpoint))
        try:
            self.sim.resume(folder)
        except (ValueError, FileNotFoundError) as e:
            return ("clean_errors", "") if str(e) else ("tracebacks", f"{type(e).__name__} with no message")
        return "runs", ""

    def command(self, rng: random.Random) -> tuple[str, str]:
        folder = self.folder()
        run_dir = shutil.copytree(self.run_dir, folder / "finished")  # a resumed or re-plotted run changes its folder
        argv = mutate_command(rng, self.recipe, run_dir, folder)
        return judge_command(lambda: self.cli.main(argv), self.console)

    def fit_recipe(self, rng: random.Random) -> tuple[str, str]:
        folder = self.folder()
        folder.mkdir()
        path = folder / "recipe.yaml"
        path.write_text(mutate_recipe(rng))
        argv = ["fit", "-c", str(path), "--output_dir", str(folder / "run")]
        return judge_command(lambda: self.cli.main(argv), self.console)


def main(argv: list[str] | None = None) -> dict:
    """Run the fuzzer and print (and optionally write) the counts."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="inputs to try")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", type=json.loads, default=MIX, help=f"share of each kind (JSON; default {MIX})")
    ap.add_argument("--case_timeout", type=float, default=120.0, help="seconds before a case counts as endless")
    ap.add_argument("--json", default=None, help="write the counts here")
    args = ap.parse_args(argv)
    if set(args.mix) - set(MIX) or not args.mix or min(args.mix.values()) < 0:
        ap.error(f"--mix takes shares for {sorted(MIX)}, got {args.mix}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = random.Random(args.seed)
    total = sum(args.mix.values())
    kinds = [k for k, share in args.mix.items() for _ in range(math.floor(args.n * share / total))]
    kinds += [max(args.mix, key=args.mix.get)] * (args.n - len(kinds))  # what rounding left, to the largest share
    rng.shuffle(kinds)
    counts: dict[str, Counter] = {k: Counter() for k in MIX}
    examples: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmfl-fuzz-") as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # commands that write relative paths (runs/...) write them here
        fuzzer = None
        try:
            fuzzer = Fuzzer(Path(tmp), args.seed)
            cases = {"reply": fuzzer.reply, "checkpoint": fuzzer.resume, "command": fuzzer.command}
            cases["recipe"] = fuzzer.fit_recipe
            for i, kind in enumerate(kinds):
                case_rng = random.Random(f"{args.seed}:{i}")
                try:
                    with time_limit(args.case_timeout):
                        outcome, shown = cases[kind](case_rng)
                except CaseTimeout:
                    outcome, shown = "timeouts", f"ran past {args.case_timeout:g} s"
                except Exception:  # an exception escaping the code under test
                    outcome, shown = "tracebacks", traceback.format_exc()[-1500:]
                counts[kind][outcome] += 1
                if outcome in ("tracebacks", "timeouts") and len(examples) < 20:
                    examples.append({"case": i, "kind": kind, "outcome": outcome, "shown": shown})
                if (i + 1) % max(1, args.n // 20) == 0:
                    done = {o: sum(c[o] for c in counts.values()) for o in OUTCOMES}
                    log.info("%d/%d cases (%.0f s): %s", i + 1, args.n, time.perf_counter() - started, done)
        finally:
            os.chdir(cwd)
            if fuzzer is not None:
                fuzzer.console.close()
    result = {"tried": args.n, **{o: sum(c[o] for c in counts.values()) for o in OUTCOMES}}
    result.update(
        seconds=round(time.perf_counter() - started, 1),
        per_kind={k: {o: c[o] for o in OUTCOMES} | {"tried": sum(c.values())} for k, c in counts.items()},
        examples=examples,
    )
    summary = {k: v for k, v in result.items() if k != "examples"}
    log.info("fuzz: %s", json.dumps(summary))
    for ex in examples[:5]:
        log.info("case %d (%s) → %s:\n%s", ex["case"], ex["kind"], ex["outcome"], ex["shown"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
