"""``evaluation.selection: average``: the window, the mean against hand-kept states, exact resume, the outputs."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmfl import cli
from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.evaluation.protocol import Protocol
from mmfl.evaluation.runner import load_checkpoint
from mmfl.federated import Federation, LocalTraining, Simulation
from mmfl.federated.averaging import AVERAGE, window_start
from mmfl.progress import NoProgress
from mmfl.prompts import PromptFolio

RECIPE = """\
seed: 1
backbone: {model_name: mmfl-tiny}
tasks:
  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 3, shots: 3, max_test_examples: 30}
parts:
  - class_path: mmfl.prompts.PromptFolio
    init_args: {n_ctx: 2, fraction: 0.3, scope: task}
training: {max_steps: 2, batch_size: 8, accelerator: cpu}
federation: {rounds: ROUNDS, fraction: 0.5}
evaluation: {selection: average}
"""


@pytest.mark.parametrize(
    ("rounds", "k", "first"), [(4, None, 3), (5, None, 3), (1, None, 1), (6, 2, 5), (6, 6, 1), (6, 1, 6), (1, 2, 1)]
)
def test_the_window_is_the_last_k_rounds_or_the_last_half(rounds: int, k: int | None, first: int) -> None:
    assert window_start(rounds, k) == first  # (1, 2): a recipe's 2 rounds with --federation.rounds=1: all of them


@pytest.mark.parametrize("k", [0, -3])
def test_a_window_of_no_rounds_is_a_clear_error(k: int) -> None:
    with pytest.raises(ValueError, match="average_rounds must be >= 1"):
        window_start(4, k)


def test_the_protocol_refuses_average_rounds_without_averaging() -> None:
    with pytest.raises(ValueError, match="set selection: average"):
        Protocol(selection="last", average_rounds=2).check([])
    with pytest.raises(ValueError, match="average_rounds must be >= 1"):
        Protocol(selection="average", average_rounds=0).check([])
    Protocol(selection="average", average_rounds=2).check([])  # fine


class _Keep(NoProgress):
    """Keeps the merged and local tensors after every round; raises at ``stop`` (a run stopped after its commit)."""

    def __init__(self, sim: Simulation, stop: int | None = None) -> None:
        self.sim, self.stop_at, self.states = sim, stop, {}

    def round_end(self, rnd: int) -> None:
        local = {c.data.cid: c.local_state() for c in self.sim.clients}
        self.states[rnd] = ({k: v.clone() for k, v in self.sim.global_state.items()}, local)
        if rnd == self.stop_at:
            raise KeyboardInterrupt


def _sim(bb: Backbone, out: Path | None, rounds: int = 4, k: int | None = 3) -> Simulation:
    task = prepare_task(Task("digits", SklearnDigits(), clients=3, shots=3, max_test_examples=30))
    parts = [functools.partial(PromptFolio, n_ctx=2, fraction=0.3)]  # a merged context and a local one per client
    training = LocalTraining(max_steps=2, batch_size=8, accelerator="cpu")
    fed = Federation(rounds=rounds, fraction=0.5)  # 2 of 3 clients a round: an unsampled client's state counts too
    return Simulation(bb, [task], parts, training, fed, seed=0, output_dir=out, selection="average", average_rounds=k)


def test_the_evaluated_state_is_the_mean_of_the_windows_states(tiny_backbone: Backbone, tmp_path: Path) -> None:
    sim = _sim(tiny_backbone, tmp_path)
    sim.progress = keep = _Keep(sim)
    sim.run()
    glob, local = sim.selected()
    (g2, l2), (g3, l3), (g4, l4) = (keep.states[r] for r in (2, 3, 4))  # rounds 2–4: the last 3 of 4
    assert set(glob) == set(g4) and glob.keys() and all(local.values())
    for k in glob:
        assert torch.allclose(glob[k], (g2[k] + g3[k] + g4[k]) / 3, atol=1e-6), k
        assert not torch.allclose(glob[k], g4[k], atol=1e-4), k  # the mean, not the last round's
    for cid, state in local.items():
        for k in state:
            assert torch.allclose(state[k], (l2[cid][k] + l3[cid][k] + l4[cid][k]) / 3, atol=1e-6), (cid, k)
    written = load_file(tmp_path / AVERAGE)
    assert written.keys() == glob.keys() and all(torch.equal(written[k], glob[k]) for k in glob)
    rows = [r for r in sim.metrics.rows if r["level"] == "average"]
    assert {(r["round"], r["split"]) for r in rows} == {(4, "test")}
    ev = sim.evaluate(sim.evaluator(sim.tasks[0], state=glob), sim.tasks[0], sim.tasks[0].test)
    assert rows[0]["accuracy"] == pytest.approx(ev["accuracy"])  # the row scores the averaged state
    # `mmfl evaluate --checkpoint average.safetensors` reads the averaged local tensors beside it
    state, read = load_checkpoint(sim, tmp_path / AVERAGE)
    assert set(read) == set(local)
    for cid in local:
        assert read[cid].keys() == local[cid].keys()
        assert all(torch.equal(read[cid][k], local[cid][k]) for k in local[cid])


def test_a_run_stopped_inside_the_window_resumes_to_the_same_average(tiny_backbone: Backbone, tmp_path: Path) -> None:
    ref = _sim(tiny_backbone, tmp_path / "ref")
    ref.run()
    sim = _sim(tiny_backbone, tmp_path / "run")
    sim.progress = _Keep(sim, stop=3)  # rounds 2 and 3 of the window are summed when it stops
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    assert not (tmp_path / "run" / AVERAGE).exists()
    again = _sim(tiny_backbone, None)
    assert again.resume(tmp_path / "run") == 3 and again.avg_count == 2
    again.attach_output(tmp_path / "run")
    again.run()
    files = [*sorted((tmp_path / "ref").rglob("*average*/**/*.safetensors")), tmp_path / "ref" / AVERAGE]
    assert len(files) == 4  # the merged tensors and three clients' local ones
    for f in files:
        a, b = load_file(f), load_file(tmp_path / "run" / f.relative_to(tmp_path / "ref"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_extending_a_run_restarts_the_window_or_refuses_what_it_cannot_separate(tmp_path: Path, capsys, caplog) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("ROUNDS", "2"))
    ref = tmp_path / "ref"
    assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(ref), "--federation.rounds=6"]) == 0
    assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(tmp_path / "a")]) == 0
    # 2 → 6 rounds: the window moves to rounds 4–6, after the checkpoint's round: it starts anew, as in the 6-round run
    assert cli.main(["fit", "--resume", str(tmp_path / "a"), "--federation.rounds=6"]) == 0
    for name in (AVERAGE, "global.safetensors"):
        a, b = load_file(ref / name), load_file(tmp_path / "a" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert "averaged over rounds 4–6" in caplog.text
    # 6 → 7 rounds: the window would be rounds 4–7, but the sums hold rounds 4–6 and round 7 is not run yet: fine;
    # 6 → 8 rounds: the window is rounds 5–8, and the sum of rounds 4–6 cannot lose round 4
    before = (tmp_path / "a" / "checkpoint.safetensors").read_bytes()
    assert cli.main(["fit", "--resume", str(tmp_path / "a"), "--federation.rounds=8"]) == 2
    err = capsys.readouterr().err
    assert "holds the average of 3 round(s) up to round 6" in err and "rounds 5–8" in err and "Traceback" not in err
    assert (tmp_path / "a" / "checkpoint.safetensors").read_bytes() == before  # nothing written
    caplog.clear()
    assert cli.main(["fit", "--resume", str(tmp_path / "a"), "--federation.rounds=7"]) == 0
    assert "averaged over rounds 4–7" in caplog.text


class _Rigged(Simulation):
    """Validation accuracy ``avg_val`` for the averaged state (scored once the window's 2 rounds are summed), the
    real one for every round's: so either outcome of the validation choice can be tested."""

    avg_val = 1.0

    def evaluate(self, module, task, ds):
        m = super().evaluate(module, task, ds)
        if ds is task.val and self.avg_count == 2:
            return {**m, "accuracy": self.avg_val}
        return m


@pytest.mark.parametrize("avg_val", [1.0, 0.0])
def test_best_val_keeps_the_average_only_when_validation_prefers_it(
    tiny_backbone: Backbone, tmp_path: Path, avg_val: float
) -> None:
    task = prepare_task(Task("digits", SklearnDigits(), clients=3, shots=3, max_test_examples=30), val_fraction=0.3)
    parts = [functools.partial(PromptFolio, n_ctx=2, fraction=0.3)]
    training = LocalTraining(max_steps=2, batch_size=8, accelerator="cpu")
    args = (tiny_backbone, [task], parts, training, Federation(rounds=4, fraction=0.5))
    sim = _Rigged(*args, seed=0, output_dir=tmp_path, selection="best_val", average_rounds=2)
    sim.avg_val = avg_val
    sim.progress = keep = _Keep(sim)
    sim.run()
    glob, local = sim.selected()
    avg_glob, avg_local = sim.averaged()
    best = load_file(tmp_path / "best.safetensors")
    if avg_val == 1.0:  # above every round's: the average of rounds 3–4 is the state kept
        assert sim.best_average == "3–4" and sim.best_round == 4 and sim.best_score == 1.0
        assert all(torch.equal(glob[k], avg_glob[k]) for k in avg_glob)
        assert all(torch.equal(local[c][k], avg_local[c][k]) for c in avg_local for k in avg_local[c])
        assert all(torch.equal(best[k], avg_glob[k]) for k in avg_glob)
        _, read = load_checkpoint(sim, tmp_path / "best.safetensors")  # `mmfl evaluate --checkpoint` reads it back
        assert all(torch.equal(read[c][k], avg_local[c][k]) for c in avg_local for k in avg_local[c])
    else:  # below: the best round's own state, as without averaging
        vals = {r["round"]: r["accuracy"] for r in sim.metrics.rows if r["level"] == "task" and r["split"] == "val"}
        assert sim.best_average is None and sim.best_round == max(vals, key=lambda r: (vals[r], -r))
        g, loc = keep.states[sim.best_round]
        assert all(torch.equal(glob[k], g[k]) for k in g) and all(torch.equal(best[k], g[k]) for k in g)
        assert all(torch.equal(local[c][k], loc[c][k]) for c in loc for k in loc[c])
    again = Simulation(*args, seed=0, selection="best_val", average_rounds=2)
    assert again.resume(tmp_path) == 4 and again.best_average == sim.best_average  # kept in the checkpoint
    g2, _ = again.selected()
    assert g2.keys() == glob.keys() and all(torch.equal(g2[k], glob[k]) for k in glob)
