"""Mixed scopes in real federations: the ends of a mix are the plain scopes' runs, a mix needs groups to mix, a run
of mixed and component scopes with a stateful server optimizer resumes bit-identical, and ``own=val`` chooses
each group's share on its tasks' validation split."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from mmfl.backbone import Backbone
from mmfl.data import InMemory, SklearnDigits, Task, prepare_task
from mmfl.federated import FedAvgM, Federation, LocalTraining, Simulation
from mmfl.federated.mixing import SHARES, choose_share
from mmfl.prompts import CoOp, ProjectionTuning

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digit_sentences() -> InMemory:
    texts = [f"the digit {w} number {i}" for w in DIGITS for i in range(3)]
    return InMemory({"text": texts, "label": [d for d in range(10) for _ in range(3)]}, DIGITS, input_column="text")


@pytest.fixture(scope="module")
def two_modalities() -> list:
    return [
        prepare_task(Task("digits", SklearnDigits(), clients=2, shots=2, max_test_examples=20)),
        prepare_task(Task("digits", _digit_sentences(), modality="text", clients=2)),
    ]


def _sim(bb: Backbone, tasks: list, scope: str, rounds: int = 2, **fed) -> Simulation:
    training = LocalTraining(max_steps=2, batch_size=8, accelerator="cpu", optimizer=lambda p: torch.optim.SGD(p, lr=1))
    parts = [functools.partial(CoOp, ctx_init="a photo of a", scope=scope)]
    return Simulation(bb, tasks, parts, training, Federation(rounds=rounds, **fed), seed=1)


def _run(sim: Simulation) -> dict[str, torch.Tensor]:
    for rnd in range(1, sim.federation.rounds + 1):
        sim.run_round(rnd)
    return sim.global_state


def test_the_ends_of_a_mix_are_the_runs_of_the_plain_scopes(tiny_backbone: Backbone, two_modalities: list) -> None:
    img, txt = "task_modality/digits/image/coop.ctx", "task_modality/digits/text/coop.ctx"
    by_group = _run(_sim(tiny_backbone, two_modalities, "task_modality"))
    kept = _run(_sim(tiny_backbone, two_modalities, "mix(task_modality, task, own=1)"))
    assert sorted(kept) == sorted(by_group) == [img, txt]
    assert torch.equal(kept[img], by_group[img]) and torch.equal(kept[txt], by_group[txt])
    assert not torch.equal(by_group[img], by_group[txt])
    whole = _run(_sim(tiny_backbone, two_modalities, "task"))["task/digits/coop.ctx"]
    shared = _run(_sim(tiny_backbone, two_modalities, "mix(task_modality, task, own=0)"))
    assert torch.equal(shared[img], whole) and torch.equal(shared[txt], whole)
    half = _run(_sim(tiny_backbone, two_modalities, "mix(task_modality, task, own=0.5)"))
    assert not torch.equal(half[img], half[txt])  # each group keeps a view of its own
    assert not torch.equal(half[img], kept[img]) and not torch.equal(half[img], whole)


def test_each_node_of_a_mix_receives_its_own_group_s_tensor(tiny_backbone: Backbone, two_modalities: list) -> None:
    sim = _sim(tiny_backbone, two_modalities, "mix(task_modality, task, own=0.5)", rounds=1)
    assert [c.module.trainable_keys() for c in sim.clients] == [
        ["task_modality/digits/image/coop.ctx"],
        ["task_modality/digits/image/coop.ctx"],
        ["task_modality/digits/text/coop.ctx"],
        ["task_modality/digits/text/coop.ctx"],
    ]
    assert set(sim.mixing) == {"task_modality/digits/image/coop.ctx", "task_modality/digits/text/coop.ctx"}
    assert {r.wide for r in sim.mixing.values()} == {"task/digits/coop.ctx"}


def test_resume_of_mixed_and_component_scopes_is_bit_identical(
    tiny_backbone: Backbone, two_modalities: list, tmp_path: Path
) -> None:
    """Mixing and components with FedAvgM (a momentum buffer per group key) and a sampler: 2 rounds, stop, resume to
    4, against 4 rounds straight."""
    training = LocalTraining(max_steps=2, batch_size=8, accelerator="cpu", optimizer=lambda p: torch.optim.SGD(p, lr=1))
    parts = [
        functools.partial(CoOp, n_ctx=2, scope="mix(task_modality, task, others=0.3)"),
        functools.partial(ProjectionTuning, side="text", scope="task+task_modality"),
    ]

    def sim(rounds: int, out: Path) -> Simulation:
        fed = Federation(rounds=rounds, fraction=0.75, aggregator=FedAvgM(momentum=0.5))
        return Simulation(tiny_backbone, two_modalities, parts, training, fed, seed=2, output_dir=out)

    straight = sim(4, tmp_path / "straight")
    straight.run()
    first = sim(2, tmp_path / "stopped")
    first.run()
    resumed = sim(4, tmp_path / "stopped")
    assert resumed.resume(tmp_path / "stopped") == 2
    resumed.run()
    assert sorted(straight.global_state) == sorted(resumed.global_state)
    assert any(k.startswith("task/digits/proj") for k in straight.global_state)
    for k, v in straight.global_state.items():
        assert torch.equal(v, resumed.global_state[k]), k
    assert straight.federation.aggregator.buffers.keys() == resumed.federation.aggregator.buffers.keys()
    assert (tmp_path / "straight" / "metrics.csv").read_bytes() == (tmp_path / "stopped" / "metrics.csv").read_bytes()


@pytest.fixture(scope="module")
def with_val() -> list:
    return [
        prepare_task(Task("digits", SklearnDigits(), clients=2, shots=2, max_test_examples=20), val_fraction=0.1),
        prepare_task(Task("digits", _digit_sentences(), modality="text", clients=2), val_fraction=0.3),
    ]


def test_own_val_chooses_each_share_on_its_tasks_validation_split(tiny_backbone: Backbone, with_val: list) -> None:
    sim = _sim(tiny_backbone, with_val, "mix(task_modality, task, own=val)")
    sim.run()  # evaluates every round
    groups = {"task_modality/digits/image": "image", "task_modality/digits/text": "text"}
    chosen = [r for r in sim.metrics.rows if r["split"] == "mix_share"]
    assert [(r["round"], r["note"]) for r in chosen] == [(rnd, g) for rnd in (1, 2) for g in groups]
    for r in chosen:
        assert r["value"] in SHARES and r["examples"] == len(with_val[r["note"] == "task_modality/digits/text"].val)
        # the chosen state is the round's new global state: the task's own validation row scores it the same
        (val,) = [
            v
            for v in sim.metrics.rows
            if v["round"] == r["round"] and v["split"] == "val" and v["modality"] == groups[r["note"]]
        ]
        assert val["level"] == "task" and val["accuracy"] == pytest.approx(r["accuracy"], abs=1e-6)
    # the choice itself: an own merge (the image group's tensor now) against a garbled wide one, each share scored
    key = "task_modality/digits/image/coop.ctx"
    own = sim.global_state[key].double()
    wide = own + 3.0 * torch.randn(own.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    correct = {}
    for a in SHARES:
        module = sim.evaluator(with_val[0])
        module.load_trainable_state_dict({key: a * own + (1 - a) * wide})
        correct[a] = sim.correct(module, with_val[0].val)
        accuracy = sim.evaluate(module, with_val[0], with_val[0].val)["accuracy"]
        assert correct[a].shape == (len(with_val[0].val),)
        assert correct[a].double().mean().item() == pytest.approx(accuracy, abs=1e-6)
    best = choose_share(correct)  # the one-standard-error rule (tested by hand in test_mixing)
    assert sim.share_chooser(9)({"task_modality/digits/image": [(key, own, wide)]}, {}) == {
        "task_modality/digits/image": best
    }
    assert sim.metrics.rows[-1]["accuracy"] == pytest.approx(correct[best].double().mean().item(), abs=1e-6)
    assert sim.metrics.rows[-1]["value"] == best
    assert sim.share_chooser(9)({"task_modality/digits/image": [(key, own, own)]}, {}) == {
        "task_modality/digits/image": 1.0  # every share scores the same: the own merge
    }


def test_own_val_without_validation_data_is_refused_before_training(
    tiny_backbone: Backbone, two_modalities: list
) -> None:
    with pytest.raises(ValueError, match=r"own=val.*\['digits/image', 'digits/text'\].*evaluation.val_fraction"):
        _sim(tiny_backbone, two_modalities, "mix(task_modality, task, own=val)")


def test_own_val_resumes_bit_identical(tiny_backbone: Backbone, with_val: list, tmp_path: Path) -> None:
    """The shares are chosen afresh each round from the merges and the validation data: nothing to carry over."""
    training = LocalTraining(max_steps=2, batch_size=8, accelerator="cpu", optimizer=lambda p: torch.optim.SGD(p, lr=1))
    parts = [functools.partial(CoOp, ctx_init="a photo of a", scope="mix(task_modality, task, own=val)")]

    def sim(rounds: int, out: Path) -> Simulation:
        return Simulation(tiny_backbone, with_val, parts, training, Federation(rounds=rounds), seed=1, output_dir=out)

    straight = sim(3, tmp_path / "straight")
    straight.run()
    sim(1, tmp_path / "stopped").run()
    resumed = sim(3, tmp_path / "stopped")
    assert resumed.resume(tmp_path / "stopped") == 1
    resumed.run()
    for k, v in straight.global_state.items():
        assert torch.equal(v, resumed.global_state[k]), k
    assert (tmp_path / "straight" / "metrics.csv").read_bytes() == (tmp_path / "stopped" / "metrics.csv").read_bytes()
