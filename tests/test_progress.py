"""Progress: a live display of rounds and clients on a terminal; plain log lines (with the ETA) elsewhere."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

RECIPE = (
    "backbone: {model_name: mmfl-tiny}\n"
    "tasks:\n  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 3, max_test_examples: 30}\n"
    "parts:\n  - class_path: mmfl.prompts.CoOp\n    init_args: {n_ctx: 2}\n"
    "training: {accelerator: cpu, max_steps: 1}\nfederation: {rounds: 2}\n"
)
BAR = "━"  # what Rich draws its bars with


def _cmd(tmp: Path, name: str, *extra: str) -> list[str]:
    (tmp / "recipe.yaml").write_text(RECIPE)
    return [
        sys.executable,
        "-m",
        "mmfl",
        "fit",
        "-c",
        str(tmp / "recipe.yaml"),
        "--output_dir",
        str(tmp / name),
        *extra,
    ]


def _in_a_terminal(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd`` with stdin/stdout/stderr on a pseudo-terminal; returns (exit status, everything it wrote)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    os.close(master)
    return p.wait(timeout=60), out.decode(errors="replace")


def test_a_terminal_sees_the_live_display_with_elapsed_time_and_eta(tmp_path: Path) -> None:
    code, out = _in_a_terminal(_cmd(tmp_path, "tty"))
    assert code == 0, out
    assert BAR in out and "rounds" in out and "round 2: clients" in out and "round 0: zero-shot evaluation" in out
    assert "3/3" in out and "2/2" in out  # the clients of a round, the rounds
    assert "elapsed" in out and "ETA" in out
    assert "round 2/2: 3/3 clients sampled" in out  # log lines still print (above the bars)
    assert "summary:" in out


def test_without_a_terminal_plain_lines_one_per_round(tmp_path: Path) -> None:
    p = subprocess.run(_cmd(tmp_path, "pipe"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert BAR not in p.stderr and "\x1b[" not in p.stderr  # no display, no terminal codes
    rounds = [line for line in p.stderr.splitlines() if "mmfl.federated.simulation: round" in line]
    assert len(rounds) == 3  # round 0 (zero-shot), 1, 2
    assert ", ETA " in rounds[1] and "ETA" not in rounds[2]  # the last round has nothing left to estimate


def test_quiet_shows_no_display_even_on_a_terminal(tmp_path: Path) -> None:
    code, out = _in_a_terminal(_cmd(tmp_path, "quiet", "-q"))
    assert code == 0, out
    assert BAR not in out and "round 1/2" not in out and "summary" not in out
    assert (tmp_path / "quiet" / "global.safetensors").is_file()
