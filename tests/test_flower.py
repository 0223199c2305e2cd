"""The Flower engine on 127.0.0.1: a real SuperLink and SuperNodes (deployment), the simulation engine with many
virtual clients, and a SuperNode killed mid-run. Every process started here is stopped here."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmfl import cli

pytest.importorskip("flwr", reason="the Flower engine needs flwr: pip install 'mmfl[flower]'")

from flower_procs import (
    BIN,
    QUICK_HEARTBEAT_SUPERNODE,
    RECIPE,
    Processes,
    flwr,
    flwr_env,
    in_process,
    local_engine,
    port,
    processes,
    status,
    wait_for_nodes,
    write_app,
)


@pytest.mark.slow
def test_deployment_engine_on_loopback_matches_the_in_process_engine(tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = flwr_env(home)
    link = port()  # Flower 1.42 serves the Fleet, Control and runtime APIs on one HTTP port
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    out = tmp_path / "flower-run"
    recipe = write_app(tmp_path, clients=1, rounds=2, out=out, own_val=True)
    with processes(env, tmp_path) as procs:
        procs.start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host=127.0.0.1",
            f"--port={link}",
            "--disable-runtime-dependency-installation",
        )
        for i, cid in enumerate(["digits/image/0", "animals/image/0"]):
            procs.start(
                f"supernode{i}",
                "flower-supernode",
                "--insecure",
                f"--superlink=127.0.0.1:{link}",
                "--host=127.0.0.1",
                f"--port={port()}",
                f'--node-config=client="{cid}"',
            )
        wait_for_nodes(env, "deploy", 2)
        done = flwr(env, "run", str(tmp_path / "app"), "deploy", "--stream")
        assert done.returncode == 0, done.stdout + done.stderr
        assert status(env, "deploy") == ["finished:completed"]
    flower = load_file(out / "global.safetensors")
    local = in_process(recipe, tmp_path / "in-process")
    assert flower.keys() == local.keys() and {"global/coop.ctx", "task/digits/coop.ctx"} <= set(flower)
    assert any(k.startswith("task/animals/adapter.") for k in flower)  # the mixed adapter: one tensor per task
    for k in flower:
        assert (flower[k] - local[k]).abs().max() < 1e-5, k

    # the adapter's shares, chosen on validation data by the ServerApp, are the in-process engine's
    def chosen(run: Path) -> list[tuple[str, str, str]]:
        with (run / "metrics.csv").open() as f:
            return [(r["round"], r["note"], r["value"]) for r in csv.DictReader(f) if r["split"] == "mix_share"]

    assert chosen(out) == chosen(tmp_path / "in-process")
    assert [r[:2] for r in chosen(out)] == [(rnd, f"task/{t}") for rnd in "12" for t in ("animals", "digits")]

    # the ServerApp's folder holds its recipe, as a run of mmfl fit does: `mmfl choose` reads it as one
    assert (out / "config.yaml").is_file()
    assert cli.main(["choose", str(out), str(tmp_path / "in-process"), "--output", str(tmp_path / "chosen")]) == 0
    groups = json.loads((tmp_path / "chosen" / "choice.json").read_text())["groups"]
    assert sorted(groups) == ["animals/image", "digits/image"]


@pytest.mark.slow
def test_simulation_engine_with_twenty_virtual_clients(tmp_path: Path) -> None:
    env = local_engine(tmp_path, nodes=20)
    out = tmp_path / "flower-run"
    write_app(tmp_path, clients=10, rounds=1, out=out, local_test=0.5)  # 2 tasks × 10 clients, one per node
    procs = Processes(env, tmp_path)
    try:
        done = flwr(env, "run", str(tmp_path / "app"), "local", "--stream")
        assert done.returncode == 0, done.stdout + done.stderr
        assert status(env, "local") == ["finished:completed"]
    finally:
        procs.stop_all()  # the local SuperLink `flwr run` started, and its children
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    fits = {r[4] for r in rows if r[0] == "1" and r[5] == "fit"}
    assert len(fits) == 20 and {c.rsplit("/", 1)[0] for c in fits} == {"digits/image", "animals/image"}
    local_tests = [(r[0], r[4]) for r in rows if r[5] == "local_test"]  # scored by each node, once, after it trained
    assert sorted(local_tests) == sorted(("1", c) for c in fits)
    assert {(r[2], r[5]) for r in rows if r[0] == "1" and r[1] == "task"} == {("digits", "test"), ("animals", "test")}
    state = load_file(out / "global.safetensors")
    assert {k.split("/")[0] for k in state} == {"task", "global"}


@pytest.mark.slow
def test_a_killed_supernode_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = flwr_env(home)
    link = port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    out = tmp_path / "flower-run"
    write_app(tmp_path, clients=2, rounds=3, out=out, min_nodes=2)
    with processes(env, tmp_path) as procs:
        procs.start("superlink", "flower-superlink", "--insecure", "--host=127.0.0.1", f"--port={link}")
        nodes = {}
        for cid in ["digits/image/0", "animals/image/0", "digits/image/1"]:
            nodes[cid] = procs.start(  # the node killed below reports a shorter heartbeat: its loss shows sooner
                cid.replace("/", "-"),
                *(QUICK_HEARTBEAT_SUPERNODE if cid == "digits/image/1" else ("flower-supernode",)),
                "--insecure",
                f"--superlink=127.0.0.1:{link}",
                "--host=127.0.0.1",
                f"--port={port()}",
                f'--node-config=client="{cid}"',
            )
        wait_for_nodes(env, "deploy", 3)  # all three, or round 1 may sample only the first two
        run = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(tmp_path / "app"), "deploy", "--stream"],
            env=env,
            cwd=home,
            stdout=(tmp_path / "run.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        procs.procs.append(run)
        deadline = time.monotonic() + 300
        metrics = out / "metrics.csv"
        while time.monotonic() < deadline:  # wait for round 1 to finish, then kill one node
            if metrics.is_file() and any(line.startswith("1,task") for line in metrics.read_text().splitlines()):
                break
            time.sleep(1)
        else:
            pytest.fail("round 1 did not finish")
        os.killpg(nodes["digits/image/1"].pid, signal.SIGKILL)
        assert run.wait(timeout=500) == 0
        assert status(env, "deploy") == ["finished:completed"]
    rows = [line.split(",") for line in metrics.read_text().splitlines()[1:]]
    assert {r[4] for r in rows if r[0] == "1" and r[5] == "fit"} == {
        "digits/image/0",
        "animals/image/0",
        "digits/image/1",
    }
    failed = [r for r in rows if r[5] == "fit_failed"]
    assert failed and {r[0] for r in failed} <= {"2", "3"}  # the round after the kill reports it
    killed = re.search(r"SuperNode ID: (\d+)", (tmp_path / "digits-image-1.log").read_text())
    assert killed and {r[4] for r in failed} == {killed.group(1)}  # by its node id (the SuperLink wrote the error)
    for rnd in ("2", "3"):  # the others go on training; every round is evaluated
        assert {"digits/image/0", "animals/image/0"} <= {r[4] for r in rows if r[0] == rnd and r[5] == "fit"}
        assert {r[2] for r in rows if r[0] == rnd and r[1] == "task"} == {"digits", "animals"}


def test_the_app_flower_reads_and_the_node_config(tmp_path: Path, tiny_backbone) -> None:
    import tomllib

    from flwr.common.config import validate_config

    from mmfl.federated.flower import client_index, federation_from_config

    out = tmp_path / "run"
    write_app(tmp_path, clients=2, rounds=1, out=out, min_nodes=3)
    cfg = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(cfg, check_module=True, project_dir=tmp_path / "app")
    assert ok, errors
    run_config = cfg["tool"]["flwr"]["app"]["config"]
    assert run_config["output-dir"] == str(out.resolve()) and run_config["min-nodes"] == 3
    sim = federation_from_config(run_config)
    assert federation_from_config(run_config) is sim  # built once per process
    cids = [c.data.cid for c in sim.clients]
    assert cids == ["digits/image/0", "digits/image/1", "animals/image/0", "animals/image/1"]
    assert client_index(sim, {"client": "animals/image/0"}) == 2 and client_index(sim, {"partition-id": 3}) == 3
    with pytest.raises(ValueError, match="not a client of the recipe"):
        client_index(sim, {"client": "fashion/image/0"})
    with pytest.raises(ValueError, match="out of range"):
        client_index(sim, {"partition-id": 4})
    with pytest.raises(ValueError, match="give the node a client"):
        client_index(sim, {})
    # the ServerApp's own federation: the tasks' test splits, none of the clients' data (the nodes hold it)
    from mmfl.federated.flower import server_setup

    server, _, min_nodes, _ = server_setup(run_config)
    assert server is not sim and min_nodes == 3 and [c.data.cid for c in server.clients] == cids
    assert all(len(c.data.train) == 0 and c.data.test is None for c in server.clients)
    assert all(len(t.test) == 30 for t in server.tasks) and len(sim.clients[0].data.train) == 40
    # a bad recipe is refused before an app is written
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("CLIENTS", "0").replace("ROUNDS", "1"))
    assert cli.main(["flower-app", "-c", str(bad), "--app_dir", str(tmp_path / "bad-app")]) == 2
    assert not (tmp_path / "bad-app").exists()


@pytest.mark.slow
def test_secure_aggregation_equals_fedavg_per_scope_group(tmp_path: Path) -> None:
    """SecAgg+ on the simulation engine (4 virtual nodes, 2 tasks): the server decodes per-key means from sums
    only, and the result equals the in-process engine's FedAvg up to SecAgg+'s quantization. (One round: over
    more, AdamW's normalised steps amplify the quantization error of earlier rounds.)"""
    env = local_engine(tmp_path, nodes=4)
    out = tmp_path / "flower-run"
    recipe = tmp_path / "recipe.yaml"
    adamw = "max_steps: 2, optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.05}}"
    text = RECIPE.replace("CLIENTS", "2").replace("ROUNDS", "1").replace("max_steps: 2", adamw)
    recipe.write_text(text.replace("own=0.5", "own=val") + "evaluation: {val_fraction: 0.05}\n")  # shares on val
    app = tmp_path / "app"
    args = ["flower-app", "-c", str(recipe), "--app_dir", str(app), "--output_dir", str(out)]
    assert cli.main([*args, "--secure_aggregation=true"]) == 0
    assert "flower_secagg:secure_server_app" in (app / "pyproject.toml").read_text()
    procs = Processes(env, tmp_path)
    try:
        done = flwr(env, "run", str(app), "local", "--stream")
        assert done.returncode == 0, done.stdout + done.stderr
        assert status(env, "local") == ["finished:completed"]
    finally:
        procs.stop_all()
    flower = load_file(out / "global.safetensors")
    local = in_process(recipe, tmp_path / "in-process")
    adapter = {k for k in local if "/adapter." in k}  # mixed over the tasks: one copy per task
    assert {k.split("/")[1] for k in adapter} == {"digits", "animals"}
    assert (
        flower.keys() == local.keys() == {"global/coop.ctx", "task/digits/coop.ctx", "task/animals/coop.ctx", *adapter}
    )
    assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(tmp_path / "r0"), "--federation.rounds=0"]) == 0
    initial = load_file(tmp_path / "r0" / "checkpoint.safetensors")
    for k in flower:
        assert (flower[k] - local[k]).abs().max() < 1e-4, k  # quantization: steps of ~4e-6 per client
        assert (local[k] - initial[f"global::{k}"]).abs().max() > 1e-2, k  # and training moved every tensor
    rows = (out / "metrics.csv").read_text().splitlines()
    assert sum(",fit," in r for r in rows) == 4  # 4 clients, 1 round
    assert sum(",mix_share," in r for r in rows) == 2  # the adapter's share per task, chosen from the decoded means


def test_secure_aggregation_refuses_rules_that_need_individual_updates(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("CLIENTS", "2").replace("ROUNDS", "1"))
    args = ["flower-app", "-c", str(recipe), "--app_dir", str(tmp_path / "app"), "--output_dir", str(tmp_path / "o")]
    median = "--federation.aggregator=mmfl.federated.Median"
    assert cli.main([*args, "--secure_aggregation=true", median]) == 2
    assert "secure aggregation reveals only sums, so Median" in capsys.readouterr().err
    assert not (tmp_path / "app").exists()


@pytest.mark.slow
def test_unlabeled_clients_pseudo_label_on_the_flower_simulation_engine(tmp_path: Path) -> None:
    env = local_engine(tmp_path, nodes=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "backbone: {model_name: mmfl-tiny}\n"
        "tasks:\n  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 2, labeled_fraction: 0.5,"
        " shots: 4, max_test_examples: 30}\n"
        "parts:\n  - class_path: mmfl.prompts.BackboneProjections\n"
        "training: {accelerator: cpu, max_steps: 2, pseudo_labels: {top_k: 3, threshold: 0.0, mixup: 0.5,"
        " start_round: 2}}\n"
        "federation: {rounds: 2}\n"
    )
    out = tmp_path / "flower-run"
    args = ["flower-app", "-c", str(recipe), "--app_dir", str(tmp_path / "app"), "--output_dir", str(out)]
    assert cli.main(args) == 0
    procs = Processes(env, tmp_path)
    try:
        done = flwr(env, "run", str(tmp_path / "app"), "local", "--stream")
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        procs.stop_all()
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    # round 1: the unlabeled client waits (start_round 2); it is not asked, so nothing failed
    assert {(r[4], r[5]) for r in rows if r[0] == "1" and r[1] in ("client", "node")} == {("digits/image/0", "fit")}
    assert {(r[4], r[5]) for r in rows if r[0] == "2" and r[1] == "client"} == {
        ("digits/image/0", "fit"),
        ("digits/image/1", "fit_unlabeled"),
        ("digits/image/1", "pseudo_labels"),
    }
    pseudo = next(r for r in rows if r[5] == "pseudo_labels")
    assert 0 < int(pseudo[8]) <= 30 and 0 < float(pseudo[9]) <= 1  # kept at most top_k × 10 classes
    local = in_process(recipe, tmp_path / "in-process")
    flower = load_file(out / "global.safetensors")
    assert sorted(flower) == sorted(local) == ["global/align.delta.text_projection", "global/align.delta.visual_proj"]
    for k in flower:
        assert (flower[k] - local[k]).abs().max() < 1e-5, k
