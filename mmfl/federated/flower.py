"""The Flower engine: a recipe's federation as a Flower ClientApp and ServerApp (the only module importing ``flwr``).

Both apps build the same in-process :class:`~mmfl.federated.simulation.Simulation` from the recipe (once per
process, then reused across messages): the ServerApp uses it for the initial tensors, merging (mmfl's own
aggregators, per scope group), evaluation and checkpoints; a ClientApp uses it to train its one client with
exactly the code of the in-process engine, so both engines give the same tensors for the same seed.

Run config (``[tool.flwr.app.config]`` of the app that ``mmfl flower-app`` writes, or ``flwr run --run-config``):
    ``recipe-yaml``: the resolved recipe itself (so every machine reads the same one); ``overrides``: recipe
    overrides (``--federation.rounds=2 ...``); ``output-dir``: where the ServerApp writes metrics.csv and the
    state; ``min-nodes``: nodes to wait for before a round; ``round-timeout``: seconds to wait for replies.

Node config (``flower-supernode --node-config``): ``client="digits/image/0"`` (a client id of the recipe:
task/modality/index), or ``partition-id=N`` (the recipe's N-th client; the simulation engine sets it).
"""

from __future__ import annotations

import logging
import math
import shlex
import tempfile
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from torch import Tensor

from mmfl.federated.aggregate import Update
from mmfl.federated.checkpoint import save_state
from mmfl.federated.faults import validate_update
from mmfl.federated.simulation import Simulation

log = logging.getLogger(__name__)

LOCAL_STATE = "mmfl-local"
_CACHE: dict[tuple, Simulation] = {}


def federation_from_config(run_config: dict) -> Simulation:
    """The recipe's federation (backbone, prepared tasks, clients), built once per process and reused.

    Args:
        run_config: the run config (``recipe-yaml``, ``overrides``).

    Raises:
        ValueError: the recipe is missing or invalid (the message names what to fix).
    """
    from mmfl.backbone import Backbone
    from mmfl.data.task import prepare_task
    from mmfl.evaluation.protocol import Protocol
    from mmfl.federated.settings import seed_all
    from mmfl.recipe import check_recipe, fit_parser

    text = str(run_config.get("recipe-yaml", ""))
    overrides = shlex.split(str(run_config.get("overrides", "")))
    key = (text, tuple(overrides))
    if key in _CACHE:
        return _CACHE[key]
    if not text.strip():
        raise ValueError("the run config has no recipe-yaml: write the app with `mmfl flower-app -c RECIPE`")
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(text)
        parser = fit_parser()
        cfg = parser.parse_args(["-c", str(recipe), *overrides])
    init, tasks, federation = check_recipe(parser, cfg)
    protocol = init.evaluation or Protocol()
    prepared = [prepare_task(t, seed=cfg.seed, **protocol.split_args()) for t in tasks]
    seed_all(cfg.seed)
    backbone = Backbone(**cfg.backbone.as_dict())
    sim = Simulation(
        backbone, prepared, init.parts, init.training, federation, seed=cfg.seed, selection=protocol.selection
    )
    _CACHE[key] = sim
    return sim


def client_index(sim: Simulation, node_config: dict) -> int:
    """The index of the recipe's client a node runs, from its node config.

    Raises:
        ValueError: neither ``client`` nor ``partition-id`` names a client of the recipe.
    """
    cids = [c.data.cid for c in sim.clients]
    if "client" in node_config:
        cid = str(node_config["client"])
        if cid not in cids:
            raise ValueError(f"node config client={cid!r} is not a client of the recipe; its clients are {cids}")
        return cids.index(cid)
    if "partition-id" in node_config:
        i = int(node_config["partition-id"])
        if not 0 <= i < len(cids):
            raise ValueError(f"node config partition-id={i} is out of range: the recipe has {len(cids)} clients")
        return i
    raise ValueError(f"give the node a client: --node-config 'client=\"{cids[0]}\"' (or partition-id=N)")


# ---------------------------------------------------------------- ClientApp
client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the node's client on the received tensors; reply with its non-local tensors and metrics.

    The client's ``local`` tensors stay on the node, in ``context.state``, across rounds. Evaluation is folded
    into this reply (its local test split, when it has one), saving a round trip.
    """
    sim = federation_from_config(dict(context.run_config))
    client = sim.clients[client_index(sim, dict(context.node_config))]
    if LOCAL_STATE in context.state.array_records:
        client.module.load_trainable_state_dict(context.state.array_records[LOCAL_STATE].to_torch_state_dict())
    rnd = int(msg.content["config"]["server-round"])
    sim.global_state.update(msg.content["arrays"].to_torch_state_dict())
    update, m = sim.fit_client(client, rnd)
    local = client.module.trainable_state_dict(local_only=True)
    if local:
        context.state.array_records[LOCAL_STATE] = ArrayRecord(local)
    metrics = {"num-examples": update.num_examples, "train-loss": m["loss"], "train-accuracy": m["accuracy"]}
    metrics.update({k: v for k, v in m.items() if k.startswith("pseudo_")})  # an unlabeled client's choice
    if client.data.test is not None and len(client.data.test):
        ev = sim.evaluate(client.module, client.task, client.data.test)
        metrics.update({"local-test-accuracy": ev["accuracy"], "local-test-examples": len(client.data.test)})
    content = RecordDict(
        {
            "arrays": ArrayRecord(update.state),
            "metrics": MetricRecord({k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}),
            "client": ConfigRecord({"cid": update.cid}),
        }
    )
    return Message(content, reply_to=msg)


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which of the recipe's clients this node runs (the server then sends it only that client's tensors)."""
    sim = federation_from_config(dict(context.run_config))
    cid = sim.clients[client_index(sim, dict(context.node_config))].data.cid
    return Message(RecordDict({"client": ConfigRecord({"cid": cid})}), reply_to=msg)


# ---------------------------------------------------------------- ServerApp
class ScopedFedAvg(FlowerFedAvg):
    """Flower's FedAvg sampling and messaging, merged per scope group with mmfl's own aggregator.

    Plain FedAvg requires every reply to carry the same keys; clients of different tasks and modalities do
    not. Each node is sent only the tensors of its own keys (learned by a query before its first round), and each key is
    merged over exactly the clients that returned it, by the recipe's aggregator.

    Args:
        sim: the server's federation (global state, aggregator, evaluation, metrics).
        output_dir: where metrics.csv and global.safetensors go (None: nowhere).
        kwargs: Flower FedAvg's sampling arguments.
    """

    def __init__(self, sim: Simulation, output_dir: Path | None = None, **kwargs) -> None:
        super().__init__(fraction_evaluate=0.0, **kwargs)
        self.sim = sim
        self.output_dir = output_dir
        self.node_keys: dict[int, list[str]] = {}
        self.node_client: dict[int, str] = {}  # the client each node said it runs
        self.failures: dict[int, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """FedAvg's sampling; one message per node holding only its node's tensors once its keys are known.

        (FedAvg's own messages share one RecordDict, so each node gets a record of its own.)
        """
        state = self.sim.global_state
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        self._learn_keys(
            grid, [m.metadata.dst_node_id for m in sampled if m.metadata.dst_node_id not in self.node_keys]
        )
        waiting = set()  # unlabeled clients before training.pseudo_labels.start_round are not asked
        if server_round < self.sim.training.pseudo_labels.start_round:
            waiting = {c.data.cid for c in self.sim.clients if not c.data.labeled}
        messages = []
        for msg in sampled:
            node = msg.metadata.dst_node_id
            if self.node_client.get(node) in waiting:
                continue
            keys = self.node_keys.get(node)
            mine = arrays if keys is None else ArrayRecord({k: state[k] for k in keys if k in state})
            record = RecordDict({"arrays": mine, "config": ConfigRecord(dict(msg.content["config"]))})
            messages.append(Message(record, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def _learn_keys(self, grid: Grid, nodes: list[int]) -> None:
        """Ask new nodes which client they run (one query round trip) and note that client's non-local keys."""
        if not nodes:
            return
        keys = {c.data.cid: c.module.trainable_keys(include_local=False) for c in self.sim.clients}
        record = RecordDict({"config": ConfigRecord({"ask": "client"})})
        asks = [Message(record, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for reply in grid.send_and_receive(asks, timeout=600):
            if not reply.has_error():  # a node that cannot answer gets the whole state and is learned later
                cid = str(reply.content["client"]["cid"])
                self.node_client[reply.metadata.src_node_id] = cid
                self.node_keys[reply.metadata.src_node_id] = keys[cid]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Merge each key over the replies that hold it; record failed nodes in metrics.csv."""
        replies = list(replies)
        updates, losses = [], []
        failed = [m for m in replies if m.has_error()]
        invalid: list[tuple[Message, str]] = []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                state: dict[str, Tensor] = msg.content["arrays"].to_torch_state_dict()
                metrics = msg.content["metrics"]
                cid = str(msg.content["client"]["cid"])
                n = int(metrics["num-examples"])
            except (KeyError, TypeError, ValueError) as e:
                invalid.append((msg, f"malformed reply: {type(e).__name__}: {e}"))
                continue
            problem = (
                validate_update(Update(cid, state, n), self.sim.specs[cid])
                if cid in self.sim.specs
                else (f"unknown client {cid!r}")
            )
            if problem:
                invalid.append((msg, f"InvalidUpdate: {problem}"))
                continue
            self.node_keys[msg.metadata.src_node_id] = sorted(state)
            updates.append(Update(cid, state, n))
            c = next(c for c in self.sim.clients if c.data.cid == cid)
            loss, acc = float(metrics.get("train-loss", math.nan)), float(metrics.get("train-accuracy", math.nan))
            pseudo = {k: float(v) for k, v in metrics.items() if k.startswith("pseudo_")}
            self.sim.record_fit(server_round, c, {"loss": loss, "accuracy": acc, **pseudo}, n)
            if "local-test-accuracy" in metrics:
                ev = {"loss": math.nan, "accuracy": float(metrics["local-test-accuracy"])}
                self.sim._record_client(server_round, c, "local_test", ev, int(metrics["local-test-examples"]))
            losses.append((loss, n))
        for msg, why in [(m, f"error: {m.error.reason}") for m in failed] + invalid:
            node = msg.metadata.src_node_id
            self.failures[server_round] = self.failures.get(server_round, 0) + 1
            self.sim.metrics.add(server_round, "node", "", "", str(node), "fit_failed", math.nan, math.nan, 0, note=why)
            log.warning("round %d: node %d left out: %s", server_round, node, why)
        failed = failed + [m for m, _ in invalid]
        if not updates:
            log.warning("round %d: no client replied; the global state is unchanged", server_round)
            return None, MetricRecord({"failures": float(len(failed))})
        order = {c.data.cid: i for i, c in enumerate(self.sim.clients)}
        updates.sort(key=lambda u: order[u.cid])  # the in-process engine's order (it fixes float sums)
        self.sim.merge(server_round, updates, len(replies))
        total = sum(n for _, n in losses)
        loss = sum(v * n for v, n in losses) / total if total else math.nan
        return ArrayRecord(self.sim.global_state), MetricRecord(
            {"train-loss": loss, "clients": float(len(updates)), "failures": float(len(failed))}
        )

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Server-side evaluation (``evaluate_fn``): every task's test split, metrics.csv, the checkpoint."""
        sim = self.sim
        sim.global_state.update(arrays.to_torch_state_dict())
        rounds = sim.federation.rounds
        out: dict[str, float] = {}
        if server_round == 0 or server_round % sim.federation.eval_every == 0 or server_round == rounds:
            out = {k: float(v) for k, v in sim.evaluate_tasks(server_round).items()}
            log.info("round %d: test accuracy %s", server_round, out)
        sim.metrics.flush()
        if self.output_dir is not None and server_round > 0:
            meta = {"round": str(server_round), "rounds": str(rounds), "backbone": sim.backbone.model_name}
            save_state(self.output_dir / "global.safetensors", sim.global_state, meta)
        return MetricRecord(out)


def server_setup(cfg: dict) -> tuple[Simulation, Path | None, int, int]:
    """The ServerApp's federation (writing to ``output-dir``), the nodes to wait for (``min-nodes``, default one
    per client) and the nodes to train each round (the recipe's fraction and ``min_clients``)."""
    sim = federation_from_config(cfg)
    out = Path(str(cfg["output-dir"])) if cfg.get("output-dir") else None
    if out is not None:
        sim.attach_output(out)
    min_nodes = int(cfg.get("min-nodes", len(sim.clients)))
    fed = sim.federation
    min_train = max(1, min(min_nodes, max(fed.min_clients, math.ceil(fed.fraction * min_nodes))))
    return sim, out, min_nodes, min_train


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the recipe's rounds on the connected nodes, merging per scope group."""
    from mmfl.module import quiet_lightning

    cfg = dict(context.run_config)
    sim, out, min_nodes, min_train = server_setup(cfg)
    strategy = ScopedFedAvg(
        sim, out, fraction_train=sim.federation.fraction, min_train_nodes=min_train, min_available_nodes=min_nodes
    )
    with quiet_lightning():
        strategy.start(
            grid,
            ArrayRecord({k: v.clone() for k, v in sim.global_state.items()}),
            num_rounds=sim.federation.rounds,
            timeout=float(cfg.get("round-timeout", 3600)),
            evaluate_fn=strategy.evaluate,
        )


def write_app(
    recipe_yaml: str,
    app_dir: Path,
    output_dir: Path | None,
    overrides: str = "",
    min_nodes: int = 0,
    secagg: dict[str, float] | None = None,
) -> Path:
    """Write a Flower app folder (``pyproject.toml``) that runs a recipe; ``flwr run APP_DIR`` runs it.

    Args:
        recipe_yaml: the resolved recipe (it travels inside the app, so every node reads the same one).
        app_dir: the folder to write.
        output_dir: where the ServerApp writes metrics.csv and global.safetensors (absolute).
        overrides: recipe overrides applied on every node.
        min_nodes: nodes to wait for before a round (0: one per client of the recipe).
        secagg: run with SecAgg+ (:mod:`mmfl.federated.flower_secagg`), with these settings (``num-shares``,
            ``threshold``, ``clipping-range``, ``max-weight``); None: without.

    Returns:
        The pyproject.toml written.
    """
    import json

    app_dir.mkdir(parents=True, exist_ok=True)
    config = {"recipe-yaml": recipe_yaml, "overrides": overrides, "output-dir": str(output_dir or "")}
    if min_nodes:
        config["min-nodes"] = min_nodes
    apps = ("mmfl.federated.flower:server_app", "mmfl.federated.flower:client_app")
    if secagg is not None:
        config.update({f"secagg-{k}": float(v) for k, v in secagg.items()})
        apps = ("mmfl.federated.flower_secagg:secure_server_app", "mmfl.federated.flower_secagg:secure_client_app")
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "mmfl-recipe"',
        'version = "1.0.0"',
        'description = "An mmfl recipe on Flower"',
        'license = "Apache-2.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "mmfl"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{apps[0]}"',
        f'clientapp = "{apps[1]}"',
        "",
        "[tool.flwr.app.config]",
        *[f"{k} = {json.dumps(v)}" for k, v in config.items()],
        "",
    ]
    path = app_dir / "pyproject.toml"
    path.write_text("\n".join(lines))
    return path
