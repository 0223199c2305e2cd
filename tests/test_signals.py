"""SIGTERM and SIGINT stop a run cleanly (exit 143 / 130, one line saying how to continue), at several phases, and
``--resume`` then ends with the tensors of an uninterrupted run; a second signal stops at once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmfl import cli
from mmfl.federated.resume import completed_round
from tests.test_resume import _env, _outputs, _same

BIN = Path(sys.executable).parent
RECIPE = """
seed: 0
backbone: {model_name: mmfl-tiny}
tasks:
  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 2, shots: 8, max_test_examples: 50}
parts:
  - {class_path: mmfl.prompts.CoOp, init_args: {n_ctx: 2}}
training: {max_steps: 40, batch_size: 4, accelerator: cpu, feature_cache: "off"}
federation: {rounds: 3}
"""
# a round 0 long enough to be interrupted in (1,000 animal silhouettes to score), then one short round
ROUND0 = """
seed: 0
backbone: {model_name: mmfl-tiny}
tasks:
  - {name: animals, data: {class_path: mmfl.data.AnimalSilhouettes}, clients: 2, shots: 4, max_test_examples: 1000}
parts:
  - {class_path: mmfl.prompts.CoOp, init_args: {n_ctx: 2}}
training: {max_steps: 2, batch_size: 4, accelerator: cpu, feature_cache: "off"}
federation: {rounds: 1}
"""


def _start(recipe: Path, out: Path, log: Path) -> subprocess.Popen:
    cmd = [str(BIN / "mmfl"), "fit", "-c", str(recipe), "--output_dir", str(out)]
    return subprocess.Popen(cmd, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@pytest.mark.parametrize("phase", ["round 0 evaluation", "a client's fit"])
def test_a_signal_stops_the_run_and_resume_ends_as_an_uninterrupted_run(tmp_path: Path, phase: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(ROUND0 if phase == "round 0 evaluation" else RECIPE)
    run, log = tmp_path / "run", tmp_path / "run.log"
    proc = _start(recipe, run, log)
    if phase == "round 0 evaluation":
        sig, status = signal.SIGINT, 130
        _wait_for(lambda: "writing to" in log.read_text(), proc, log)
    else:  # round 1 is complete: the clients are training round 2
        sig, status = signal.SIGTERM, 143
        _wait_for(lambda: completed_round(run) == 1, proc, log)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == status
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    done = completed_round(run)
    expected = "no round is complete yet" if done is None else f"the last complete round is {done}"
    assert last == (f"mmfl fit: interrupted by {sig.name}; {expected}: continue with `mmfl fit --resume {run}`"), text
    assert "Traceback" not in text and "Received SIGTERM" not in text
    if phase == "round 0 evaluation":
        assert done is None
    else:
        assert done in (1, 2)  # stopped inside round 2 (or, on a fast machine, round 3): never finished
    assert cli.main(["fit", "--resume", str(run)]) == 0
    assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(tmp_path / "ref")]) == 0
    _same(_outputs(tmp_path / "ref"), _outputs(run))


def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    script = (
        "import os, signal, time\n"
        "from mmfl.interrupt import Interrupted, stop_on_signals\n"
        "with stop_on_signals():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(5)\n"
        "    except Interrupted as e:\n"
        "        print('first:', e, e.status, flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGINT)  # while cleaning up\n"
        "        time.sleep(5)\n"
        "        print('not reached')\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 130  # the second signal's own status, at once
    assert p.stdout == "first: interrupted by SIGTERM 143\n"
    assert "SIGINT again: stopping at once" in p.stderr


HOLDS = '''
import os
import time
from pathlib import Path

from mmfl.data import SklearnDigits
from mmfl.federated import FedAvg
from mmfl.federated.aggregate import RunningMean


CALLS = {}


def hold(name):
    """From call number HOLD_<NAME>_FROM (0: the first) on, while HOLD_DIR/<name>.wait exists, say so (<name>.here)
    and wait: a phase that is running when stopped."""
    folder = Path(os.environ.get("HOLD_DIR", "/nonexistent"))
    calls = CALLS[name] = CALLS.get(name, -1) + 1
    if calls >= int(os.environ.get(f"HOLD_{name.upper()}_FROM", 0)) and (folder / f"{name}.wait").exists():
        (folder / f"{name}.here").touch()
        deadline = time.monotonic() + 120
        while (folder / f"{name}.wait").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class HeldDigits(SklearnDigits):
    def load(self):
        hold("data")
        return super().load()


class HeldMean(RunningMean):
    def result(self):  # the round's end: every reply is in
        hold("merge")
        return super().result()


class HeldFedAvg(FedAvg):
    def running(self, key):
        return HeldMean(key, self.weighted)
'''
HELD = (
    RECIPE.replace("mmfl.data.SklearnDigits", "holds.HeldDigits")
    .replace("max_steps: 40", "max_steps: 4")
    .replace("{rounds: 3}", "{rounds: 3, aggregator: {class_path: holds.HeldFedAvg}}")
)


def _held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of a run whose data preparation and merges wait while ``tmp_path/<phase>.wait`` exists."""
    (tmp_path / "holds.py").write_text(HOLDS)
    monkeypatch.syspath_prepend(str(tmp_path))  # the reference runs in this process
    return {**_env(), "PYTHONPATH": str(tmp_path), "HOLD_DIR": str(tmp_path)}


@pytest.mark.parametrize("phase", ["data", "merge"])
def test_a_signal_in_data_preparation_or_the_merge_leaves_the_last_round_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    env = {**_held(tmp_path, monkeypatch), "HOLD_MERGE_FROM": "1"}  # a CoOp context: one merge per round
    recipe, run, log = tmp_path / "recipe.yaml", tmp_path / "run", tmp_path / "run.log"
    recipe.write_text(HELD)
    wait = tmp_path / f"{phase}.wait"
    wait.touch()  # hold the data preparation, or round 2's merge
    cmd = [str(BIN / "mmfl"), "fit", "-c", str(recipe), "--output_dir", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    _wait_for((tmp_path / f"{phase}.here").exists, proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    wait.unlink()
    text = log.read_text()
    if phase == "data":  # before the run folder is written: nothing to resume, the same command again
        expected = "mmfl fit: interrupted by SIGTERM; nothing of it is complete: run the command again"
        assert text.strip().splitlines()[-1] == expected, text
        assert not run.exists()
        assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(run)]) == 0
    else:
        expected = "mmfl fit: interrupted by SIGTERM; the last complete round is 1: continue with `mmfl fit --resume"
        assert text.strip().splitlines()[-1] == f"{expected} {run}`", text
        assert completed_round(run) == 1 and not (run / "global.safetensors").exists()  # nothing looks finished
        assert cli.main(["fit", "--resume", str(run)]) == 0
    assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(tmp_path / "ref")]) == 0
    _same(_outputs(tmp_path / "ref"), _outputs(run))


def test_a_signal_between_the_seeds_of_mmfl_evaluate_leaves_no_report_and_a_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**_held(tmp_path, monkeypatch), "HOLD_DATA_FROM": "1"}  # seed 0's data passes, seed 1's is held
    recipe, out, log = tmp_path / "recipe.yaml", tmp_path / "eval", tmp_path / "eval.log"
    recipe.write_text(HELD.replace("federation: {rounds: 3", "evaluation: {seeds: [0, 1]}\nfederation: {rounds: 2"))
    cmd = [str(BIN / "mmfl"), "evaluate", "-c", str(recipe), "--output_dir", str(out)]
    (tmp_path / "data.wait").touch()
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    _wait_for((tmp_path / "data.here").exists, proc, log)
    assert (out / "seed_0" / "federated" / "metrics.csv").is_file()  # seed 0 was trained and scored
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    (tmp_path / "data.wait").unlink()
    text = log.read_text()
    last = "mmfl evaluate: interrupted by SIGINT; nothing of it is complete: run the command again"
    assert text.strip().splitlines()[-1] == last, text
    assert not any((out / f).exists() for f in ("report.md", "metrics.json", "config.yaml"))
    assert cli.main(["evaluate", "-c", str(recipe), "--output_dir", str(out)]) == 0  # the same command, again
    assert cli.main(["evaluate", "-c", str(recipe), "--output_dir", str(tmp_path / "ref")]) == 0
    again, ref = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "ref"))
    assert again["summary"] == ref["summary"]
