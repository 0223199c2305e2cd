"""The ServerApp strategy's bookkeeping of failed nodes, driven through Flower's own Message objects by a grid that
delivers some replies and withholds others (the end-to-end path, with real SuperLink and SuperNode processes and a
SIGKILLed node, is tests/test_flower.py's killed-node test): a node that does not reply within the round's timeout is
a failed node of the round, named by its node id; an error written in a node's place is that node's failure."""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.federated import Federation, LocalTraining, Simulation
from mmfl.federated.faults import RoundFailed
from mmfl.federated.flower_strategy import ScopedFedAvg
from mmfl.prompts import CoOp

NODES = {11: "digits/image/0", 12: "digits/image/1", 13: "digits/image/2"}


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a running ServerApp process has set before it makes messages: its run, task and node (the SuperLink, 1)."""
    for name, value in (("_run_id", 7), ("_task_id", 3), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Grid:
    """Flower's grid as the strategy uses it: node ids, and send-and-receive that gives each message its id as
    Flower's grids do. ``answer(message)`` is the node's reply, or None for a node that stays silent."""

    def __init__(self, answer: Callable[[Message], Message | None]) -> None:
        self.answer = answer
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(NODES)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what Flower's grids do on pushing
            self.sent.append(msg)
            reply = self.answer(msg)
            if reply is not None:
                replies.append(reply)
        return replies


def _sim(bb: Backbone, out: Path, **fed) -> Simulation:
    task = prepare_task(Task("digits", SklearnDigits(), clients=3, shots=1, max_test_examples=10))
    training = LocalTraining(max_steps=1, batch_size=8, accelerator="cpu")
    parts = [functools.partial(CoOp, ctx_init="a photo of a", scope="task")]
    return Simulation(bb, [task], parts, training, Federation(rounds=1, **fed), seed=0, output_dir=out)


def _answers(sim: Simulation, silent: set[int], errors: set[int]) -> Callable[[Message], Message | None]:
    def answer(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        cid = NODES[node]
        if "ask" in msg.content["config"]:  # which client the node runs
            return Message(RecordDict({"client": ConfigRecord({"cid": cid})}), reply_to=msg)
        if node in silent:
            return None
        if node in errors:
            return Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=msg)
        client = next(c for c in sim.clients if c.data.cid == cid)
        state = {k: v + (node - 10) for k, v in client.module.trainable_state_dict(include_local=False).items()}
        content = {"arrays": ArrayRecord(state), "client": ConfigRecord({"cid": cid})}
        content["metrics"] = MetricRecord({"num-examples": 10, "train-loss": 1.0})
        return Message(RecordDict(content), reply_to=msg)

    return answer


def _round(sim: Simulation, grid: Grid, **kw) -> tuple:
    strategy = ScopedFedAvg(sim, None, timeout=7, fraction_train=1.0, min_train_nodes=3, min_available_nodes=3, **kw)
    messages = list(strategy.configure_train(1, ArrayRecord(sim.global_state), ConfigRecord(), grid))
    return strategy, strategy.aggregate_train(1, grid.send_and_receive(messages, timeout=7))


def test_a_silent_node_is_a_failed_node_of_the_round(tiny_backbone: Backbone, tmp_path: Path) -> None:
    sim = _sim(tiny_backbone, tmp_path, min_clients=1)
    grid = Grid(_answers(sim, silent={12}, errors=set()))
    before = {k: v.clone() for k, v in sim.global_state.items()}
    strategy, (arrays, metrics) = _round(sim, grid)
    failed = [r for r in sim.metrics.rows if r["split"] == "fit_failed"]
    assert [(r["client"], r["note"]) for r in failed] == [("12", "no reply within 7 s (round-timeout)")]
    assert {r["client"] for r in sim.metrics.rows if r["split"] == "fit"} == {NODES[11], NODES[13]}
    assert metrics["failures"] == 1.0 and metrics["clients"] == 2.0
    assert strategy.failures == {1: 1}
    for k, v in before.items():  # node 11 replied its tensors + 1, node 13 + 3 (10 examples each): the mean is + 2
        assert torch.allclose(sim.global_state[k], v + 2.0, atol=1e-6), k
    sent_back = arrays.to_torch_state_dict()  # what Flower hands the next round
    assert all(torch.equal(sent_back[k], v) for k, v in sim.global_state.items())


def test_an_error_written_in_a_node_s_place_names_that_node(tiny_backbone: Backbone, tmp_path: Path) -> None:
    sim = _sim(tiny_backbone, tmp_path, min_clients=1)

    def superlink(msg: Message) -> Message | None:  # the SuperLink answers for an unavailable node: source node 1
        reply = _answers(sim, silent=set(), errors={13})(msg)
        if reply is not None and reply.has_error():
            reply.metadata.__dict__["_src_node_id"] = 1
            assert reply.metadata.src_node_id == 1
        return reply

    _round(sim, Grid(superlink))
    failed = [r for r in sim.metrics.rows if r["split"] == "fit_failed"]
    assert [(r["client"], r["note"]) for r in failed] == [("13", "error: Error: Node Unavailable")]


def test_too_few_replies_after_the_retries_stop_the_run_naming_the_silent_node(
    tiny_backbone: Backbone, tmp_path: Path
) -> None:
    sim = _sim(tiny_backbone, tmp_path, min_clients=3, retries=2)
    grid = Grid(_answers(sim, silent={12}, errors=set()))
    with pytest.raises(RoundFailed, match=r"only 2 of 3 nodes succeeded.*node 12: no reply within 7 s"):
        _round(sim, grid)
    training = [m for m in grid.sent if "ask" not in m.content["config"]]
    to = [m.metadata.dst_node_id for m in training]
    assert sorted(to[:3]) == [11, 12, 13] and to[3:] == [12, 12]  # node 12 asked twice more
    assert not [r for r in sim.metrics.rows if r["round"] == 1]  # the round did not happen
    assert not (tmp_path / "metrics.csv").exists() or not [
        r for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r["round"] == "1"
    ]
