"""A lean Flower node: the clients a ClientApp process runs, built without the rest of the federation.

A ClientApp process serves one client (a deployment node) or a few (an actor of Flower's simulation engine). It
prepares only its clients' tasks (their data partitions), builds one module per (task, modality) it serves and
keeps per client only its ``local`` tensors (as :mod:`mmfl.federated.pool` does in process), so its memory is the
backbone, its own data and one set of parts, whatever the size of the federation.

What it cannot know without the other tasks' data is the federation's *layout*: every prepared task's name,
modality, class names and number of clients, in the recipe's order. The ServerApp sends it (:func:`layout_of`,
a JSON string in the ``config`` of its query and train messages). With it, a node replays the random draws that
building every earlier client's parts makes (each factory called with that task's class names), so its client's
initial local tensors are those of the in-process engine, bit for bit, for the same seed.
"""

from __future__ import annotations

import json
import random
import shlex
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmfl.data.task import PreparedTask
from mmfl.federated.client_runner import ClientRunner
from mmfl.federated.pool import Client, initial_local
from mmfl.federated.settings import seed_all
from mmfl.module import ClientModule

REPLAYED = 64
"""RNG states a process keeps to replay from (one per client it built last; a simulation-engine actor serves many)."""

LAYOUT = "mmfl-layout"
"""The key of the layout in a message's ``config`` record."""


def layout_of(tasks: Sequence[PreparedTask]) -> str:
    """The federation's layout as the JSON string a node reads: per prepared task, in order, its ``task``,
    ``modality``, ``classes`` (class names) and ``clients`` (how many)."""
    rows = [
        {"task": t.name, "modality": t.modality, "classes": list(t.class_names), "clients": len(t.clients)}
        for t in tasks
    ]
    return json.dumps(rows)


def client_ids(layout: list[dict]) -> list[str]:
    """The federation's client ids in order (``task/modality/index``), from its layout."""
    return [f"{row['task']}/{row['modality']}/{i}" for row in layout for i in range(int(row["clients"]))]


def node_client_id(node_config: dict, layout: list[dict]) -> str:
    """The client id a node runs, from its node config (``client`` or ``partition-id``).

    Raises:
        ValueError: neither names a client of the federation (the message lists them).
    """
    cids = client_ids(layout)
    if "client" in node_config:
        cid = str(node_config["client"])
        if cid not in cids:
            some = ", ".join(cids[:5]) + (f", ... ({len(cids)} in all)" if len(cids) > 5 else "")
            raise ValueError(f"node config client={cid!r} is not a client of the recipe; its clients are {some}")
        return cid
    if "partition-id" in node_config:
        i = int(node_config["partition-id"])
        if not 0 <= i < len(cids):
            raise ValueError(f"node config partition-id={i} is out of range: the recipe has {len(cids)} clients")
        return cids[i]
    raise ValueError(f"give the node a client: --node-config 'client=\"{cids[0]}\"' (or partition-id=N)")


def read_layout(config: dict) -> list[dict]:
    """The layout a server message carries in its ``config``.

    Raises:
        ValueError: the message has none (it did not come from mmfl's ServerApp).
    """
    if LAYOUT not in config:
        raise ValueError(f"the message's config has no {LAYOUT!r}: run the app's ServerApp (mmfl flower-app)")
    return json.loads(str(config[LAYOUT]))


def read_recipe(run_config: dict) -> tuple:
    """The recipe a Flower run config carries (``recipe-yaml`` with its ``overrides``), parsed and checked as
    ``mmfl fit`` does: (the parsed config, the instantiated recipe, its task entries, its federation settings).

    Raises:
        ValueError: the recipe is missing or invalid (the message names what to fix).
    """
    from mmfl.federated.virtual_features import refuse_on_flower
    from mmfl.recipe import check_recipe

    parser, cfg = parse_recipe(run_config)
    init, tasks, federation = check_recipe(parser, cfg)
    refuse_on_flower(federation.virtual_features)
    return cfg, init, tasks, federation


def parse_recipe(run_config: dict) -> tuple:
    """(the fit parser, the parsed config) of the recipe a Flower run config carries, unchecked.

    Raises:
        ValueError: the run config has no recipe.
    """
    from mmfl.recipe import fit_parser, lists_replace

    text = str(run_config.get("recipe-yaml", ""))
    if not text.strip():
        raise ValueError("the run config has no recipe-yaml: write the app with `mmfl flower-app -c RECIPE`")
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(text)
        parser = fit_parser()
        cfg = parser.parse_args(["-c", str(recipe), *lists_replace(shlex.split(str(run_config.get("overrides", ""))))])
    return parser, cfg


def save_recipe(run_config: dict, out: Path) -> None:
    """Write the run config's resolved recipe to ``out/config.yaml``, as ``mmfl fit`` does beside its outputs (so
    ``mmfl choose`` and ``mmfl export`` read a Flower run's folder as a run folder)."""
    parser, cfg = parse_recipe(run_config)
    out.mkdir(parents=True, exist_ok=True)
    parser.save(cfg, out / "config.yaml", skip_none=False, overwrite=True, multifile=False)


def _rng_state() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_state(state: tuple) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


class Node(ClientRunner):
    """The clients of a recipe's federation that this process runs, each built as the whole federation would.

    Args:
        run_config: the Flower run config (``recipe-yaml``, ``overrides``).

    Raises:
        ValueError: the recipe is missing or invalid (the message names what to fix).
    """

    def __init__(self, run_config: dict) -> None:
        from mmfl.backbone import Backbone
        from mmfl.evaluation.protocol import Protocol

        cfg, init, self.specs, federation = read_recipe(run_config)
        self.protocol = init.evaluation or Protocol()
        seed_all(cfg.seed)  # as the whole federation seeds its backbone (random-weight configs draw from it)
        super().__init__(Backbone(**cfg.backbone.as_dict()), init.parts, init.training, federation, cfg.seed)
        self.tasks: dict[int, PreparedTask] = {}  # prepared tasks by position in the recipe
        self.pools: dict[int, ClientModule] = {}  # one module per prepared task
        self.clients: dict[str, Client] = {}
        self._replayed: OrderedDict[int, tuple] = OrderedDict()  # RNG states before the client at that place

    def task(self, position: int, layout: list[dict]) -> PreparedTask:
        """The recipe's ``position``-th task, prepared (once) and checked against the server's layout.

        Raises:
            ValueError: this node's data give the task other class names or another number of clients than the
                server's (the machines read different data).
        """
        if position not in self.tasks:
            from mmfl.data.task import prepare_task

            task = prepare_task(self.specs[position], seed=self.seed, **self.protocol.split_args())
            row = layout[position]
            if (task.name, task.modality) != (row["task"], row["modality"]):
                raise ValueError(
                    f"the server's task {position} is {row['task']}/{row['modality']}, this node's recipe gives "
                    f"{task.name}/{task.modality}: the server and the node must run the same recipe"
                )
            if list(task.class_names) != list(row["classes"]) or len(task.clients) != int(row["clients"]):
                raise ValueError(
                    f"task {task.name}/{task.modality}: this node's data give {len(task.clients)} clients and classes "
                    f"{list(task.class_names)}, the server's {row['clients']} clients and classes {row['classes']}: "
                    "every machine must read the same data sets (same versions, same paths)"
                )
            self.tasks[position] = task
        return self.tasks[position]

    def client(self, cid: str, layout: list[dict]) -> Client:
        """The client ``cid`` (built once): its task's data, the task's shared module, its initial local tensors."""
        if cid in self.clients:
            return self.clients[cid]
        name, modality, index = cid.rsplit("/", 2)
        position = next(p for p, r in enumerate(layout) if (r["task"], r["modality"]) == (name, modality))
        task = self.task(position, layout)
        if position not in self.pools:
            self.pools[position] = self.build_module(task)  # its own draws do not matter: states are loaded in
        local = self._initial_local(layout, position, int(index))
        data = task.clients[int(index)]
        anchors = self.training.knowledge.anchors > 0 and data.labeled
        self.clients[cid] = Client(data, task, self.pools[position], local=local, anchors=anchors)
        return self.clients[cid]

    def _initial_local(self, layout: list[dict], position: int, index: int) -> dict[str, Tensor]:
        """The client's initial local tensors as the in-process engine draws them: seeded, then every earlier
        client's parts built in order (from the nearest point already replayed in this process)."""
        order = sum(int(r["clients"]) for r in layout[:position]) + index  # its place among all clients
        start = max((o for o in self._replayed if o <= order), default=None)
        if start is None:
            seed_all(self.seed)
            start = 0
        else:
            _set_rng_state(self._replayed[start])
        place = 0  # each client's place among all, in the recipe's order
        for row in layout:
            for _ in range(int(row["clients"])):
                if start <= place < order:  # its parts are built (and dropped) only for their random draws
                    for f in self.part_factories:
                        f(self.backbone, list(row["classes"]))
                place += 1
        self._replayed[order] = _rng_state()  # ~10 KB: the latest REPLAYED are kept
        while len(self._replayed) > REPLAYED:
            self._replayed.popitem(last=False)
        return initial_local(self.part_factories, self.backbone, self.tasks[position])
