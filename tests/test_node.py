"""A lean Flower node (:mod:`mmfl.federated.node`): it prepares only its clients' tasks, yet builds and trains each
client exactly as the whole federation does; a layout that disagrees with its data is refused."""

from __future__ import annotations

import json

import pytest
import torch

from mmfl.federated.node import Node, client_ids, layout_of, node_client_id, read_layout

pytest.importorskip("flwr", reason="the Flower engine needs flwr: pip install 'mmfl[flower]'")

from mmfl.federated.flower import federation_from_config

RECIPE = """
seed: 3
backbone: {model_name: mmfl-tiny}
tasks:
  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 3, shots: 2, max_test_examples: 20}
  - {name: animals, data: {class_path: mmfl.data.AnimalSilhouettes}, clients: 3, shots: 2, max_test_examples: 20}
parts:  # tensors every client keeps to itself, drawn at random per client, after shared ones
  - class_path: mmfl.prompts.CoOp
    init_args: {n_ctx: 2, scope: global+task, local_rank: 2}
  - class_path: mmfl.prompts.ClipAdapter
    init_args: {scope: local}
  - class_path: mmfl.prompts.DecoupledHead  # a classifier with its own learning rate, merged per task
training: {accelerator: cpu, max_steps: 2, batch_size: 4, feature_cache: "off"}
federation: {rounds: 2}
"""
RUN_CONFIG = {"recipe-yaml": RECIPE, "overrides": ""}


@pytest.fixture(scope="module")
def sim():
    """The whole federation, as the ServerApp and the in-process engine build it."""
    return federation_from_config(RUN_CONFIG)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_node_builds_its_clients_as_the_whole_federation_does(sim, monkeypatch) -> None:
    from mmfl.federated import node as node_module

    layout = json.loads(layout_of(sim.tasks))
    assert client_ids(layout) == [c.data.cid for c in sim.clients]
    initial = {c.data.cid: c.local_state() for c in sim.clients}
    monkeypatch.setattr(node_module, "REPLAYED", 2)  # few RNG states kept: some replays start from the seed again
    node = Node(RUN_CONFIG)
    order = ["animals/image/1", "digits/image/2", "animals/image/0", "digits/image/1", "animals/image/2"]
    for cid in order:  # out of order: each replays the draws from the nearest point it already passed
        _equal(node.client(cid, layout).local_state(), initial[cid])
    assert node.client("animals/image/1", layout) is node.client("animals/image/1", layout)  # built once
    assert len({id(c.shared) for c in node.clients.values()}) == 2  # one module per task
    assert len(node._replayed) == 2

    lone = Node(RUN_CONFIG)  # a deployment node: one client, its task alone prepared
    client = lone.client("animals/image/2", layout)
    _equal(client.local_state(), initial["animals/image/2"])
    assert list(lone.tasks) == [1] and list(lone.pools) == [1]

    # it trains as the federation does: the same reply and the same local tensors after the round
    twin = next(c for c in sim.clients if c.data.cid == "animals/image/2")
    keys = client.shared.trainable_keys(include_local=False)
    lone.global_state = {k: sim.global_state[k].clone() for k in keys}  # what the server sends it
    update, metrics = lone.fit_client(client, 1)
    expected, expected_metrics = sim.fit_client(twin, 1)
    _equal(update.state, expected.state)
    assert any(k.startswith("task/animals/head.") for k in update.state)
    _equal(client.local_state(), twin.local_state())
    assert metrics == expected_metrics and update.num_examples == expected.num_examples
    moved = [k for k, v in client.local_state().items() if not torch.equal(v, initial["animals/image/2"][k])]
    assert moved  # the round trained its local tensors (so the comparison above compared trained tensors)


def test_a_node_refuses_a_layout_its_data_disagree_with(sim) -> None:
    layout = json.loads(layout_of(sim.tasks))
    other = [dict(layout[0]), {**layout[1], "classes": list(reversed(layout[1]["classes"]))}]
    with pytest.raises(ValueError, match="every machine must read the same data sets"):
        Node(RUN_CONFIG).client("animals/image/0", other)
    fewer = [dict(layout[0]), {**layout[1], "clients": 2}]
    with pytest.raises(ValueError, match="the server's 2 clients"):
        Node(RUN_CONFIG).client("animals/image/1", fewer)
    swapped = [layout[1], layout[0]]
    with pytest.raises(ValueError, match="must run the same recipe"):
        Node(RUN_CONFIG).client("animals/image/0", swapped)


def test_the_node_config_names_a_client_of_the_layout() -> None:
    layout = [
        {"task": "digits", "modality": "image", "classes": ["0", "1"], "clients": 2},
        {"task": "animals", "modality": "image", "classes": ["cat"], "clients": 1},
    ]
    assert node_client_id({"client": "animals/image/0"}, layout) == "animals/image/0"
    assert node_client_id({"partition-id": 1}, layout) == "digits/image/1"
    assert node_client_id({"partition-id": 2}, layout) == "animals/image/0"
    with pytest.raises(ValueError, match="not a client of the recipe; its clients are digits/image/0, digits"):
        node_client_id({"client": "fashion/image/0"}, layout)
    many = [{"task": "t", "modality": "text", "classes": ["a"], "clients": 10_000}]
    with pytest.raises(ValueError, match=r"t/text/4, \.\.\. \(10000 in all\)$"):  # not ten thousand ids
        node_client_id({"client": "t/text/10000"}, many)
    with pytest.raises(ValueError, match="out of range: the recipe has 3 clients"):
        node_client_id({"partition-id": 3}, layout)
    with pytest.raises(ValueError, match="give the node a client"):
        node_client_id({}, layout)
    with pytest.raises(ValueError, match="has no 'mmfl-layout'"):
        read_layout({"server-round": 1})
    with pytest.raises(ValueError, match="no recipe-yaml"):
        Node({"recipe-yaml": " "})
