"""Client partitions kept as bounds until a client is used (:mod:`mmfl.data.partitions`): the same rows as
flwr-datasets' IID partitions; views made only for the clients a round samples; 10,000 clients in seconds."""

from __future__ import annotations

import functools
import time

import pytest
import torch
from flwr_datasets.partitioner import IidPartitioner

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, partitions, prepare_task
from mmfl.data.partitions import Shard
from mmfl.federated import Federation, LocalTraining, Simulation
from mmfl.prompts import CoOp


class EagerIid(IidPartitioner):
    """flwr-datasets' IID partitioner, each partition made by it (a subclass: prepare_task keeps no bounds)."""


def test_bounds_give_the_rows_of_flwr_datasets_iid_partitions() -> None:
    lazy = prepare_task(Task("digits", SklearnDigits(), clients=7, max_test_examples=20))
    eager = prepare_task(
        Task("digits", SklearnDigits(), clients=7, max_test_examples=20, partitioner=functools.partial(EagerIid))
    )
    assert all(isinstance(c.__dict__["_train"], Shard) for c in lazy.clients)
    assert not any(isinstance(c.__dict__["_train"], Shard) for c in eager.clients)
    assert [c.size for c in lazy.clients] == [len(c.train) for c in eager.clients] == [206] * 2 + [205] * 5
    for a, b in zip(lazy.clients, eager.clients, strict=True):
        assert a.train["label"] == b.train["label"] and a.train["image"] == b.train["image"]
        assert a.train._fingerprint == b.train._fingerprint  # the same view: feature caches see the same data


def test_only_the_sampled_clients_views_are_made(tiny_backbone: Backbone) -> None:
    partitions._views.clear()
    task = prepare_task(Task("digits", SklearnDigits(), clients=200, max_test_examples=20))
    assert not partitions._views  # preparing made none
    training = LocalTraining(max_steps=1, batch_size=4, accelerator="cpu", feature_cache="off")
    sim = Simulation(tiny_backbone, [task], [functools.partial(CoOp, n_ctx=2)], training, Federation(fraction=0.02))
    assert not partitions._views  # nor building the federation
    sim.run_round(1)
    made = {(k[1], k[2]) for k in partitions._views}
    sampled = {
        (task.clients[i].__dict__["_train"].start, task.clients[i].__dict__["_train"].stop) for i in sim.sample(1)
    }
    assert made == sampled and len(made) == 4


def test_kept_views_are_bounded_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partitions, "KEEP", 3)
    partitions._views.clear()
    task = prepare_task(Task("digits", SklearnDigits(), clients=5, max_test_examples=20))
    first = task.clients[0].train
    assert task.clients[0].train is first  # reused while kept
    assert all(len(c.train) for c in task.clients[1:])
    assert len(partitions._views) == 3
    assert task.clients[0].train is not first and task.clients[0].train["label"] == first["label"]  # made again


def test_ten_thousand_clients_build_and_run_a_round_in_seconds(tiny_backbone: Backbone) -> None:
    from benchmarks.scale import TiledDigits

    t0 = time.perf_counter()
    task = prepare_task(Task("digits", TiledDigits(7), clients=10_000, max_test_examples=20))
    training = LocalTraining(max_steps=1, batch_size=4, accelerator="cpu", feature_cache="off")
    part = functools.partial(CoOp, n_ctx=4, ctx_init="a photo of a")
    sim = Simulation(tiny_backbone, [task], [part], training, Federation(fraction=0.001))
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    before = {k: v.clone() for k, v in sim.global_state.items()}
    sim.run_round(1)
    ran = time.perf_counter() - t0
    assert len(sim.clients) == 10_000 and len(sim.sample(1)) == 10
    assert len({id(c.shared) for c in sim.clients}) == 1  # one module for them all
    assert not torch.equal(sim.global_state["task/digits/coop.ctx"], before["task/digits/coop.ctx"])
    assert built < 60 and ran < 30, (built, ran)  # generous for a loaded CI machine (both ~3.5 s here)
