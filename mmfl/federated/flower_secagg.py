"""Secure aggregation (SecAgg+) on the Flower engine.

Flower 1.42's SecAgg+ (``secaggplus_mod`` + ``SecAggPlusWorkflow``) works only with Flower's legacy server API,
so this module holds a second pair of apps beside :mod:`mmfl.federated.flower` (the only other module importing
``flwr``). SecAgg+ reveals to the server only the example-weighted *sum* of equally shaped vectors over the
clients that took part, so scope groups are encoded in the vectors themselves: every client sends, for every
key of the federation, its tensor if it holds that key (zeros otherwise) and a one-element "holds" flag. The
server receives ``A_k = Σ n_c·h_ck·θ_ck / Σ n_c`` and ``B_k = Σ n_c·h_ck / Σ n_c`` and sets ``θ_k = A_k / B_k``:
exactly FedAvg over the clients of key k's scope group, without seeing any client's tensors.

Consequences, stated in docs/reliability.md, "What is protected": the merge rule must be a mean (FedAvg, or FedAvgM on
top of it); robust rules and the server's reply validation need individual updates, so they are unavailable;
each client checks its own reply (finite values, ``|θ| ≤ clipping range``) and clips its own update when
``federation.clip_norm`` or ``federation.dp`` is set; the server adds the DP noise to the unmasked mean.
Values are quantized by SecAgg+ (step ≈ 2·clipping_range / quantization_range per client).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from torch import Tensor

from mmfl.federated.aggregate import Aggregator, FedAvg, FedAvgM, clip_updates
from mmfl.federated.checkpoint import save_state
from mmfl.federated.faults import spec_of, validate_update
from mmfl.federated.flower import LOCAL_STATE, node_from_config, server_setup
from mmfl.federated.flower_strategy import as_flag
from mmfl.federated.node import LAYOUT, layout_of, node_client_id, read_layout
from mmfl.federated.round_merge import finish
from mmfl.federated.simulation import Simulation

log = logging.getLogger(__name__)

KEYS = "mmfl-keys"
"""The key, in a fit message's config, of the federation's keys in the order of the parameters (JSON)."""

DEFAULTS = {
    "secagg-num-shares": 1.0,
    "secagg-threshold": 0.67,
    "secagg-clipping-range": 8.0,
    "secagg-max-weight": 1000.0,
}


def check_secure(aggregator: Aggregator, clients: int) -> None:
    """Raise a clear error when a recipe needs what secure aggregation hides (individual updates).

    Args:
        aggregator: the recipe's merge rule.
        clients: how many clients the federation has.
    """
    base = aggregator.base if isinstance(aggregator, FedAvgM) else aggregator
    if not isinstance(base, FedAvg):
        raise ValueError(
            f"secure aggregation reveals only sums, so {type(base).__name__} (which needs every client's update) "
            "cannot run under it; use mmfl.federated.FedAvg (or FedAvgM on top of it)"
        )
    if clients < 3:
        raise ValueError(f"SecAgg+ needs at least 3 clients per round; the recipe has {clients}")


def _keys(sim: Simulation) -> list[str]:
    return sorted(sim.global_state)


def _weighted(agg: Aggregator, dp: object) -> bool:
    base = agg.base if isinstance(agg, FedAvgM) else agg
    return bool(base.weighted) and dp is None


# ---------------------------------------------------------------- ClientApp
class SecureClient(NumPyClient):
    """One node's client: trains like the in-process engine, then sends the masked, scope-encoded vectors."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        """Train on the received global tensors; return [θ_k or 0 for every key] + [holds flag per key]."""
        ctx = self.context
        cfg = {**DEFAULTS, **dict(ctx.run_config)}
        node = node_from_config(dict(ctx.run_config))  # a lean node: only its own client (mmfl.federated.node)
        layout = read_layout(config)
        client = node.client(node_client_id(dict(ctx.node_config), layout), layout)
        keys = json.loads(str(config[KEYS]))  # every key of the federation, in the order of `parameters`
        spec = spec_of(client.shared.trainable_state_dict(include_local=False))  # its own keys
        glob = {
            k: torch.from_numpy(np.array(p)).to(spec[k][1])
            for k, p in zip(keys, parameters[: len(keys)], strict=True)
            if k in spec
        }
        node.global_state = glob
        if LOCAL_STATE in ctx.state.array_records:
            client.set_local(ctx.state.array_records[LOCAL_STATE].to_torch_state_dict())
        update, m = node.fit_client(client, int(config["server-round"]))
        problem = validate_update(update, spec)  # the server cannot check: the client does
        if problem:
            raise ValueError(f"client {client.data.cid}: invalid update, not sent: {problem}")
        fed = node.federation
        clip = fed.dp.clip_norm if fed.dp is not None else fed.clip_norm
        if clip is not None:
            update = clip_updates([update], glob, clip)[0]
        bound = float(cfg["secagg-clipping-range"])
        worst = max((float(v.abs().max()) for v in update.state.values() if v.numel()), default=0.0)
        if worst > bound:
            raise ValueError(
                f"client {client.data.cid}: a tensor value {worst:.3g} exceeds the SecAgg+ clipping range {bound:g}; "
                "raise secagg-clipping-range (mmfl flower-app --secagg_clipping_range)"
            )
        local = client.local_state()
        if local:
            ctx.state.array_records[LOCAL_STATE] = ArrayRecord(local)
        values = [
            update.state[k].double().numpy() if k in update.state else np.zeros(np.shape(p))
            for k, p in zip(keys, parameters[: len(keys)], strict=True)
        ]
        holds = [np.array([1.0 if k in update.state else 0.0]) for k in keys]
        metrics = {"train-loss": m["loss"], "train-accuracy": m["accuracy"], "cid": update.cid}
        if client.data.test is not None and len(client.data.test):
            ev = node.evaluate(client.module, client.task, client.data.test)
            metrics.update({"local-test-accuracy": ev["accuracy"], "local-test-examples": len(client.data.test)})
        metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        return values + holds, (update.num_examples if _weighted(fed.aggregator, fed.dp) else 1), metrics


def _client_fn(context: Context):
    return SecureClient(context).to_client()


secure_client_app = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])


# ---------------------------------------------------------------- ServerApp
class SecureScopedFedAvg(LegacyFedAvg):
    """Flower's (legacy) FedAvg sampling; the SecAgg+ aggregate decoded per key into FedAvg over scope groups."""

    def __init__(self, sim: Simulation, output_dir: Path | None, **kwargs) -> None:
        super().__init__(fraction_evaluate=0.0, min_evaluate_clients=0, accept_failures=True, **kwargs)
        self.sim = sim
        self.output_dir = output_dir
        self.layout = layout_of(sim.tasks)

    def initialize_parameters(self, client_manager):
        """The global tensors, one array per key in sorted key order."""
        return ndarrays_to_parameters([self.sim.global_state[k].double().numpy() for k in _keys(self.sim)])

    def configure_fit(self, server_round, parameters, client_manager):
        """FedAvg's sampling, with the round number, the federation's layout and its keys (the order of the
        parameters) in each client's config."""
        pairs = super().configure_fit(server_round, parameters, client_manager)
        config = {"server-round": server_round, LAYOUT: self.layout, KEYS: json.dumps(_keys(self.sim))}
        return [(proxy, FitIns(ins.parameters, {**ins.config, **config})) for proxy, ins in pairs]

    def aggregate_fit(self, server_round, results, failures):
        """Decode ``A_k / B_k`` per key from the secure aggregate; record the replies' metrics and failures."""
        sim = self.sim
        for _, res in results:
            cid = str(res.metrics.get("cid", ""))
            c = next((c for c in sim.clients if c.data.cid == cid), None)
            if c is None:
                continue
            m = {
                "loss": float(res.metrics.get("train-loss", math.nan)),
                "accuracy": float(res.metrics.get("train-accuracy", math.nan)),
            }
            sim.record_fit(server_round, c, m, int(res.num_examples))
            if "local-test-accuracy" in res.metrics:
                ev = {"loss": math.nan, "accuracy": float(res.metrics["local-test-accuracy"])}
                sim._record_client(server_round, c, "local_test", ev, int(res.metrics["local-test-examples"]))
        for f in failures:
            why = f"{type(f).__name__}: {f}" if isinstance(f, BaseException) else "no reply"
            sim.metrics.add(server_round, "node", "", "", "", "fit_failed", math.nan, math.nan, 0, note=why)
        if not results:
            log.warning("round %d: no client replied; the global state is unchanged", server_round)
            return None, {}
        keys = _keys(sim)
        arrays = parameters_to_ndarrays(results[0][1].parameters)  # the secure aggregate (the same in every reply)
        merges: dict[str, Tensor] = {}  # float64
        counts: dict[str, int] = {}
        weights: dict[str, float] = {}  # B_k: the holders' share, each group's weight in a mean over groups (mixing)
        for i, k in enumerate(keys):
            a, b = arrays[i], float(np.asarray(arrays[len(keys) + i]).reshape(-1)[0])
            if b > 1e-9:
                merges[k] = torch.from_numpy(np.asarray(a, dtype=np.float64) / b)
                counts[k] = max(1, round(b * len(results)))  # unweighted (DP): B_k is the holders' share
                weights[k] = b
        release = None
        if sim.federation.dp is not None:
            sampled = len(results) + len(failures)
            release = functools.partial(sim.private, server_round, sampled=sampled, replied=len(results))
        dtypes = {k: sim.global_state[k].dtype for k in merges}
        # DP noise on the decoded means, then mixing and the server optimizer's step (post-processing)
        agg = sim.federation.aggregator
        choose = sim.share_chooser(server_round) if sim.chooses_shares else None
        merged = finish(
            merges, counts, agg, sim.global_state, dtypes, sim.mixing, release, group_weights=weights, choose=choose
        )
        sim.global_state.update(merged)
        return self.initialize_parameters(None), {"clients": len(results), "failures": len(failures)}

    def evaluate(self, server_round, parameters):
        """Server-side evaluation of every task with the global tensors; metrics.csv and global.safetensors."""
        sim = self.sim
        rounds = sim.federation.rounds
        accs = {}
        if server_round == 0 or server_round % sim.federation.eval_every == 0 or server_round == rounds:
            accs = sim.evaluate_tasks(server_round, local_tests=False)
            log.info("round %d: test accuracy %s", server_round, accs)
        sim.metrics.flush()
        if self.output_dir is not None and server_round > 0:
            meta = {
                "round": str(server_round),
                "rounds": str(rounds),
                "backbone": sim.backbone.model_name,
                "secure_aggregation": "secagg+",
            }
            save_state(self.output_dir / "global.safetensors", sim.global_state, meta)
        return 0.0, {k: float(v) for k, v in accs.items()}


secure_server_app = ServerApp()


@secure_server_app.main()
def secure_main(grid: Grid, context: Context) -> None:
    """Run the recipe's rounds with SecAgg+ (Flower's legacy workflow), merging per scope group."""
    from mmfl.module import quiet_lightning

    cfg = {**DEFAULTS, **dict(context.run_config)}
    if as_flag(cfg.get("resume", False)):
        raise ValueError("resume=true is not built for SecAgg+ apps (they write no round checkpoint); start it anew")
    sim, out, min_nodes, min_train = server_setup(cfg)
    check_secure(sim.federation.aggregator, len(sim.clients))
    strategy = SecureScopedFedAvg(
        sim,
        out,
        fraction_fit=sim.federation.fraction,
        min_fit_clients=max(3, min_train),
        min_available_clients=min_nodes,
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=sim.federation.rounds), strategy=strategy)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=float(cfg["secagg-num-shares"]),
            reconstruction_threshold=float(cfg["secagg-threshold"]),
            clipping_range=float(cfg["secagg-clipping-range"]),
            max_weight=float(cfg["secagg-max-weight"]),
        )
    )
    with quiet_lightning():
        workflow(grid, legacy)  # evaluates round 0 (strategy.evaluate), then runs the rounds
