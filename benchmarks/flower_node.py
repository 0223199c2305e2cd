"""A Flower ClientApp process's memory against what it must hold (``python -m benchmarks.flower_node --out DIR``).

A real deployment on 127.0.0.1 — a SuperLink, one SuperNode that runs one client (``digits/image/0``) of a
federation of three tasks, one round — while every process of the run is sampled for its peak resident memory
(``VmHWM``): the ClientApp process (``flwr-clientapp``) and the ServerApp process (``flwr-serverapp``). Beside it,
each in a fresh process: the backbone alone; the *stack* (everything a ClientApp imports — Lightning, datasets,
Flower, mmfl — and the backbone); the same client trained by a lean node and by a whole federation built as every
ClientApp did before nodes were lean; and ``mmfl fit`` of the whole recipe. ``DIR/results.json`` holds (MiB):

    node_peak_rss_mib:               the ClientApp process's peak RSS;
    backbone_rss_mib:                a process holding only the backbone;
    partition_mib, partition_rows:   the node's own data (Arrow bytes of its train and local-test rows);
    node_over_budget:                node_peak_rss_mib / (backbone_rss_mib + partition_mib + 200) (issue 22: ≤ 1);
    stack_rss_mib:                   the stack's floor; lean_over_stack_mib, whole_over_stack_mib: what a lean node
                                     and a whole-federation node add to it to train the client (no Flower runtime);
    server_peak_rss_mib:             the ServerApp's peak (it prepares every task's data);
    server_end_rss_mib:              its RSS when last seen, after its round (the clients' data let go);
    in_process_peak_rss_mib:         ``mmfl fit`` on the same recipe, all clients in one process.

The other tasks (animal silhouettes, and ``--copies`` copies of the digits) are what a lean node never loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.flower_compare import _marked, _port

log = logging.getLogger(__name__)
BIN = Path(sys.executable).parent

RECIPE = """\
seed: 0
backbone: {{model_name: {backbone}}}
tasks:  # the node runs digits/image/0; the other tasks' data and clients are what it no longer builds
  - {{name: digits, data: {{class_path: mmfl.data.SklearnDigits}}, clients: {clients}, max_test_examples: 100}}
  - {{name: animals, data: {{class_path: mmfl.data.AnimalSilhouettes}}, clients: {clients}, max_test_examples: 100}}
  - name: tiled
    data: {{class_path: benchmarks.scale.TiledDigits, init_args: {{copies: {copies}}}}}
    clients: {clients}
    max_test_examples: 100
parts:
  - class_path: mmfl.prompts.CoOp
    init_args: {{n_ctx: 4, scope: global+task, local_rank: 2}}
training: {{accelerator: cpu, max_steps: 2, batch_size: 8}}
federation: {{rounds: 1, fraction: 0.01, min_clients: 1, eval_every: 1}}
"""


def _status_kib(pid: int, field: str = "VmHWM") -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def _python_peak(code: str, env: dict[str, str]) -> dict:
    """Run ``code`` in a fresh Python process; its last stdout line is JSON; adds its peak RSS in MiB."""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"a measuring process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


BACKBONE = """
import json, resource
from mmfl.backbone import Backbone
Backbone({name!r})
print(json.dumps({{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

STACK = """
import json, resource
import mmfl.federated.flower  # everything a ClientApp imports: Lightning, datasets, Flower, mmfl
from mmfl.backbone import Backbone
Backbone({name!r})
print(json.dumps({{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

WHOLE = """
import json, resource
from mmfl.federated.flower import federation_from_config
from mmfl.federated.node import layout_of
from mmfl.module import quiet_lightning
sim = federation_from_config({{"recipe-yaml": {recipe!r}}})  # what every ClientApp built before nodes were lean
c = sim.clients[0]
n = c.data.train.flatten_indices().data.nbytes + (c.data.test.data.nbytes if c.data.test is not None else 0)
with quiet_lightning():
    sim.fit_client(c, 1)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"rss": rss, "bytes": n, "rows": len(c.data.train), "layout": layout_of(sim.tasks)}}))
"""

LEAN = """
import json, resource
import mmfl.federated.flower
from mmfl.federated.node import Node
from mmfl.module import quiet_lightning
node = Node({{"recipe-yaml": {recipe!r}}})
layout = json.loads({layout!r})
c = node.client("digits/image/0", layout)
node.global_state = c.shared.trainable_state_dict(include_local=False)
with quiet_lightning():
    node.fit_client(c, 1)
print(json.dumps({{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

FIT = """
import json, resource
from mmfl import cli
assert cli.main(["fit", "-c", {recipe!r}, "--output_dir", {out!r}]) == 0
print(json.dumps({{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(out: Path, backbone: str, clients: int, copies: int) -> dict:
    """Run the deployment and the side measurements; write and return ``out/results.json``'s figures."""
    text = RECIPE.format(backbone=backbone, clients=clients, copies=copies)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])  # benchmarks.scale.TiledDigits
    with tempfile.TemporaryDirectory(prefix="mmfl-bench-node-") as tmp:
        tmp_path = Path(tmp)
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(text)
        floor = _python_peak(BACKBONE.format(name=backbone), env)["rss"]
        stack = _python_peak(STACK.format(name=backbone), env)["rss"]
        whole = _python_peak(WHOLE.format(recipe=text), env)
        lean = _python_peak(LEAN.format(recipe=text, layout=whole["layout"]), env)["rss"]
        in_process = _python_peak(FIT.format(recipe=str(recipe), out=str(tmp_path / "in")), env)["rss"]
        node, server, server_end = _deployment(tmp_path, recipe, env)
    partition = whole["bytes"] / 2**20
    results = {
        "backbone": backbone,
        "clients": 3 * clients,
        "node_peak_rss_mib": node,
        "backbone_rss_mib": floor,
        "partition_mib": partition,
        "partition_rows": whole["rows"],
        "node_over_budget": node / (floor + partition + 200),
        "stack_rss_mib": stack,
        "lean_node_rss_mib": lean,
        "whole_federation_node_rss_mib": whole["rss"],
        "lean_over_stack_mib": lean - stack,
        "whole_over_stack_mib": whole["rss"] - stack,
        "server_peak_rss_mib": server,
        "server_end_rss_mib": server_end,
        "in_process_peak_rss_mib": in_process,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _deployment(tmp_path: Path, recipe: Path, env: dict[str, str], timeout: float = 900) -> tuple[float, float, float]:
    """A SuperLink and one SuperNode (client digits/image/0) run one round; the peak RSS in MiB of the ClientApp
    process and of the ServerApp process, and the ServerApp's RSS when last seen (its last round done)."""
    import uuid

    home = tmp_path / "flwr-home"
    home.mkdir()
    link = _port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    mark_value = uuid.uuid4().hex
    mark = f"MMFL_BENCH_RUN={mark_value}".encode()
    fenv = dict(
        env,
        MMFL_BENCH_RUN=mark_value,
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_HOME=str(home),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    app = tmp_path / "app"
    write = [str(BIN / "mmfl"), "flower-app", "-c", str(recipe), "--app_dir", str(app), "--min_nodes=1"]
    subprocess.run([*write, "--output_dir", str(tmp_path / "fl")], env=env, check=True, capture_output=True)
    procs = []
    peaks = {"flwr-clientapp": 0, "flwr-serverapp": 0}
    last = dict(peaks)  # the latest resident memory seen
    try:
        for cmd in (
            ["flower-superlink", "--insecure", "--host=127.0.0.1", f"--port={link}"],
            ["flower-supernode", "--insecure", f"--superlink=127.0.0.1:{link}", "--host=127.0.0.1"],
        ):
            if cmd[0] == "flower-supernode":
                cmd += [f"--port={_port()}", '--node-config=client="digits/image/0"']
            else:
                cmd += ["--disable-runtime-dependency-installation"]
            procs.append(
                subprocess.Popen(
                    [str(BIN / cmd[0]), *cmd[1:]],
                    env=fenv,
                    cwd=home,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        time.sleep(4)
        run = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(app), "deploy", "--stream"],
            env=fenv,
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        t0 = time.perf_counter()
        while run.poll() is None:
            for pid in _marked(mark):
                line = _cmdline(pid)
                for name in peaks:
                    if name in line:
                        peaks[name] = max(peaks[name], _status_kib(pid))
                        last[name] = _status_kib(pid, "VmRSS") or last[name]
            time.sleep(0.1)
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"the Flower run took over {timeout} s")
        output = run.stdout.read() if run.stdout else ""
        if run.returncode != 0 or not (tmp_path / "fl" / "global.safetensors").is_file():
            raise RuntimeError(f"the Flower run failed ({run.returncode}):\n{output[-3000:]}")
    finally:
        for pid in _marked(mark):  # every process of the run, SuperLink and SuperNode included
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if not all(peaks.values()):
        raise RuntimeError(f"no ClientApp or ServerApp process was seen: {peaks}")
    return peaks["flwr-clientapp"] / 1024, peaks["flwr-serverapp"] / 1024, last["flwr-serverapp"] / 1024


def main(argv: list[str] | None = None) -> dict:
    """Command line: see the module's docstring."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-flower-node"))
    ap.add_argument("--backbone", default="mmfl-mini")
    ap.add_argument("--clients", type=int, default=100, help="clients per task (three tasks)")
    ap.add_argument("--copies", type=int, default=20, help="copies of the digits in the third task's data")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = measure(a.out, a.backbone, a.clients, a.copies)
    log.info("%s\nwrote %s", json.dumps(results, indent=2), a.out / "results.json")
    return results


if __name__ == "__main__":
    main()
