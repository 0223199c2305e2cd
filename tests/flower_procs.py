"""Flower processes on 127.0.0.1 for the Flower tests: a Flower home, a SuperLink (deployment or the simulation
engine), SuperNodes, `flwr run`, and stopping every process started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import load_file

from mmfl import cli

BIN = Path(sys.executable).parent
RECIPE = """
backbone: {model_name: mmfl-tiny}
tasks:
  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: CLIENTS, shots: 4, max_test_examples: 30}
  - {name: animals, data: {class_path: mmfl.data.AnimalSilhouettes}, clients: CLIENTS, shots: 4, max_test_examples: 30}
parts:  # a context shared by all plus a per-task one from zero; an adapter per task, half mixed with all tasks'
  - class_path: mmfl.prompts.CoOp
    init_args: {n_ctx: 2, scope: global+task}
  - class_path: mmfl.prompts.ClipAdapter
    init_args: {scope: "mix(task, global, own=0.5)"}
training: {accelerator: cpu, max_steps: 2}
federation: {rounds: ROUNDS}
"""


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(port()),
        PYTHONUNBUFFERED="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperLink starts flower-superexec by name
    )
    return env


def local_engine(tmp_path: Path, nodes: int) -> dict[str, str]:
    """The environment of a Flower home whose default SuperLink is the simulation engine with ``nodes`` virtual
    SuperNodes (one CPU each, two for the backend)."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local-in-memory:"\n'
        f"options.num-supernodes = {nodes}\noptions.backend.client-resources.num-cpus = 1\n"
        "options.backend.init-args.num-cpus = 2\n"
    )
    return flwr_env(home)


def pids_by_home(home: Path, command: str = "") -> list[int]:
    """The processes started with this FLWR_HOME (whose command line holds ``command``): Flower detaches some of
    its children (SuperExec, ServerApp, ClientApp processes) into sessions of their own."""
    mark, found = f"FLWR_HOME={home}".encode() + b"\0", []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if mark in (proc / "environ").read_bytes() + b"\0" and command.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return found


def kill_by_home(home: Path) -> None:
    """SIGKILL every process started with this FLWR_HOME, out of reach of a process-group kill."""
    for pid in pids_by_home(home):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class Processes:
    """Starts processes in their own process groups and stops every one of them."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        p = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        kill_by_home(Path(self.env["FLWR_HOME"]))
        for p in self.procs:
            p.wait(timeout=30)


@contextlib.contextmanager
def processes(env: dict[str, str], logs: Path) -> Iterator[Processes]:
    """Processes that are all killed (with their children) on the way out."""
    procs = Processes(env, logs)
    try:
        yield procs
    finally:
        procs.stop_all()


# `flower-supernode` whose node heartbeat is Flower's shortest allowed, 10 s instead of its hard-coded 30: the
# SuperLink then reports the node gone 2 x 10 s after it dies instead of 60 s (a test that kills a node waits that
# long). Only the node's heartbeat changes (the interval it reports and its sender's pace, both module globals of
# flwr 1.42, pinned); `flwr.common.constant` stays as it is, because the SuperNode also judges its ClientApp's task
# heartbeat by it, and the ClientApp (a fresh process) still beats every ~20 s: a 10 s constant there would call a
# busy but healthy ClientApp dead (seen on a loaded machine).
QUICK_HEARTBEAT_SUPERNODE = (
    "python",
    "-c",
    "import sys; import flwr.common.constant as c; import flwr.supercore.heartbeat as h; "
    "import flwr.supernode.fleet_http_connection as f; "
    "h.HEARTBEAT_DEFAULT_INTERVAL = f.HEARTBEAT_DEFAULT_INTERVAL = c.HEARTBEAT_MIN_INTERVAL; "
    "from flwr.supernode.cli import flower_supernode; sys.argv[0] = 'flower-supernode'; sys.exit(flower_supernode())",
)


def write_app(
    tmp_path: Path,
    clients: int,
    rounds: int,
    out: Path,
    min_nodes: int = 0,
    local_test: float = 0,
    own_val: bool = False,
) -> Path:
    """Write RECIPE and its Flower app; ``own_val``: the adapter's mix chooses its shares on validation data."""
    recipe = tmp_path / "recipe.yaml"
    text = RECIPE.replace("CLIENTS", str(clients)).replace("ROUNDS", str(rounds))
    if own_val:
        text = text.replace("own=0.5", "own=val") + "evaluation: {val_fraction: 0.05}\n"
    if local_test:  # each client holds out this share of its examples as its local test split
        text = text.replace("shots: 4,", f"shots: 4, local_test_fraction: {local_test},")
    recipe.write_text(text)
    app = tmp_path / "app"
    args = ["flower-app", "-c", str(recipe), "--app_dir", str(app), "--output_dir", str(out)]
    assert cli.main([*args, f"--min_nodes={min_nodes}"]) == 0
    return recipe


def flwr(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=env["FLWR_HOME"]
    )


def status(env: dict[str, str], connection: str) -> list[str]:
    """The status of every run the SuperLink knows (``flwr ls``), e.g. ``finished:completed``."""
    done = flwr(env, "ls", connection, "--format", "json", timeout=60)
    runs = json.loads(done.stdout)["runs"]
    return [r["status"] for r in runs]


def wait_for_nodes(env: dict[str, str], connection: str, n: int, timeout: float = 120) -> None:
    """Wait until the SuperLink lists ``n`` SuperNodes online (``flwr supernode ls``): a node's start-up time varies
    with the machine's load, and a run started before every node is up samples only those that are."""
    deadline, online = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        done = flwr(env, "supernode", "ls", connection, "--format", "json", timeout=60)
        try:  # no "nodes" (or no JSON at all) while the SuperLink starts
            listed = json.loads(done.stdout) if done.returncode == 0 else {}
        except json.JSONDecodeError:
            listed = {}
        online = sum(node["status"] == "online" for node in listed.get("nodes", []))
        if online >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"{online} of {n} SuperNodes online after {timeout:.0f} s")


def in_process(recipe: Path, out: Path) -> dict:
    assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(out)]) == 0
    return load_file(out / "global.safetensors")
