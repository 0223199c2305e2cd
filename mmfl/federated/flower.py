"""The Flower engine: a recipe's federation as a Flower ClientApp and ServerApp (the only module importing ``flwr``).

The ServerApp builds the recipe's in-process :class:`~mmfl.federated.simulation.Simulation` (once per process) for
the initial tensors, merging (mmfl's own aggregators, per scope group), evaluation and checkpoints. A ClientApp
builds only the clients it runs (:class:`~mmfl.federated.node.Node`: their tasks' data, one module per task, the
federation's layout from the server's messages) and trains them with exactly the code of the in-process engine, so
both engines give the same tensors for the same seed.

Run config (``[tool.flwr.app.config]`` of the app that ``mmfl flower-app`` writes, or ``flwr run --run-config``):
    ``recipe-yaml``: the resolved recipe itself (so every machine reads the same one); ``overrides``: recipe
    overrides (``--federation.rounds=2 ...``); ``output-dir``: where the ServerApp writes metrics.csv and the
    state; ``min-nodes``: nodes to wait for before a round; ``round-timeout``: seconds to wait for replies;
    ``resume``: continue the run in ``output-dir`` after its last complete round (its ``checkpoint.safetensors``,
    the same file ``mmfl fit`` writes), e.g. ``flwr run APP --run-config resume=true``.

Node config (``flower-supernode --node-config``): ``client="digits/image/0"`` (a client id of the recipe:
task/modality/index), or ``partition-id=N`` (the recipe's N-th client; the simulation engine sets it).
"""

from __future__ import annotations

import logging
import math
import shlex
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from mmfl.federated.faults import RoundFailed
from mmfl.federated.flower_stop import stop_line
from mmfl.federated.flower_strategy import ScopedFedAvg, as_flag, check_output, resume_server
from mmfl.federated.node import Node, node_client_id, read_layout, read_recipe, save_recipe
from mmfl.federated.node_state import latest_round, load_local, save_local, state_folder
from mmfl.federated.pool import Client
from mmfl.federated.resume import CHECKPOINT, completed_round
from mmfl.federated.simulation import Simulation

log = logging.getLogger(__name__)

LOCAL_STATE = "mmfl-local"
_CACHE: dict[tuple, Simulation] = {}
_NODES: dict[tuple, Node] = {}


def node_from_config(run_config: dict) -> Node:
    """This process's :class:`~mmfl.federated.node.Node` for the run config's recipe (built once, then reused)."""
    key = (str(run_config.get("recipe-yaml", "")), str(run_config.get("overrides", "")))
    if key not in _NODES:
        _NODES[key] = Node(run_config)
    return _NODES[key]


def federation_from_config(run_config: dict, cache: bool = True) -> Simulation:
    """The recipe's federation (backbone, prepared tasks, clients), built once per process and reused.

    Args:
        run_config: the run config (``recipe-yaml``, ``overrides``).
        cache: reuse (and keep) this process's one; False: a new one of the caller's own.

    Raises:
        ValueError: the recipe is missing or invalid (the message names what to fix).
    """
    from mmfl.backbone import Backbone
    from mmfl.data.task import prepare_task
    from mmfl.evaluation.protocol import Protocol
    from mmfl.federated.settings import seed_all

    key = (str(run_config.get("recipe-yaml", "")), tuple(shlex.split(str(run_config.get("overrides", "")))))
    if cache and key in _CACHE:
        return _CACHE[key]
    cfg, init, tasks, federation = read_recipe(run_config)
    protocol = init.evaluation or Protocol()
    prepared = [prepare_task(t, seed=cfg.seed, **protocol.split_args()) for t in tasks]
    seed_all(cfg.seed)
    backbone = Backbone(**cfg.backbone.as_dict())
    sim = Simulation(
        backbone, prepared, init.parts, init.training, federation, seed=cfg.seed, **protocol.selection_args()
    )
    if cache:
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
RESUME = "`flwr run APP CONNECTION --run-config resume=true`"


def client_stop_line(cid: str, rnd: int, folder: Path, keeps_local: bool) -> Callable[[str], str]:
    """The line a ClientApp stopped while training logs (:mod:`mmfl.federated.flower_stop`)."""

    def describe(cause: str) -> str:
        kept = latest_round(folder) if keeps_local else None
        if not keeps_local:
            own = "it keeps no tensors of its own"
        elif kept is None:
            own = "it has no round saved yet"
        else:
            own = f"its local tensors stay as of round {kept} ({folder})"
        return (
            f"mmfl ClientApp {cid}: stopped by {cause} while training round {rnd}, nothing sent; {own}; the ServerApp "
            f"sends the round again (federation.retries) or stops the run, and a stopped run continues with {RESUME}"
        )

    return describe


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the node's client on the received tensors; reply with its non-local tensors and metrics.

    The client's ``local`` tensors stay on the node, in ``context.state``, across rounds. Evaluation is folded
    into this reply (its local test split, when it has one), saving a round trip.
    """
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    node = node_from_config(run_config)
    layout = read_layout(dict(msg.content["config"]))
    client = node.client(node_client_id(node_config, layout), layout)
    rnd = int(msg.content["config"]["server-round"])
    folder = state_folder(run_config, node_config, client.data.cid)
    keeps_local = bool(client.local_snapshot())
    with stop_line(client_stop_line(client.data.cid, rnd, folder, keeps_local)):
        return _train(msg, context, node, client, rnd, folder, keeps_local)


def _train(
    msg: Message, context: Context, node: Node, client: Client, rnd: int, folder: Path, keeps_local: bool
) -> Message:
    """:func:`train`'s work for one client and round (``keeps_local``: the client has local tensors)."""
    if LOCAL_STATE in context.state.array_records:
        client.set_local(context.state.array_records[LOCAL_STATE].to_torch_state_dict())
    elif keeps_local:  # the first round of this Flower run on this node
        saved = load_local(folder, min(rnd - 1, int(msg.content["config"].get("resumed-from", 0))))
        if saved is not None:  # a resumed run: the local tensors as they were after the last complete round
            client.set_local(saved)
    node.global_state = msg.content["arrays"].to_torch_state_dict()  # this client's keys (or all of them)
    update, m = node.fit_client(client, rnd)
    local = client.local_state()
    if local:
        context.state.array_records[LOCAL_STATE] = ArrayRecord(local)
        save_local(folder, rnd, local)
    metrics = {"num-examples": update.num_examples, "train-loss": m["loss"], "train-accuracy": m["accuracy"]}
    metrics.update({k: v for k, v in m.items() if k.startswith("pseudo_")})  # an unlabeled client's choice
    if client.data.test is not None and len(client.data.test):
        ev = node.evaluate(client.module, client.task, client.data.test)
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
    """Say which of the recipe's clients this node runs (the server then sends it only that client's tensors); the
    query carries the federation's layout, which maps a ``partition-id`` to a client."""
    cid = node_client_id(dict(context.node_config), read_layout(dict(msg.content["config"])))
    return Message(RecordDict({"client": ConfigRecord({"cid": cid})}), reply_to=msg)


def round_timeout(cfg: dict) -> float:
    """The run config's ``round-timeout`` (seconds to wait for a round's replies; default 3600).

    Raises:
        ValueError: it is not a finite number > 0 (the run could wait forever).
    """
    timeout = float(cfg.get("round-timeout", 3600))
    if not 0 < timeout < math.inf:
        raise ValueError(f"round-timeout must be a finite number of seconds > 0, got {cfg['round-timeout']!r}")
    return timeout


def server_setup(cfg: dict) -> tuple[Simulation, Path | None, int, int]:
    """The ServerApp's federation (writing to ``output-dir``; without the clients' data), the nodes to wait for
    (``min-nodes``, default one per client) and the nodes to train each round (the recipe's fraction and
    ``min_clients``).

    Raises:
        ValueError: a setting that could make the run wait forever (``round-timeout``, ``min-nodes``), checked first.
    """
    round_timeout(cfg)
    if "min-nodes" in cfg and int(cfg["min-nodes"]) < 1:
        raise ValueError(f"min-nodes must be >= 1, got {cfg['min-nodes']!r}")
    sim = federation_from_config(cfg, cache=False)
    sim.release_client_data()  # the nodes hold it; the server keeps the tasks' test and validation splits
    sim.average_local = False  # the clients' local tensors are on the nodes: the server averages the merged ones
    out = Path(str(cfg["output-dir"])) if cfg.get("output-dir") else None
    check_output(out, as_flag(cfg.get("resume", False)))  # before anything there is touched
    if out is not None:
        sim.attach_output(out)
        if not as_flag(cfg.get("resume", False)) or not (out / "config.yaml").is_file():
            save_recipe(cfg, out)  # the run folder holds its recipe, as mmfl fit's does
    min_nodes = int(cfg.get("min-nodes", len(sim.clients)))
    fed = sim.federation
    min_train = max(1, min(min_nodes, max(fed.min_clients, math.ceil(fed.fraction * min_nodes))))
    return sim, out, min_nodes, min_train


# ---------------------------------------------------------------- ServerApp
server_app = ServerApp()


def server_stop_line(out: Path | None) -> Callable[[str], str]:
    """The line a ServerApp stopped mid-run logs (:mod:`mmfl.federated.flower_stop`)."""

    def describe(cause: str) -> str:
        if out is None:
            return f"mmfl ServerApp: stopped by {cause}; the app has no output-dir, so nothing is kept: run it again"
        done = completed_round(out)
        state = f"the last complete round is {done} ({out / CHECKPOINT})" if done else "no round is complete yet"
        return f"mmfl ServerApp: stopped by {cause}; {state}: continue with {RESUME}"

    return describe


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the recipe's rounds on the connected nodes, merging per scope group."""
    from mmfl.module import quiet_lightning

    cfg = dict(context.run_config)
    sim, out, min_nodes, min_train = server_setup(cfg)
    done = resume_server(sim, out) if as_flag(cfg.get("resume", False)) else 0
    rounds, timeout = sim.federation.rounds, round_timeout(cfg)
    if done >= rounds:
        log.info("the run in %s already completed its %d rounds; nothing to do", out, rounds)
        return
    strategy = ScopedFedAvg(
        sim,
        out,
        offset=done,
        timeout=timeout,
        fraction_train=sim.federation.fraction,
        min_train_nodes=min_train,
        min_available_nodes=min_nodes,
    )
    try:
        with quiet_lightning(), stop_line(server_stop_line(out)):
            strategy.start(
                grid,
                ArrayRecord({k: v.clone() for k, v in sim.global_state.items()}),
                num_rounds=rounds - done,
                timeout=timeout,
                evaluate_fn=strategy.evaluate,
            )
    except RoundFailed as e:
        log.error("%s", e)
        raise


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
    config = {"recipe-yaml": recipe_yaml, "overrides": overrides, "output-dir": str(output_dir or ""), "resume": False}
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
