"""Flower runs that stop, resume and retry: a run stopped mid-way (`flwr stop`, then
SIGKILL to the SuperLink and the nodes) continues from its round checkpoint to the tensors of an uninterrupted
run; a node that fails is sent its message again; an app stopped inside a Flower process says how to continue."""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmfl import cli

pytest.importorskip("flwr", reason="the Flower engine needs flwr: pip install 'mmfl[flower]'")

from flower_procs import BIN, RECIPE, Processes, flwr, in_process, local_engine, status

from mmfl.federated.averaging import AVERAGE
from mmfl.federated.node_state import load_local, state_folder
from mmfl.federated.resume import CHECKPOINT, load_checkpoint


def _fits(out: Path) -> list[tuple[str, str]]:
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    return sorted((r[0], r[4]) for r in rows if r[5] == "fit")


SLOW = '''
import time
from pathlib import Path

from mmfl.prompts import CoOp


class SlowCoOp(CoOp):
    """CoOp whose training steps wait while the marker file exists (a round that is still running when stopped)."""

    def __init__(self, backbone, class_names, marker: str = "", **kwargs):
        super().__init__(backbone, class_names, **kwargs)
        self.marker = marker

    def regularization(self):
        deadline = time.monotonic() + 120
        while self.marker and Path(self.marker).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().regularization()
'''


@pytest.mark.slow
def test_a_stopped_flower_run_resumes_to_the_uninterrupted_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = local_engine(tmp_path, nodes=2)
    (tmp_path / "slow.py").write_text(SLOW)
    env["PYTHONPATH"] = str(tmp_path)  # the apps import the recipe's part from there; so does this process
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "hold"  # made once round 1 is complete: round 2 is then still training when stopped
    out = tmp_path / "flower-run"
    recipe = tmp_path / "recipe.yaml"  # a context each node keeps to itself, and an adapter per task, merged
    recipe.write_text(
        RECIPE.replace("CLIENTS", "1")
        .replace("ROUNDS", "5")
        .replace("mmfl.prompts.CoOp", "slow.SlowCoOp")
        .replace("scope: global+task", f"scope: local, marker: {marker}")
        .replace('"mix(task, global, own=0.5)"', "task")
        .replace("max_steps: 2", "max_steps: 4")
        + "evaluation: {selection: average}\n"  # and the merged tensors of rounds 3–5 averaged
    )
    app = str(tmp_path / "app")
    assert cli.main(["flower-app", "-c", str(recipe), "--app_dir", app, "--output_dir", str(out)]) == 0
    procs = Processes(env, tmp_path)
    try:
        run = subprocess.Popen(
            [str(BIN / "flwr"), "run", app, "local", "--stream"],
            env=env,
            cwd=env["FLWR_HOME"],
            stdout=(tmp_path / "run1.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        procs.procs.append(run)
        deadline = time.monotonic() + 300
        while not ((out / CHECKPOINT).is_file() and load_checkpoint(out / CHECKPOINT).round >= 1):
            assert time.monotonic() < deadline, "round 1 did not finish"
            assert run.poll() is None, (tmp_path / "run1.log").read_text()
            time.sleep(0.02)
        marker.touch()
        (run_id,) = [r["run-id"] for r in json.loads(flwr(env, "ls", "local", "--format", "json").stdout)["runs"]]
        stopped = flwr(env, "stop", run_id, "local")  # as a user stops a run: Flower stops it, mmfl says how to go on
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert run.wait(timeout=120) == 0  # `flwr run --stream` ends with the run (its exit status is Flower's)
        assert status(env, "local") == ["finished:stopped"]
        assert load_checkpoint(out / CHECKPOINT).round == 1  # round 2 was still training: not committed
        assert "Traceback" not in (tmp_path / "run1.log").read_text()
        procs.stop_all()  # the SuperLink and the ClientApps, killed at once
        marker.unlink()
        done = flwr(env, "run", app, "local", "--run-config", "resume=true", "--stream")
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        procs.stop_all()
    assert load_checkpoint(out / CHECKPOINT).round == 5
    clients = ["animals/image/0", "digits/image/0"]
    assert _fits(out) == [(str(r), c) for r in range(1, 6) for c in clients]  # every round once, none twice
    flower, local = load_file(out / "global.safetensors"), in_process(recipe, tmp_path / "in-process")
    assert flower.keys() == local.keys()
    for k in flower:  # the merged contexts trained beside each node's own adapter: equal only if it was continued
        assert (flower[k] - local[k]).abs().max() < 1e-5, k
    flower, local = load_file(out / AVERAGE), load_file(tmp_path / "in-process" / AVERAGE)
    assert flower.keys() == local.keys() and flower.keys()
    for k in flower:
        assert (flower[k] - local[k]).abs().max() < 1e-5, k
    run_config = tomllib.loads((Path(app) / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for cid in clients:  # and the adapters the nodes kept equal the in-process clients' own
        node = load_local(state_folder(run_config, {}, cid), 5)
        own = load_file(tmp_path / "in-process" / "local" / f"{cid}.safetensors")
        assert node is not None and node.keys() == own.keys() and any(k.startswith("local/") for k in node)
        for k in node:
            assert (node[k] - own[k]).abs().max() < 1e-5, k


FLAKY = '''
from pathlib import Path

from mmfl.prompts import CoOp


class FlakyCoOp(CoOp):
    """CoOp whose training fails once, in whichever process first finds the marker file (it removes it)."""

    def __init__(self, backbone, class_names, marker: str = "", **kwargs):
        super().__init__(backbone, class_names, **kwargs)
        self.marker = marker

    def regularization(self):
        marker = Path(self.marker)
        if self.marker and marker.exists():
            marker.unlink()
            raise RuntimeError("flaky: failed once")
        return super().regularization()
'''


@pytest.mark.slow
def test_a_failed_node_is_retried_per_federation_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = local_engine(tmp_path, nodes=2)
    (tmp_path / "flaky.py").write_text(FLAKY)
    env["PYTHONPATH"] = str(tmp_path)  # the apps import the recipe's part from there; so does this process
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "fail-once"
    marker.touch()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "backbone: {model_name: mmfl-tiny}\ntasks:\n"
        "  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, shots: 4, max_test_examples: 30}\n"
        "  - {name: animals, data: {class_path: mmfl.data.AnimalSilhouettes}, shots: 4, max_test_examples: 30}\n"
        f"parts:\n  - {{class_path: flaky.FlakyCoOp, init_args: {{n_ctx: 2, scope: task, marker: {marker}}}}}\n"
        "training: {accelerator: cpu, max_steps: 2}\nfederation: {rounds: 1, min_clients: 2, retries: 1}\n"
    )
    out = tmp_path / "flower-run"
    app = tmp_path / "app"
    assert cli.main(["flower-app", "-c", str(recipe), "--app_dir", str(app), "--output_dir", str(out)]) == 0
    procs = Processes(env, tmp_path)
    try:
        done = flwr(env, "run", str(app), "local", "--stream")
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        procs.stop_all()
    assert not marker.exists()  # one node failed once ...
    assert _fits(out) == [("1", "animals/image/0"), ("1", "digits/image/0")]  # ... and its retry counted
    assert "fit_failed" not in (out / "metrics.csv").read_text()
    flower = load_file(out / "global.safetensors")
    local = in_process(recipe, tmp_path / "in-process")  # the marker is gone: nothing fails here
    for k in flower:
        assert (flower[k] - local[k]).abs().max() < 1e-5, k


def test_resume_refuses_what_it_cannot_continue_exactly(tmp_path: Path) -> None:
    from mmfl.federated.flower_strategy import check_output

    with pytest.raises(ValueError, match="resume=true needs the app's output-dir"):
        check_output(None, resume=True)
    check_output(tmp_path, resume=False)  # an empty folder: a new run may start
    (tmp_path / CHECKPOINT).write_bytes(b"a run's state")
    with pytest.raises(ValueError, match=r"already holds a run .* --run-config resume=true"):
        check_output(tmp_path, resume=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == b"a run's state"


def test_a_node_keeps_its_local_tensors_per_round_and_reads_none_newer_than_asked(tmp_path: Path) -> None:
    import torch

    from mmfl.federated.node_state import load_local, save_local, state_folder

    run = {"recipe-yaml": "r", "overrides": "", "output-dir": "/runs/a", "resume": False}
    folder = state_folder(run, {"state-dir": str(tmp_path)}, "digits/image/0")
    assert folder == state_folder({**run, "resume": True}, {"state-dir": str(tmp_path)}, "digits/image/0")
    assert folder != state_folder({**run, "output-dir": "/runs/b"}, {"state-dir": str(tmp_path)}, "digits/image/0")
    assert load_local(folder, 5) is None
    for rnd in (1, 2, 4):
        save_local(folder, rnd, {"local/x": torch.full((2,), float(rnd))})
    assert sorted(f.name for f in folder.iterdir()) == ["round-2.safetensors", "round-4.safetensors"]  # 2 kept
    assert load_local(folder, 0) is None  # a new run (resumed after round 0) reads nothing stale
    assert torch.equal(load_local(folder, 3)["local/x"], torch.full((2,), 2.0))  # round 4 was lost: not read
    assert torch.equal(load_local(folder, 4)["local/x"], torch.full((2,), 4.0))
