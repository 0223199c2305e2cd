"""Flower runs that resume and retry: a run killed mid-way (SuperLink, ServerApp and nodes) continues from its
round checkpoint to the tensors of an uninterrupted run; a node that fails is sent its message again."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmfl import cli

pytest.importorskip("flwr", reason="the Flower engine needs flwr: pip install 'mmfl[flower]'")

from flower_procs import BIN, Processes, flwr, in_process, local_engine, write_app

from mmfl.federated.resume import CHECKPOINT, load_checkpoint


def _fits(out: Path) -> list[tuple[str, str]]:
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    return sorted((r[0], r[4]) for r in rows if r[5] == "fit")


@pytest.mark.slow
def test_a_killed_flower_run_resumes_to_the_uninterrupted_tensors(tmp_path: Path) -> None:
    env = local_engine(tmp_path, nodes=2)
    out = tmp_path / "flower-run"
    recipe = write_app(tmp_path, clients=1, rounds=3, out=out)
    app = str(tmp_path / "app")
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
            time.sleep(0.5)
        procs.stop_all()  # the SuperLink, the ServerApp and the ClientApps, at once
        killed_after = load_checkpoint(out / CHECKPOINT).round
        assert 1 <= killed_after < 3
        done = flwr(env, "run", app, "local", "--run-config", "resume=true", "--stream")
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        procs.stop_all()
    assert load_checkpoint(out / CHECKPOINT).round == 3
    clients = ["animals/image/0", "digits/image/0"]
    assert _fits(out) == [(str(r), c) for r in (1, 2, 3) for c in clients]  # every round once, none twice
    flower, local = load_file(out / "global.safetensors"), in_process(recipe, tmp_path / "in-process")
    assert flower.keys() == local.keys()
    for k in flower:
        assert (flower[k] - local[k]).abs().max() < 1e-5, k


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
    from mmfl.federated.flower import federation_from_config
    from mmfl.federated.flower_strategy import check_output

    text = (
        "backbone: {model_name: mmfl-tiny}\ntasks:\n  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}}\n"
        "parts:\n  - {class_path: mmfl.prompts.CoOp, init_args: {n_ctx: 2, scope: local}}\n"
    )
    sim = federation_from_config({"recipe-yaml": text})
    with pytest.raises(ValueError, match=r"local tensors \(.*coop.ctx\), which stay on the nodes.*start it anew"):
        check_output(sim, tmp_path, resume=True)
    with pytest.raises(ValueError, match="resume=true needs the app's output-dir"):
        check_output(sim, None, resume=True)
    check_output(sim, tmp_path, resume=False)  # an empty folder: a new run may start
    (tmp_path / CHECKPOINT).write_bytes(b"a run's state")
    with pytest.raises(ValueError, match=r"already holds a run .* --run-config resume=true"):
        check_output(sim, tmp_path, resume=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == b"a run's state"
