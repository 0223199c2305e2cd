"""Faulty clients in a real simulation: each fault is left out and recorded, the round merges the others, and a
round with too few good clients is retried or stops with a clear error."""

from __future__ import annotations

import functools
import math
import time

import pytest
import torch

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.federated import Federation, LocalTraining, Simulation, Update
from mmfl.federated.faults import RoundFailed, validate_update
from mmfl.prompts import CoOp

KEY = "task/digits/coop.ctx"


class Faulty(Simulation):
    """A real simulation whose chosen clients misbehave after (or instead of) training."""

    faults: dict[str, str]
    calls: dict[str, int]

    def fit_client(self, client, rnd):
        kind = self.faults.get(client.data.cid)
        self.calls[client.data.cid] = self.calls.get(client.data.cid, 0) + 1
        if kind == "raise":
            raise RuntimeError("disk full")
        if kind == "flaky" and self.calls[client.data.cid] == 1:
            raise ConnectionError("lost the connection")
        update, m = super().fit_client(client, rnd)
        s = dict(update.state)
        if kind == "raise_after":
            raise RuntimeError("crashed after training")
        if kind == "nan":
            s[KEY] = s[KEY].clone()
            s[KEY][0, 0] = math.nan
        elif kind == "inf":
            s[KEY] = s[KEY] * math.inf
        elif kind == "missing":
            s.pop(KEY)
        elif kind == "extra":
            s["task/other/x"] = torch.zeros(1)
        elif kind == "shape":
            s[KEY] = s[KEY][:1]
        elif kind == "dtype":
            s[KEY] = s[KEY].double()
        elif kind == "examples":
            return Update(update.cid, s, 0), m
        elif kind == "slow":
            time.sleep(self.federation.client_timeout + 0.05)
        return Update(update.cid, s, update.num_examples), m


@pytest.fixture(scope="module")
def digits():
    return [prepare_task(Task("digits", SklearnDigits(), clients=3, shots=3, max_test_examples=30))]


def _sim(bb: Backbone, tasks, faults: dict[int, str], per_client: bool = True, **federation) -> Faulty:
    """(A module per client by default: the tests read each client's trained tensors from it.)"""
    training = LocalTraining(
        max_steps=2, batch_size=8, accelerator="cpu", optimizer=lambda p: torch.optim.SGD(p, lr=0.5)
    )
    coop = federation.pop("coop", {})
    parts = [functools.partial(CoOp, n_ctx=2, **coop)]
    sim = Faulty(bb, tasks, parts, training, Federation(rounds=1, **federation), per_client_modules=per_client)
    sim.faults = {sim.clients[i].data.cid: kind for i, kind in faults.items()}
    sim.calls = {}
    return sim


def _mean_of(sim: Simulation, idx: list[int]) -> torch.Tensor:
    cs = [sim.clients[i] for i in idx]
    total = sum(len(c.data.train) for c in cs)
    return (sum(c.module.parts["coop"].ctx.detach().double() * len(c.data.train) for c in cs) / total).float()


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("raise", "RuntimeError: disk full"),
        ("nan", "non-finite"),
        ("inf", "non-finite"),
        ("missing", "missing keys"),
        ("extra", "unexpected keys"),
        ("shape", "has shape (1, "),
        ("dtype", "dtype torch.float64"),
        ("examples", "num_examples"),
        ("slow", "client_timeout"),
    ],
)
def test_a_faulty_client_is_left_out_and_recorded(tiny_backbone: Backbone, digits, kind: str, reason: str) -> None:
    # slow: trains, then stalls past the timeout before replying (good clients train well within 2 s)
    timeout = {"client_timeout": 2.0} if kind == "slow" else {}
    sim = _sim(tiny_backbone, digits, {1: kind}, **timeout)
    before = sim.global_state[KEY].clone()
    sim.run_round(1)
    assert torch.allclose(sim.global_state[KEY], _mean_of(sim, [0, 2]), atol=1e-7)  # the good clients only
    assert not torch.equal(sim.global_state[KEY], before)
    failed = [r for r in sim.metrics.rows if r["split"] == "fit_failed"]
    assert [r["client"] for r in failed] == [sim.clients[1].data.cid]
    assert reason in failed[0]["note"]
    fits = [r for r in sim.metrics.rows if r["split"] == "fit"]
    assert len(fits) == 2 and all(r["value"] > 0 for r in fits)  # update norms of the good clients


@pytest.mark.parametrize("per_client", [True, False], ids=["own modules", "pooled"])
def test_a_failed_client_gets_its_local_tensors_back(tiny_backbone: Backbone, digits, per_client: bool) -> None:
    sim = _sim(tiny_backbone, digits, {1: "raise_after"}, per_client, coop={"scopes": {"ctx": "local"}})
    before = [c.module.parts["coop"].ctx.detach().clone() for c in sim.clients]
    sim.run_round(1)
    after = [c.module.parts["coop"].ctx.detach().clone() for c in sim.clients]
    assert torch.equal(after[1], before[1])  # trained, then failed: rolled back
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[2], before[2])


def test_too_few_good_clients_stop_the_run_with_a_clear_error(tiny_backbone: Backbone, digits) -> None:
    sim = _sim(tiny_backbone, digits, {0: "raise", 1: "nan"}, min_clients=2)
    before = sim.global_state[KEY].clone()
    with pytest.raises(RoundFailed, match=r"round 1: only 1 of 3 sampled clients succeeded, fewer than min_clients=2"):
        sim.run_round(1)
    assert torch.equal(sim.global_state[KEY], before)  # never a silent partial merge
    assert not any(r["round"] == 1 for r in sim.metrics.rows)


def test_retries_rerun_only_the_failed_clients(tiny_backbone: Backbone, digits) -> None:
    sim = _sim(tiny_backbone, digits, {0: "flaky", 1: "flaky"}, min_clients=3, retries=1)
    sim.run_round(1)
    assert sim.calls == {sim.clients[0].data.cid: 2, sim.clients[1].data.cid: 2, sim.clients[2].data.cid: 1}
    assert torch.allclose(sim.global_state[KEY], _mean_of(sim, [0, 1, 2]), atol=1e-7)
    assert not [r for r in sim.metrics.rows if r["split"] == "fit_failed"]


def test_replies_are_merged_as_they_come_in_the_sampled_order(
    tiny_backbone: Backbone, digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each reply joins the round's merge once every client sampled before it has replied or failed for good: at
    once without faults or after a failure with no retry left; after a failed client that will be retried, the later
    replies wait for it. The result is the merge of all the replies at the end, in client order, bit for bit."""
    from mmfl.federated import aggregate
    from mmfl.federated.round_merge import RoundMerge

    adds: list[tuple[str, int]] = []  # (client merged, fits done so far)
    add = RoundMerge.add
    cases = [  # faults, min_clients, retries, (client merged, fits done by then)
        ({}, 3, 1, [(0, 1), (1, 2), (2, 3)]),
        ({0: "flaky"}, 3, 1, [(0, 4), (1, 4), (2, 4)]),  # client 0 fails, 1 and 2 wait for its retry (the 4th fit)
        ({0: "raise"}, 2, 0, [(1, 2), (2, 3)]),  # no retry: client 0 is out for good, 1 and 2 need not wait
    ]
    for faults, min_clients, retries, expected in cases:
        sim = _sim(tiny_backbone, digits, faults, min_clients=min_clients, retries=retries)
        before = {k: v.clone() for k, v in sim.global_state.items()}
        adds.clear()

        def spy(self, update, sim=sim):
            adds.append((update.cid, sum(sim.calls.values())))
            return add(self, update)

        monkeypatch.setattr(RoundMerge, "add", spy)
        sim.run_round(1)
        assert adds == [(sim.clients[i].data.cid, n) for i, n in expected]
        merged = [sim.clients[i] for i, _ in expected]
        replies = [Update(c.data.cid, {KEY: c.module.parts["coop"].ctx.detach()}, len(c.data.train)) for c in merged]
        assert torch.equal(sim.global_state[KEY], aggregate(replies, sim.federation.aggregator, before)[KEY])


def test_the_deadline_stops_local_training(tiny_backbone: Backbone, digits) -> None:
    """A real Lightning Trainer with a tiny client_timeout: every client is stopped at its first batch."""
    sim = _sim(tiny_backbone, digits, {}, client_timeout=1e-6)
    with pytest.raises(RoundFailed, match="ClientTimeout: local training took over"):
        sim.run_round(1)


def test_validate_update_accepts_exactly_the_contract() -> None:
    spec = {"a": ((2,), torch.float32)}
    assert validate_update(Update("c", {"a": torch.zeros(2)}, 3), spec) is None
    assert "positive int" in validate_update(Update("c", {"a": torch.zeros(2)}, True), spec)
    assert "not an Update" in validate_update({"a": torch.zeros(2)}, spec)
    assert "not a tensor" in validate_update(Update("c", {"a": [0.0, 0.0]}, 3), spec)
