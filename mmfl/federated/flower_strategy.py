"""The Flower ServerApp's strategy: Flower's FedAvg sampling and messaging, merged per scope group by mmfl's own
aggregator, retrying failed nodes, writing mmfl's round checkpoint; and resuming a run from it."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from torch import Tensor

from mmfl.federated.aggregate import Update
from mmfl.federated.checkpoint import save_state
from mmfl.federated.faults import RoundFailed, validate_update
from mmfl.federated.node import LAYOUT, layout_of
from mmfl.federated.resume import CHECKPOINT, save_checkpoint
from mmfl.federated.simulation import Simulation

log = logging.getLogger(__name__)


class ScopedFedAvg(FlowerFedAvg):
    """Flower's FedAvg sampling and messaging, merged per scope group with mmfl's own aggregator.

    Plain FedAvg requires every reply to carry the same keys; clients of different tasks and modalities do
    not. Each node is sent only the tensors of its own keys (learned by a query before its first round), and each key is
    merged over exactly the clients that returned it, by the recipe's aggregator.

    Args:
        sim: the server's federation (global state, aggregator, evaluation, metrics).
        output_dir: where metrics.csv, global.safetensors and checkpoint.safetensors go (None: nowhere).
        offset: rounds the run completed before this Flower run started (a resumed run); Flower counts from 1.
        timeout: seconds to wait for a round's replies (the run's ``round-timeout``; a node that has not replied by
            then is a failed node of the round), and for those of a retry.
        kwargs: Flower FedAvg's sampling arguments.
    """

    def __init__(
        self, sim: Simulation, output_dir: Path | None = None, offset: int = 0, timeout: float = 3600, **kwargs
    ) -> None:
        super().__init__(fraction_evaluate=0.0, **kwargs)
        self.sim = sim
        self.output_dir = output_dir
        self.offset = offset
        self.timeout = timeout
        self.node_keys: dict[int, list[str]] = {}
        self.node_client: dict[int, str] = {}  # the client each node said it runs
        self.failures: dict[int, int] = {}
        self._grid: Grid | None = None
        self._sent: dict[int, RecordDict] = {}  # this round's message to each node, for retries
        self._messages: dict[int, Message] = {}  # this round's last message to each node (the grid sets its id)
        self.layout = layout_of(sim.tasks)  # what a lean node needs to build its client (mmfl.federated.node)
        self.order = {c.data.cid: i for i, c in enumerate(sim.clients)}  # a client's index, by id

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """FedAvg's sampling; one message per node holding only its node's tensors once its keys are known.

        (FedAvg's own messages share one RecordDict, so each node gets a record of its own.)
        """
        rnd = server_round + self.offset
        self._grid, self._sent, self._messages = grid, {}, {}
        state = self.sim.global_state
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        self._learn_keys(
            grid, [m.metadata.dst_node_id for m in sampled if m.metadata.dst_node_id not in self.node_keys]
        )
        waiting = set()  # unlabeled clients before training.pseudo_labels.start_round are not asked
        if rnd < self.sim.training.pseudo_labels.start_round:
            waiting = {c.data.cid for c in self.sim.clients if not c.data.labeled}
        messages = []
        for msg in sampled:
            node = msg.metadata.dst_node_id
            if self.node_client.get(node) in waiting:
                continue
            keys = self.node_keys.get(node)
            mine = arrays if keys is None else ArrayRecord({k: state[k] for k in keys if k in state})
            record = RecordDict(
                {
                    "arrays": mine,
                    "config": ConfigRecord(
                        {
                            **dict(msg.content["config"]),
                            "server-round": rnd,
                            "resumed-from": self.offset,
                            LAYOUT: self.layout,
                        }
                    ),
                }
            )
            self._sent[node] = record
            self._messages[node] = Message(record, dst_node_id=node, message_type=MessageType.TRAIN)
            messages.append(self._messages[node])
        return messages

    def _nodes_of(self, replies: list[Message]) -> list[int]:
        """The node each reply answers for: its sender, or for an error the SuperLink wrote in a node's place (an
        unavailable node) the node the replied-to message went to."""
        sent = {m.metadata.message_id: node for node, m in self._messages.items()}  # ids set by the grid on sending
        return [sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies]

    def _learn_keys(self, grid: Grid, nodes: list[int]) -> None:
        """Ask new nodes which client they run (one query round trip) and note that client's non-local keys."""
        if not nodes:
            return
        record = RecordDict({"config": ConfigRecord({"ask": "client", LAYOUT: self.layout})})
        asks = [Message(record, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for reply in grid.send_and_receive(asks, timeout=600):
            # a node that cannot answer (or names no client of the recipe) gets the whole state; its reply is checked
            cid = "" if reply.has_error() else str(reply.content["client"]["cid"])
            if cid in self.order:
                self.node_client[reply.metadata.src_node_id] = cid
                client = self.sim.clients[self.order[cid]]
                self.node_keys[reply.metadata.src_node_id] = client.shared.trainable_keys(include_local=False)

    def _check(
        self, replies: list[Message], asked: Iterable[int]
    ) -> tuple[list[tuple[Message, Update]], list[tuple[int, str]]]:
        """Split replies into valid updates and failures by node, with reasons: errors, malformed or invalid replies,
        and the ``asked`` nodes that did not reply within the timeout."""
        good: list[tuple[Message, Update]] = []
        bad: list[tuple[int, str]] = []
        nodes = self._nodes_of(replies)
        replied = set(nodes)
        bad += [(n, f"no reply within {self.timeout:g} s (round-timeout)") for n in asked if n not in replied]
        for msg, node in zip(replies, nodes, strict=True):
            if msg.has_error():  # Flower's reason may hold the ClientApp's whole traceback: its last line says it
                lines = [line.strip() for line in str(msg.error.reason).splitlines() if line.strip()]
                bad.append((node, f"error: {(lines or ['?'])[-1]:.300}"))
                continue
            try:
                state: dict[str, Tensor] = msg.content["arrays"].to_torch_state_dict()
                cid = str(msg.content["client"]["cid"])
                n = int(msg.content["metrics"]["num-examples"])
            except (KeyError, TypeError, ValueError) as e:
                bad.append((node, f"malformed reply: {type(e).__name__}: {e}"))
                continue
            spec = self.sim.specs.get(cid)
            problem = validate_update(Update(cid, state, n), spec) if spec is not None else f"unknown client {cid!r}"
            if problem:
                bad.append((node, f"InvalidUpdate: {problem}"))
            else:
                good.append((msg, Update(cid, state, n)))
        return good, bad

    def _retry(self, rnd: int, good: list, bad: list, sent: int) -> tuple[list, list]:
        """Send the failed nodes their round's message again, up to ``federation.retries`` times, while fewer than
        ``min_clients`` replies are good (as the in-process engine does)."""
        fed = self.sim.federation
        needed = min(fed.min_clients, sent)
        for _ in range(fed.retries):
            nodes = [n for n, _ in bad if n in self._sent]
            if len(good) >= needed or not nodes or self._grid is None:
                break
            log.warning(
                "round %d: %d of %d nodes succeeded (min_clients %d); retrying the failed ones",
                rnd,
                len(good),
                sent,
                needed,
            )
            again = {n: Message(self._sent[n], dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes}
            self._messages.update(again)
            more, still = self._check(
                list(self._grid.send_and_receive(list(again.values()), timeout=self.timeout)), again
            )
            good += more
            bad = [(n, why) for n, why in bad if n not in again] + still  # the rest stay failed
        return good, bad

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Merge each key over the replies that hold it (retrying failed nodes per ``federation.retries``); record
        failed nodes in metrics.csv.

        Raises:
            RoundFailed: fewer than ``min_clients`` nodes succeeded after the retries (the run stops; its last
                complete round is in the checkpoint, and ``resume=true`` continues from there).
        """
        rnd = server_round + self.offset
        replies = list(replies)
        sent = len(self._messages) or len(replies)  # the nodes asked (a reply may be missing)
        good, bad = self._retry(rnd, *self._check(replies, list(self._messages)), sent)
        losses = []
        for msg, update in good:
            self.node_keys[msg.metadata.src_node_id] = sorted(update.state)
            metrics = msg.content["metrics"]
            c = self.sim.clients[self.order[update.cid]]
            loss, acc = float(metrics.get("train-loss", math.nan)), float(metrics.get("train-accuracy", math.nan))
            pseudo = {k: float(v) for k, v in metrics.items() if k.startswith("pseudo_")}
            self.sim.record_fit(rnd, c, {"loss": loss, "accuracy": acc, **pseudo}, update.num_examples)
            if "local-test-accuracy" in metrics:
                ev = {"loss": math.nan, "accuracy": float(metrics["local-test-accuracy"])}
                self.sim._record_client(rnd, c, "local_test", ev, int(metrics["local-test-examples"]))
            losses.append((loss, update.num_examples))
        for node, why in bad:
            self.failures[rnd] = self.failures.get(rnd, 0) + 1
            self.sim.metrics.add(rnd, "node", "", "", str(node), "fit_failed", math.nan, math.nan, 0, note=why)
            log.warning("round %d: node %d left out: %s", rnd, node, why)
        needed = min(self.sim.federation.min_clients, sent)
        if len(good) < needed:
            self.sim.metrics.rows = [r for r in self.sim.metrics.rows if r["round"] != rnd]  # the round did not happen
            reasons = "; ".join(f"node {n}: {why}" for n, why in bad)
            raise RoundFailed(
                f"round {rnd}: only {len(good)} of {sent} nodes succeeded, fewer than min_clients={needed} "
                f"(after {self.sim.federation.retries} retries); {reasons}. The run stops; the last complete round is "
                f"{rnd - 1} (continue with --run-config resume=true once the nodes are mended)"
            )
        if not good:
            log.warning("round %d: no client replied; the global state is unchanged", rnd)
            return None, MetricRecord({"failures": float(len(bad))})
        updates = sorted((u for _, u in good), key=lambda u: self.order[u.cid])  # in-process order: same float sums
        self.sim.merge(rnd, updates, sent)
        total = sum(n for _, n in losses)
        loss = sum(v * n for v, n in losses) / total if total else math.nan
        return ArrayRecord(self.sim.global_state), MetricRecord(
            {"train-loss": loss, "clients": float(len(updates)), "failures": float(len(bad))}
        )

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Server-side evaluation (``evaluate_fn``), the round's commit point: every task's test split, metrics.csv,
        ``global.safetensors`` and ``checkpoint.safetensors`` (as ``mmfl fit`` writes them)."""
        sim, rnd = self.sim, server_round + self.offset
        if server_round == 0 and self.offset:  # a resumed run: round `offset` was evaluated and saved before
            return MetricRecord({})
        sim.global_state.update(arrays.to_torch_state_dict())
        rounds = sim.federation.rounds
        out: dict[str, float] = {}
        if rnd == 0 or rnd % sim.federation.eval_every == 0 or rnd == rounds:
            out = {k: float(v) for k, v in sim.evaluate_tasks(rnd, local_tests=False).items()}
            log.info("round %d: test accuracy %s", rnd, out)
        averaged = sim.end_average(rnd)  # average_rounds: the merged tensors only (the nodes keep their local ones)
        if averaged:
            log.info("averaged over %s: test accuracy %s", sim.window(), averaged)
        sim.metrics.flush()
        if self.output_dir is not None:
            if rnd == rounds:  # the result, once there is one (a stopped run has none to mistake)
                meta = {"round": str(rnd), "rounds": str(rounds), "backbone": sim.backbone.model_name}
                save_state(self.output_dir / "global.safetensors", sim.global_state, meta)
            save_checkpoint(sim, rnd)
        sim.completed = rnd
        return MetricRecord(out)


def as_flag(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def check_output(out: Path | None, resume: bool) -> None:
    """Check a ServerApp's output folder before anything in it is touched.

    Raises:
        ValueError: a new run into a folder that holds one (it would be overwritten); ``resume`` without an output
            folder.
    """
    ckpt = out / CHECKPOINT if out is not None else None
    if not resume:
        if ckpt is not None and ckpt.exists():
            raise ValueError(
                f"output-dir {str(out)!r} already holds a run (its {CHECKPOINT}); continue it with "
                "`flwr run APP ... --run-config resume=true`, or give the app another output folder"
            )
        return
    if ckpt is None:
        raise ValueError("resume=true needs the app's output-dir (where the run's checkpoint is)")


def resume_server(sim: Simulation, out: Path) -> int:
    """Restore a ServerApp's federation from ``out``'s checkpoint (see :func:`check_output`); returns its round
    (0 when there is none yet)."""
    done = sim.resume(out)
    if done is None:
        log.info("resume: %s has no checkpoint yet; starting from round 0", out)
        return 0
    log.info("resuming the run in %s after round %d of %d", out, done, sim.federation.rounds)
    return done
