"""mmfl's Flower apps stopped inside a Flower process (its own signal handlers, as ``flwr-serverapp`` and
``flwr-clientapp`` install them): the app's one line comes before Flower's exit handlers, names the checkpoint's
round (ServerApp) or the round its local tensors are kept from (ClientApp), and the process exits 128 + the
signal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower engine needs flwr: pip install 'mmfl[flower]'")

from mmfl import cli
from mmfl.federated.node_state import save_local

SCRIPT = """
import logging, os, signal, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
from flwr.supercore.exit import register_signal_handlers
from flwr.supercore.telemetry import EventType
from mmfl.federated.flower import client_stop_line, server_stop_line
from mmfl.federated.flower_stop import stop_line

register_signal_handlers(  # as flwr-serverapp and flwr-clientapp do before they run an app
    event_type=EventType.FLWR_SERVERAPP_RUN_LEAVE,
    exit_message="Task stopped by user.",
    exit_handlers=[lambda: print("flower: reports the run stopped", flush=True)],
)
kind, folder, sig = sys.argv[1], Path(sys.argv[2]), getattr(signal, sys.argv[3])
describe = server_stop_line(folder) if kind == "server" else client_stop_line("digits/image/0", 3, folder, True)
with stop_line(describe):
    print("app: running", flush=True)
    os.kill(os.getpid(), sig)
    time.sleep(30)
print("not reached", flush=True)
"""
FIT = """
seed: 0
backbone: {model_name: mmfl-tiny}
tasks:
  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 2, shots: 2, max_test_examples: 20}
parts:
  - {class_path: mmfl.prompts.CoOp, init_args: {n_ctx: 2}}
training: {max_steps: 1, batch_size: 4, accelerator: cpu, feature_cache: "off"}
federation: {rounds: 2}
"""


def _run(kind: str, folder: Path, sig: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-c", SCRIPT, kind, str(folder), sig]
    env = {"FLWR_TELEMETRY_ENABLED": "0", "PATH": "/usr/bin:/bin"}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)


def test_a_stopped_server_app_says_which_round_is_complete_and_exits_128_plus_the_signal(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (tmp_path / "recipe.yaml").write_text(FIT)
    assert cli.main(["fit", "-c", str(tmp_path / "recipe.yaml"), "--output_dir", str(run)]) == 0  # 2 rounds
    p = _run("server", run, "SIGTERM")
    assert p.returncode == 143, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    line = (
        f"mmfl.federated.flower_stop: mmfl ServerApp: stopped by SIGTERM; the last complete round is 2 "
        f"({run / 'checkpoint.safetensors'}): continue with `flwr run APP CONNECTION --run-config resume=true`"
    )
    assert line in lines, p.stdout
    assert lines.index(line) < lines.index("flower: reports the run stopped")  # while Flower still sends logs
    assert "not reached" not in p.stdout and "Traceback" not in p.stderr
    p = _run("server", tmp_path / "empty", "SIGINT")  # flwr stop sends SIGINT
    assert p.returncode == 130
    assert "mmfl ServerApp: stopped by SIGINT; no round is complete yet: continue with `flwr run" in p.stdout


def test_a_stopped_client_app_says_which_round_its_local_tensors_are_kept_from(tmp_path: Path) -> None:
    folder = tmp_path / "node" / "digits__image__0"
    for rnd in (1, 2):
        save_local(folder, rnd, {"local/x": torch.zeros(2)})
    p = _run("client", folder, "SIGTERM")
    assert p.returncode == 143, p.stdout + p.stderr
    assert (
        "mmfl ClientApp digits/image/0: stopped by SIGTERM while training round 3, nothing sent; its local tensors "
        f"stay as of round 2 ({folder}); the ServerApp sends the round again (federation.retries) or stops the run"
    ) in p.stdout, p.stdout
    assert sorted(f.name for f in folder.iterdir()) == ["round-1.safetensors", "round-2.safetensors"]  # untouched


@pytest.mark.parametrize(("key", "value"), [("round-timeout", "inf"), ("round-timeout", 0), ("min-nodes", 0)])
def test_a_server_app_refuses_a_setting_that_would_wait_forever_before_building_anything(
    key: str, value: object
) -> None:
    from mmfl.federated.flower import server_setup

    cfg = {"recipe-yaml": "", key: value}  # no recipe: the check must come first
    with pytest.raises(ValueError, match=f"^{key} must be"):
        server_setup(cfg)
