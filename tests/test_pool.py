"""One module per (task, modality), each client's own state swapped in (:mod:`mmfl.federated.pool`): the same
tensors, bit for bit, as a module per client, for parts with local tensors; one module per (task, modality)."""

from __future__ import annotations

import functools
import gc

import pytest
import torch

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.federated import Federation, LocalTraining, Simulation
from mmfl.module import ClientModule
from mmfl.prompts import ClipAdapter, CoOp, MaPLe, PromptFolio

PARTS = {  # each with tensors every client keeps to itself, initialised at random per client where it can be
    "coop with a local low-rank term": [functools.partial(CoOp, n_ctx=2, local_rank=2)],
    "promptfolio": [functools.partial(PromptFolio, n_ctx=2, ctx_init=None)],
    "maple and a local adapter": [
        functools.partial(MaPLe, depth=2, scope="task"),
        functools.partial(ClipAdapter, scope="local"),
    ],
}


@pytest.fixture(scope="module")
def tasks() -> list:
    """Two tasks (different random draws per task: the RNG order across tasks matters), three clients each."""
    return [
        prepare_task(Task(name, SklearnDigits(seed=i), clients=3, shots=2, max_test_examples=20))
        for i, name in enumerate(["left", "right"])
    ]


def _run(backbone: Backbone, tasks: list, parts: list, per_client: bool) -> Simulation:
    training = LocalTraining(max_steps=2, batch_size=4, accelerator="cpu", feature_cache="off")
    training.optimizer = lambda p: torch.optim.SGD(p, lr=0.5)
    fed = Federation(rounds=3, fraction=0.5, eval_every=2)  # 3 of 6 per round: some clients wait, some train twice
    sim = Simulation(backbone, tasks, parts, training, fed, seed=5, per_client_modules=per_client)
    sim.run()
    return sim


@pytest.mark.parametrize("name", list(PARTS))
def test_pooled_modules_give_the_per_client_tensors_bit_for_bit(tiny_backbone: Backbone, tasks, name: str) -> None:
    pooled = _run(tiny_backbone, tasks, PARTS[name], per_client=False)
    own = _run(tiny_backbone, tasks, PARTS[name], per_client=True)
    assert pooled.global_state.keys() == own.global_state.keys()
    for k in own.global_state:
        assert torch.equal(pooled.global_state[k], own.global_state[k]), k
    trained = 0
    for a, b in zip(pooled.clients, own.clients, strict=True):
        la, lb = a.local_state(), b.local_state()
        assert la.keys() == lb.keys() and la, a.data.cid
        for k in la:
            assert torch.equal(la[k], lb[k]), (a.data.cid, k)
        trained += not torch.equal(la[next(iter(la))], pooled.initial_local(a.task)[next(iter(la))])
    assert trained >= 2  # the sampled clients' local tensors moved (and the others' stayed their own)
    assert [r for r in pooled.metrics.rows] == [r for r in own.metrics.rows]  # losses, accuracies, norms


def test_one_module_per_task_and_modality(tiny_backbone: Backbone, tasks) -> None:
    def is_module(o: object) -> bool:
        try:
            return isinstance(o, ClientModule)
        except ReferenceError:  # a dead weakref.proxy (some libraries keep them) cannot be inspected
            return False

    def modules() -> int:
        gc.collect()
        return sum(is_module(o) for o in gc.get_objects())

    before = modules()
    sim = _run(tiny_backbone, tasks, PARTS["promptfolio"], per_client=False)
    assert len({id(c.shared) for c in sim.clients}) == 2  # one per task, for its three clients
    assert modules() - before == 2 + len(sim._evaluators)  # nothing else holds a module
    a, b = sim.clients[0], sim.clients[1]
    ctx_a = a.module.parts["folio"].ctx_local.detach().clone()
    assert a.module is b.module  # the same module, lent to each in turn ...
    (key,) = b.local  # folio.ctx_local, its one local tensor
    assert torch.equal(b.module.parts["folio"].ctx_local, b.local[key])
    assert torch.equal(a.module.parts["folio"].ctx_local, ctx_a)  # ... with each one's own tensors in


def test_a_checkpoint_keeps_only_touched_clients_local_tensors_and_resumes_exactly(
    tiny_backbone: Backbone, tasks, tmp_path
) -> None:
    from mmfl.federated.resume import CHECKPOINT, load_checkpoint

    parts = PARTS["coop with a local low-rank term"]

    def sim(out, rounds: int) -> Simulation:
        training = LocalTraining(max_steps=2, batch_size=4, accelerator="cpu", feature_cache="off")
        training.optimizer = lambda p: torch.optim.SGD(p, lr=0.5)
        fed = Federation(rounds=rounds, fraction=0.5, eval_every=10)  # 3 of 6 clients per round
        return Simulation(tiny_backbone, tasks, parts, training, fed, seed=5, output_dir=out)

    first = sim(tmp_path / "run", rounds=1)
    first.run()
    sampled = {first.clients[i].data.cid for i in first.sample(1)}
    kept = set(load_checkpoint(tmp_path / "run" / CHECKPOINT).clients("client"))
    assert kept == sampled and len(kept) == 3  # the untrained clients' tensors are not written
    assert all(c.touched == (c.data.cid in sampled) for c in first.clients)

    resumed = sim(tmp_path / "run", rounds=3)
    assert resumed.resume(tmp_path / "run") == 1
    resumed.run()
    whole = sim(tmp_path / "whole", rounds=3)
    whole.run()
    for a, b in zip(resumed.clients, whole.clients, strict=True):  # trained before, after, or never
        la, lb = a.local_state(), b.local_state()
        assert la.keys() == lb.keys() and la
        for k in la:
            assert torch.equal(la[k], lb[k]), (a.data.cid, k)
    for k in whole.global_state:
        assert torch.equal(resumed.global_state[k], whole.global_state[k]), k
