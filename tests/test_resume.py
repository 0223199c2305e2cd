"""Round checkpoints and exact resume: a run killed with SIGKILL at a random moment and resumed ends bit-identical
to an uninterrupted one; a damaged checkpoint gives a clear error and leaves the run folder as it was."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmfl import cli
from mmfl.federated.checkpoint import save_state

# Everything a round depends on: a sampler (fraction < 1), a server optimizer with state (FedAvgM), personal
# tensors (PromptFolio's local context), a part with its own learning rate (DePT's head), best-by-validation
# selection, AdamW, a Dirichlet split.
RECIPE = """\
seed: 3
backbone: {model_name: mmfl-tiny}
tasks:
  - name: digits
    data: {class_path: mmfl.data.SklearnDigits}
    clients: 4
    partitioner:
      class_path: flwr_datasets.partitioner.DirichletPartitioner
      init_args: {partition_by: label, alpha: 1.0, min_partition_size: 5, seed: 0}
    shots: 4
    local_test_fraction: 0.25
    max_test_examples: 40
parts:
  - class_path: mmfl.prompts.PromptFolio
    init_args: {n_ctx: 2, fraction: 0.3, scope: task}
  - class_path: mmfl.prompts.DecoupledHead
training:
  max_steps: 2
  batch_size: 8
  optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.05}}
  accelerator: cpu
federation:
  rounds: 6
  fraction: 0.5
  aggregator:
    class_path: mmfl.federated.FedAvgM
    init_args: {server_lr: 1.0, momentum: 0.5}
evaluation: {val_fraction: 0.2, selection: best_val}
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = str(random.randrange(1000))  # nothing may depend on Python's hash order
    return env


def _fit(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mmfl", "fit", *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _round_of(ckpt: Path) -> int:
    try:
        with safe_open(ckpt, "pt") as f:
            return int(f.metadata()["round"])
    except Exception:  # not there yet (or being replaced: rename is atomic, so this is only a missing file)
        return -1


def _outputs(run: Path) -> dict[str, object]:
    """What a finished run leaves, tensor by tensor and byte by byte."""
    out: dict[str, object] = {"metrics.csv": (run / "metrics.csv").read_bytes()}
    for f in sorted(run.rglob("*.safetensors")):
        state = load_file(f)
        out[str(f.relative_to(run))] = {k: v for k, v in state.items() if not k.startswith("rng::")}
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], bytes):
            assert a[name] == b[name], f"{name} differs"
        else:
            assert a[name].keys() == b[name].keys(), name
            for k in a[name]:
                assert torch.equal(a[name][k], b[name][k]), f"{name}: {k} differs"


def test_two_runs_of_one_recipe_and_seed_write_byte_identical_files(tmp_path: Path) -> None:
    """Separate processes (each with its own hash seeds): the safetensors headers' metadata maps must come out in
    one order, so a checksum of a run's files identifies its result."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    runs = [_fit("-c", str(recipe), "--output_dir", str(tmp_path / name), "--federation.rounds=2") for name in "ab"]
    for p in runs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    names = ["global.safetensors", "checkpoint.safetensors", "best.safetensors", "metrics.csv"]
    for name in names:
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest(), f"{name} differs"
    with safe_open(tmp_path / "a" / "checkpoint.safetensors", "pt") as f:
        meta = f.metadata()
    assert len(meta) > 5 and meta["round"] == "2"  # enough keys that a random order would show


def test_canonical_header_sorts_the_metadata_and_keeps_the_tensors(tmp_path: Path) -> None:
    meta = {f"k{i}": f"v{i}" for i in (5, 1, 9, 3, 7, 0, 8)} | {"é": 'quote " and\nnewline'}
    state = {"b": torch.arange(3.0), "a": torch.ones(2, 2, dtype=torch.float16)}
    files = []
    for i in range(4):  # safetensors' map order changes from one map to the next, even in one process
        save_state(tmp_path / f"{i}.safetensors", state, meta)
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    n = int.from_bytes(files[0][:8], "little")
    assert n % 8 == 0  # the format's alignment
    header = files[0][8 : 8 + n].decode()
    assert header.index('"k0"') < header.index('"k1"') < header.index('"k9"') < header.index('"é"')
    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert f.metadata() == meta
    back = load_file(tmp_path / "0.safetensors")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    t0 = time.monotonic()
    ref = _fit("-c", str(recipe), "--output_dir", str(tmp_path / "ref"))
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    total = time.monotonic() - t0

    rng = random.Random()
    run = tmp_path / "killed"
    kills = []
    proc = _fit("-c", str(recipe), "--output_dir", str(run))
    for attempt in range(2):  # killed twice: once in the first run, once while resuming
        start = time.monotonic()
        # a random moment between the first checkpoint and the (estimated) end of the run
        while _round_of(run / "checkpoint.safetensors") < 0 and proc.poll() is None:
            time.sleep(0.05)
        delay = rng.uniform(0, max(0.5, total - (time.monotonic() - start)) * 0.6)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append((attempt, round(delay, 2), _round_of(run / "checkpoint.safetensors")))
        proc = _fit("-c", str(recipe), "--resume", str(run))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    print(f"killed at (attempt, delay s, last complete round): {kills}")
    assert kills, "the run ended before it could be killed"
    _same(_outputs(tmp_path / "ref"), _outputs(run))


def test_resume_in_process_extends_and_refuses_another_recipe(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("rounds: 6", "rounds: 2"))
    assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(tmp_path / "a")]) == 0
    assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(tmp_path / "ref"), "--federation.rounds=4"]) == 0
    # a finished run resumed as it is: nothing to do, nothing changed
    before = _outputs(tmp_path / "a")
    assert cli.main(["fit", "--resume", str(tmp_path / "a")]) == 0
    _same(before, _outputs(tmp_path / "a"))
    # another recipe is refused, naming what differs; the run is untouched
    assert cli.main(["fit", "-c", str(recipe), "--resume", str(tmp_path / "a"), "--training.max_steps=3"]) == 2
    assert "differs from the one the run started with in training.max_steps" in capsys.readouterr().err
    assert cli.main(["fit", "-c", str(recipe), "--resume", str(tmp_path / "a"), "--seed=4"]) == 2
    assert "seed" in capsys.readouterr().err
    _same(before, _outputs(tmp_path / "a"))
    # a copy elsewhere (its config.yaml names the old folder) resumes in its new place
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    assert cli.main(["fit", "--resume", str(tmp_path / "elsewhere" / "b"), "--federation.rounds=4"]) == 0
    _same(_outputs(tmp_path / "ref"), _outputs(tmp_path / "elsewhere" / "b"))
    _same(before, _outputs(tmp_path / "a"))  # the original is left as it was
    # extended by two rounds, it equals a 4-round run
    assert cli.main(["fit", "-c", str(recipe), "--resume", str(tmp_path / "a"), "--federation.rounds=4"]) == 0
    _same(_outputs(tmp_path / "ref"), _outputs(tmp_path / "a"))


def _digest(run: Path) -> dict[str, str]:
    return {str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest() for f in run.rglob("*") if f.is_file()}


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "metadata", "rng"])
def test_a_damaged_checkpoint_is_a_clear_error_and_the_run_is_left_intact(tmp_path: Path, capsys, damage) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("rounds: 6", "rounds: 1"))
    run = tmp_path / "a"
    assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(run)]) == 0
    ckpt = run / "checkpoint.safetensors"
    data = ckpt.read_bytes()
    if damage == "truncate":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"\x00" * 64)
    elif damage == "foreign":
        (run / "global.safetensors").replace(ckpt)  # a valid safetensors file, but not a checkpoint
    else:  # a well-formed file whose content mmfl did not write: edited metadata, an impossible RNG state
        with safe_open(ckpt, "pt") as f:
            meta = f.metadata()
        tensors = load_file(ckpt)
        if damage == "metadata":
            meta["rng"] = '{"python": 1}'
        else:
            tensors["rng::python"][3] = -7
        save_state(ckpt, tensors, meta)
    before = _digest(run)
    assert cli.main(["fit", "-c", str(recipe), "--resume", str(run), "--federation.rounds=2"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.safetensors" in err
    expected = {"foreign": "not an mmfl round checkpoint", "metadata": "damaged checkpoint: its rng entry"}
    expected["rng"] = "damaged checkpoint: its rng tensors entry"
    assert expected.get(damage, "truncated or corrupt") in err, err
    assert _digest(run) == before


def test_resume_of_a_folder_without_a_run(tmp_path: Path, capsys) -> None:
    assert cli.main(["fit", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no run there" in capsys.readouterr().err or "nothing" in capsys.readouterr().err
