"""In-process simulation: per-scope merging, one backbone, determinism, sampling, and learning."""

from __future__ import annotations

import functools
import gc

import lightning as L
import open_clip
import pytest
import torch

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.federated import Federation, LocalTraining, Simulation
from mmfl.prompts import CoOp


@pytest.fixture(scope="module")
def two_tasks() -> list:
    """Two tasks over the digits (different names → different task keys), two clients each."""
    return [
        prepare_task(Task(name, SklearnDigits(seed=i), clients=2, shots=3, max_test_examples=40))
        for i, name in enumerate(["left", "right"])
    ]


def _sim(
    bb: Backbone, tasks, rounds: int = 1, seed: int = 0, fraction: float = 1.0, per_client: bool = False, **coop
) -> Simulation:
    parts = [functools.partial(CoOp, n_ctx=2, **coop)]
    training = LocalTraining(
        max_steps=2, batch_size=8, accelerator="cpu", optimizer=lambda p: torch.optim.SGD(p, lr=0.5)
    )
    fed = Federation(rounds=rounds, fraction=fraction)
    return Simulation(bb, tasks, parts, training, fed, seed=seed, per_client_modules=per_client)


def _weighted_mean(sim: Simulation, clients: list) -> torch.Tensor:
    total = sum(len(c.data.train) for c in clients)
    return sum(c.module.parts["coop"].ctx.detach().double() * len(c.data.train) for c in clients) / total


def test_task_tensors_merge_within_their_task_only(tiny_backbone: Backbone, two_tasks) -> None:
    sim = _sim(tiny_backbone, two_tasks, per_client=True)  # each client's module keeps its trained tensors
    sim.run_round(1)
    assert sorted(sim.global_state) == ["task/left/coop.ctx", "task/right/coop.ctx"]
    for task in ("left", "right"):
        mine = [c for c in sim.clients if c.task.name == task]
        expected = _weighted_mean(sim, mine).float()  # the clients still hold their trained tensors
        assert torch.allclose(sim.global_state[f"task/{task}/coop.ctx"], expected, atol=1e-7)
    assert not torch.allclose(sim.global_state["task/left/coop.ctx"], sim.global_state["task/right/coop.ctx"])


def test_global_scope_merges_across_tasks(tiny_backbone: Backbone, two_tasks) -> None:
    sim = _sim(tiny_backbone, two_tasks, scope="global", per_client=True)
    sim.run_round(1)
    assert list(sim.global_state) == ["global/coop.ctx"]
    assert torch.allclose(sim.global_state["global/coop.ctx"], _weighted_mean(sim, sim.clients).float(), atol=1e-7)


def test_local_scope_never_leaves_the_client(tiny_backbone: Backbone, two_tasks) -> None:
    sim = _sim(tiny_backbone, two_tasks, scopes={"ctx": "local"})
    sim.run_round(1)
    assert sim.global_state == {}
    ctxs = [c.module.parts["coop"].ctx.detach().clone() for c in sim.clients]  # (a pooled module is lent)
    assert not torch.equal(ctxs[0], ctxs[1])  # each client kept its own


def test_one_backbone_shared_by_every_client(tiny_backbone: Backbone, two_tasks) -> None:
    def is_model(o: object) -> bool:
        try:
            return isinstance(o, open_clip.CLIP | open_clip.CustomTextCLIP)
        except ReferenceError:  # a dead weakref.proxy (some libraries keep them) cannot be inspected
            return False

    def count_models() -> int:
        gc.collect()
        return sum(is_model(o) for o in gc.get_objects())

    before = count_models()
    sim = _sim(tiny_backbone, two_tasks, rounds=1)
    sim.run()
    assert count_models() == before  # the simulation built no model of its own
    modules = [c.module for c in sim.clients] + list(sim._evaluators.values())
    assert all(m.backbone is tiny_backbone for m in modules)
    assert all(p.backbone is tiny_backbone for m in modules for p in m.parts.values())
    frozen = {id(t) for t in tiny_backbone.model.parameters()}
    for m in modules:  # no client owns (a copy of) a frozen tensor
        assert all(id(t) not in frozen for t in m.parameters())
        assert sum(t.numel() for t in m.parameters()) == 2 * tiny_backbone.text_width


def test_same_seed_same_result_other_seed_other_result(tiny_backbone: Backbone, two_tasks) -> None:
    a = _sim(tiny_backbone, two_tasks, rounds=2, seed=3).run()
    b = _sim(tiny_backbone, two_tasks, rounds=2, seed=3).run()
    c = _sim(tiny_backbone, two_tasks, rounds=2, seed=4).run()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fraction_samples_clients_deterministically(tiny_backbone: Backbone, two_tasks) -> None:
    sim = _sim(tiny_backbone, two_tasks, rounds=3, fraction=0.5)
    assert [len(sim.sample(r)) for r in (1, 2, 3)] == [2, 2, 2]
    assert sim.sample(2) == _sim(tiny_backbone, two_tasks, fraction=0.5).sample(2)
    sim.run()
    fits = [r for r in sim.metrics.rows if r["split"] == "fit"]
    assert len(fits) == 6


def test_training_beats_the_start(tiny_backbone: Backbone) -> None:
    task = prepare_task(Task("digits", SklearnDigits(), clients=3, max_test_examples=200))
    parts = [functools.partial(CoOp, n_ctx=4, class_specific=True)]
    training = LocalTraining(
        epochs=1, batch_size=32, accelerator="cpu", optimizer=lambda p: torch.optim.AdamW(p, lr=0.02)
    )
    sim = Simulation(tiny_backbone, [task], parts, training, Federation(rounds=3), seed=0)
    sim.run()
    acc = {r["round"]: r["accuracy"] for r in sim.metrics.rows if r["level"] == "task"}
    assert acc[3] > acc[0] + 0.05, acc


def test_no_frozen_tensor_is_duplicated_per_client(tiny_backbone: Backbone) -> None:
    """Count the storages of every live tensor shaped like one of the backbone's large frozen tensors: 8 clients
    hold no more of them than 1 (clients cost their trainable tensors only), and client data are views of one
    shared table."""

    frozen = tiny_backbone.model.state_dict().values()
    floor = sorted(t.numel() for t in frozen)[-20]
    shapes = {tuple(t.shape) for t in frozen if t.numel() >= floor}  # the 20 largest frozen tensors' shapes

    def big_storages() -> set[int]:
        gc.collect()
        out = set()
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor) and tuple(o.shape) in shapes:
                    out.add(o.untyped_storage().data_ptr())
            except (ReferenceError, RuntimeError):
                continue
        return out

    def federation(n: int) -> Simulation:
        tasks = [prepare_task(Task("digits", SklearnDigits(), clients=n, shots=2, max_test_examples=10))]
        sim = _sim(tiny_backbone, tasks)
        sim.run_round(1)
        return sim

    one = federation(1)
    base = big_storages()
    del one
    eight = federation(8)
    assert len(big_storages() - base) == 0  # nothing large was allocated per client

    def buffers(ds) -> set[int]:  # where the inputs (the bulk of the data) live
        column = ds.data.table.column("image")
        return {b.address for ch in column.chunks for b in ch.buffers() if b is not None}

    per_client = [buffers(c.data.train) for c in eight.clients]
    union = set().union(*per_client)
    # views of one table (stored in a chunk or two) share its buffers; 8 copies would give 8 times as many
    assert per_client[0] and len(union) <= 2 * len(per_client[0])


def test_clients_keep_no_trainer_or_optimizer_state_between_rounds(tiny_backbone: Backbone) -> None:
    """After a round (fits and evaluations) no client or evaluator module holds its last Trainer, so no optimizer
    state (Adam's moments: twice the trainable tensors) stays alive per client."""
    tasks = [prepare_task(Task("digits", SklearnDigits(), clients=3, shots=2, max_test_examples=10))]
    sim = _sim(tiny_backbone, tasks)
    sim.training.optimizer = lambda p: torch.optim.Adam(p, lr=0.01)
    sim.run_round(1)
    sim.evaluate_tasks(1)
    gc.collect()
    assert all(c.module._trainer is None for c in sim.clients)
    params = {id(p) for c in sim.clients for p in c.module.parameters()}
    modules = {id(c.module) for c in sim.clients}

    def ours(o: object) -> bool:  # a Trainer or optimizer of this simulation's clients (not other tests')
        if isinstance(o, torch.optim.Optimizer):
            return any(id(p) in params for p in o.param_groups[0]["params"])
        return isinstance(o, L.Trainer) and id(o.strategy._lightning_module) in modules

    alive = []
    for o in gc.get_objects():
        try:
            if ours(o):
                alive.append(o)
        except ReferenceError:  # a weak proxy whose object is gone
            continue
    assert alive == []
