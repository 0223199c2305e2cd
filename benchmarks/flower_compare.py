"""mmfl's in-process engine against Flower's simulation engine (Ray) on the same recipe, clients and rounds:
wall time and peak memory (the summed resident memory of every process of the run), measured side by side."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.perf import Setting

BIN = Path(sys.executable).parent


def recipe(s: Setting, rounds: int) -> str:
    """The setting as a recipe (the same federation as :func:`benchmarks.perf.build`)."""
    pretrained = f", pretrained: {s.pretrained}" if s.pretrained else ""
    return f"""\
seed: 0
backbone: {{model_name: {s.backbone}{pretrained}}}
tasks:
  - name: digits
    data: {{class_path: mmfl.data.SklearnDigits}}
    clients: {s.clients}
    shots: {s.shots}
    max_test_examples: 100
parts:
  - class_path: mmfl.prompts.CoOp
    init_args: {{n_ctx: {s.n_ctx}, scope: task}}
training:
  batch_size: {s.batch_size}
  accelerator: {s.accelerator}
  optimizer: {{class_path: torch.optim.AdamW, init_args: {{lr: 0.01}}}}
federation: {{rounds: {rounds}}}
"""


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _marked(mark: bytes) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if mark in (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
    return pids


def run_measured(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 900) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak summed RSS in MiB of every process carrying this run's mark)."""
    mark_value = uuid.uuid4().hex
    env = {**env, "MMFL_BENCH_RUN": mark_value}
    mark = f"MMFL_BENCH_RUN={mark_value}".encode()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    peak = 0
    try:
        while proc.poll() is None:
            peak = max(peak, sum(_rss_kib(p) for p in _marked(mark)))
            time.sleep(0.2)
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{cmd[0]} ran over {timeout} s")
        wall = time.perf_counter() - t0
        out = proc.stdout.read() if proc.stdout else ""
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
        return wall, peak / 1024
    finally:
        for pid in _marked(mark):  # Ray and Flower leave daemons behind: stop every process of the run
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compare(s: Setting, rounds: int = 2) -> dict[str, float]:
    """Both engines on the same recipe: their wall times and peak memory, and Flower's over mmfl's."""
    with tempfile.TemporaryDirectory(prefix="mmfl-bench-flower-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "recipe.yaml").write_text(recipe(s, rounds))
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        mmfl = [str(BIN / "mmfl"), "fit", "-c", str(tmp_path / "recipe.yaml"), "--output_dir", str(tmp_path / "in")]
        mmfl_wall, mmfl_rss = run_measured(mmfl, env, tmp_path)

        home = tmp_path / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local-in-memory:"\n'
            f"options.num-supernodes = {s.clients}\noptions.backend.client-resources.num-cpus = 1\n"
            f"options.backend.init-args.num-cpus = {os.cpu_count() or 1}\n"
        )
        fenv = dict(
            env,
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_HOME=str(home),
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_port()),
            FLWR_LOCAL_CONTROL_API_PORT=str(_port()),
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        app = tmp_path / "app"
        write = [str(BIN / "mmfl"), "flower-app", "-c", str(tmp_path / "recipe.yaml"), "--app_dir", str(app)]
        subprocess.run([*write, "--output_dir", str(tmp_path / "fl")], env=env, check=True, capture_output=True)
        flwr = [str(BIN / "flwr"), "run", str(app), "local", "--stream"]
        fl_wall, fl_rss = run_measured(flwr, fenv, home)
        if not (tmp_path / "fl" / "global.safetensors").is_file():
            raise RuntimeError("the Flower run wrote no global.safetensors: it failed")
    return {
        "mmfl_wall_s": mmfl_wall,
        "mmfl_peak_rss_mib": mmfl_rss,
        "flower_wall_s": fl_wall,
        "flower_peak_rss_mib": fl_rss,
        "flower_wall_ratio": fl_wall / mmfl_wall,
        "flower_rss_ratio": fl_rss / mmfl_rss,
    }
