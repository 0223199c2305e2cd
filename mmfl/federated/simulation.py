"""In-process federation: all clients in one process, one shared frozen backbone, Lightning training."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import Logger
from torch import Tensor

from mmfl.backbone import Backbone
from mmfl.data.task import PreparedTask
from mmfl.federated.averaging import RoundAverage
from mmfl.federated.checkpoint import save_state
from mmfl.federated.client_runner import ClientRunner, PartFactory
from mmfl.federated.faults import spec_of
from mmfl.federated.metrics import MetricsWriter
from mmfl.federated.mixing import MixRule, start_together
from mmfl.federated.pool import Client
from mmfl.federated.resume import CHECKPOINT, load_checkpoint, restore, save_checkpoint
from mmfl.federated.rounds import Rounds
from mmfl.federated.run_loggers import log_round
from mmfl.federated.settings import Federation, LocalTraining, seed_all
from mmfl.federated.summary import human_duration
from mmfl.federated.task_eval import TaskEvaluation
from mmfl.federated.virtual_features import VirtualClients
from mmfl.module import ClientModule, quiet_lightning
from mmfl.progress import NoProgress

log = logging.getLogger(__name__)


class Simulation(ClientRunner, Rounds, TaskEvaluation, RoundAverage, VirtualClients):
    """Runs a federation in this process.

    Clients are (task, modality, data partition). Each round a fraction of them is sampled; each loads
    the global tensors of its keys, trains with a fresh Lightning ``Trainer``, and replies with its
    non-local trainable tensors and example count; the server merges each key over the clients that
    returned it and evaluates every task on its test split. All clients share the one ``backbone``.

    Args:
        backbone: the frozen backbone shared by every client.
        tasks: prepared tasks (see :func:`mmfl.data.prepare_task`).
        parts: factories of the trainable parts each client owns.
        training: local training settings.
        federation: round settings.
        seed: seeds initial tensors, client sampling, data order and training.
        output_dir: where ``metrics.csv`` and ``global.safetensors`` go (None: write nothing).
        selection: ``last``, or ``best_val``: keep the global state of the evaluated round with the best mean
            validation accuracy over tasks (``best_state``, ``best.safetensors``). Needs tasks with ``val``
            data; test data never take part. Or ``average``: the mean of the states after each of the last
            ``average_rounds`` rounds (:mod:`mmfl.federated.averaging`; ``average.safetensors``).
        average_rounds: with ``selection="average"``, how many of the last rounds are averaged (None: the last
            half, rounded up); with ``"best_val"``, the average of that many last rounds is one more candidate.
        per_client_modules: give every client a module of its own instead of one per (task, modality) with each
            client's own state swapped in (:mod:`mmfl.federated.pool`); the same results, more memory.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Sequence[PreparedTask],
        parts: Sequence[PartFactory],
        training: LocalTraining | None = None,
        federation: Federation | None = None,
        seed: int = 0,
        output_dir: str | Path | None = None,
        selection: str = "last",
        per_client_modules: bool = False,
        average_rounds: int | None = None,
    ) -> None:
        super().__init__(backbone, parts, training, federation, seed)
        self.tasks = list(tasks)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.federation.check()
        self.training.check()
        if selection not in ("last", "best_val", "average"):
            raise ValueError(f"selection must be 'last', 'best_val' or 'average', got {selection!r}")
        if selection == "best_val" and any(t.val is None or len(t.val) == 0 for t in self.tasks):
            raise ValueError("selection 'best_val' needs validation data for every task (evaluation.val_fraction)")
        self.selection = selection
        self.init_average(selection, average_rounds)

        names: dict[str, list[str]] = {}
        for task in self.tasks:
            first = names.setdefault(task.name, task.class_names)
            if first != task.class_names:
                raise ValueError(
                    f"task {task.name!r} has different class names on its {task.modality!r} clients "
                    f"({task.class_names}) "
                    f"than on its other clients ({first}); a task's modalities must share one label set"
                )
        seed_all(seed)
        self.clients: list[Client] = []
        anchors = self.training.knowledge.anchors > 0
        for task in self.tasks:
            pool: ClientModule | None = None
            for data in task.clients:
                if per_client_modules or pool is None:
                    module = self.build_module(task)
                    pool = pool or module
                    c = Client(data, task, module, own=per_client_modules, anchors=anchors and data.labeled)
                    c.local = {} if c.own else module.trainable_state_dict(local_only=True)
                else:  # its parts are built all the same: its initial local tensors, and the same random draws
                    c = Client(data, task, pool, local=self.initial_local(task), anchors=anchors and data.labeled)
                if c.own and c.anchors:  # synthetic anchors for the classes it lacks
                    c.shared.held_classes = c.held_classes()
                self.clients.append(c)
        if not self.clients:
            raise ValueError("the federation has no clients: give at least one task")
        if self.training.pseudo_labels.start_round > 1 and not any(c.data.labeled for c in self.clients):
            raise ValueError(
                f"training.pseudo_labels.start_round is {self.training.pseudo_labels.start_round} but no client holds "
                "labels, so rounds before it would train nothing: set start_round: 1, or give a task labeled clients"
            )
        firsts = list({id(c.task): c for c in reversed(self.clients)}.values())[::-1]  # each task's first client
        for c in firsts:
            if not any(p.requires_grad for p in c.shared.parts.parameters()):
                raise ValueError(
                    f"clients of task {c.task.name!r} ({c.task.modality}) have nothing to train: add a part to "
                    "`parts` that works with that modality"
                )
        used = {name for c in firsts for name in c.shared.parts}
        for task in self.tasks:
            unused = [p.part_name for p in self._all_parts(task) if p.part_name not in used]
            if unused:
                raise ValueError(
                    f"part(s) {unused} work with none of the federation's modalities "
                    f"({sorted({t.modality for t in self.tasks})}); remove them or add clients they work with"
                )
        # The server's initial state: each key's tensor from the first client that holds it (a (task, modality)'s
        # clients hold the same keys); the groups of a mixed key start from one tensor (the first group's), as a
        # plain key of the wide scope would.
        self.global_state: dict[str, Tensor] = {}
        self.mixing: dict[str, MixRule] = {}
        specs = {}
        for c in firsts:
            state = c.shared.trainable_state_dict(include_local=False)
            for k, v in state.items():
                self.global_state.setdefault(k, v)
            self.mixing.update(c.shared.mix_rules())
            specs[id(c.task)] = spec_of(state)
        start_together(self.mixing, self.global_state)
        self.specs = {c.data.cid: specs[id(c.task)] for c in self.clients}
        self.completed: int | None = None  # the last completed round (0: the evaluation before training)
        self.progress: NoProgress = NoProgress()
        """Told of each round and client as they finish (:func:`mmfl.progress.progress_for`: a live display)."""
        self.loggers: list[Logger] = []
        """Lightning loggers that receive each round's metrics (recipe ``loggers``, :mod:`.run_loggers`)."""
        self._evaluators: dict[str, ClientModule] = {}
        for task in self.tasks:  # built now, so their initial (local) tensors do not depend on when they are needed
            self.evaluator(task)
            if task.novel_class_names:  # fail now, not after training, when a part cannot serve new classes
                self.evaluator(task, novel=True)
        self.check_val_mixing()  # mix(..., own=val) needs each task holding its keys to have validation data
        self.init_virtual_clients()
        self.best_round: int | None = None
        self.best_score = -math.inf
        self.best_state: dict[str, Tensor] = {}
        self.best_local: dict[str, dict[str, Tensor]] = {}
        self.metrics = MetricsWriter(None)
        if self.output_dir is not None:
            self.attach_output(self.output_dir)

    def attach_output(self, output_dir: str | Path) -> None:
        """Write ``metrics.csv`` and ``global.safetensors`` to ``output_dir`` from now on."""
        self.output_dir = Path(output_dir)
        rows = self.metrics.rows
        self.metrics = MetricsWriter(self.output_dir / "metrics.csv")
        if rows:  # a resumed run: its rows so far, written again in full
            self.metrics.restore(rows)

    def release_client_data(self) -> None:
        """Forget the clients' data (a Flower ServerApp's federation: the nodes hold it). Each client keeps its id
        and whether it is labeled; the tasks keep their test and validation splits."""
        for task in self.tasks:
            for data in task.clients:
                data.train = task.test.select([])  # no rows; the partition's source split is let go
                data.test = None

    # ---------------------------------------------------------------- one round
    def sample(self, rnd: int) -> list[int]:
        """Indices of the clients sampled in round ``rnd`` (deterministic in seed and round); before
        ``training.pseudo_labels.start_round``, the unlabeled ones among them are left out."""
        n = len(self.clients)
        k = min(n, max(self.federation.min_clients, math.ceil(self.federation.fraction * n)))
        rng = np.random.default_rng([self.seed, rnd])
        chosen = sorted(rng.choice(n, size=k, replace=False).tolist())
        if rnd < self.training.pseudo_labels.start_round:  # unlabeled clients wait for a model worth labelling with
            chosen = [i for i in chosen if self.clients[i].data.labeled]
        return chosen

    def _record_client(
        self, rnd: int, c: Client, split: str, m: dict[str, float], examples: int, value: float = math.nan
    ) -> None:
        self.metrics.add(
            rnd, "client", c.task.name, c.task.modality, c.data.cid, split, m["loss"], m["accuracy"], examples, value
        )

    def keep_best(
        self,
        rnd: int,
        score: float,
        state: dict[str, Tensor] | None = None,
        local: dict[str, dict[str, Tensor]] | None = None,
        average: str | None = None,
    ) -> None:
        """Keep a state as the best so far (by validation): the global state and every client's local tensors after
        round ``rnd``, or the given ones (``average``: they are the mean of these rounds, e.g. ``"3–4"``)."""
        self.best_round, self.best_score, self.best_average = rnd, score, average
        self.best_state = {k: v.clone() for k, v in (self.global_state if state is None else state).items()}
        self.best_local = local if local is not None else {c.data.cid: c.local_snapshot() for c in self.clients}
        if self.output_dir is not None:
            meta = {"round": str(rnd), "val_accuracy": f"{score:.6f}", "backbone": self.backbone.model_name}
            meta.update({"average_of_rounds": average} if average else {})
            save_state(self.output_dir / "best.safetensors", self.best_state, meta)

    def selected(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """The state the selection rule picks: (global tensors, local tensors per client id)."""
        if self.selection == "best_val" and self.best_round is not None:
            return self.best_state, self.best_local
        if self.selection == "average" and self.avg_count:
            return self.averaged()
        return self.global_state, {c.data.cid: self.local_state(c) for c in self.clients}

    @staticmethod
    def local_state(c: Client) -> dict[str, Tensor]:
        """A copy of the client's ``local`` tensors (they never leave it)."""
        return c.local_state()

    def save_local_states(self, clients: Sequence[Client], rnd: int) -> None:
        """Write each client's ``local`` tensors (never sent) to ``local/<task>/<modality>/<i>.safetensors``."""
        assert self.output_dir is not None
        for c in clients:
            state = c.local_snapshot()
            if state:
                save_state(self.output_dir / "local" / f"{c.data.cid}.safetensors", state, {"round": str(rnd)})

    # ---------------------------------------------------------------- the loop
    def resume(self, run_dir: str | Path) -> int | None:
        """Restore the state after the last complete round from ``run_dir/checkpoint.safetensors``.

        Returns:
            That round, or None when the run has no checkpoint yet (it then starts from the beginning).

        Raises:
            ValueError: a truncated or corrupt checkpoint, or one written by another recipe or seed.
        """
        path = Path(run_dir) / CHECKPOINT
        if not path.exists():
            return None
        ckpt = load_checkpoint(path)  # its errors name the file
        try:
            return restore(self, ckpt)
        except ValueError as e:
            raise ValueError(f"{str(path)!r}: {e}") from e

    def _end_round(self, rnd: int, started: float, msg: str, eta: str = "") -> None:
        self.metrics.flush()
        if self.output_dir is not None:
            if rnd == self.federation.rounds:  # the result, once there is one (a stopped run has none to mistake)
                save_state(
                    self.output_dir / "global.safetensors",
                    self.global_state,
                    {"round": str(rnd), "rounds": str(self.federation.rounds), "backbone": self.backbone.model_name},
                )
            save_checkpoint(self, rnd)  # the commit point: a resumed run continues after this round
        self.completed = rnd
        log_round(self.loggers, self.metrics.rows, rnd)
        self.progress.round_end(rnd)
        log.info("%s (%.1f s%s)", msg, time.perf_counter() - started, eta)

    def run(self) -> dict[str, Tensor]:
        """Run all rounds (evaluating before round 1 and every ``eval_every`` rounds), continuing after
        :meth:`resume`'s round when it was called. Writes a checkpoint after every round when it has an output
        folder.

        Returns:
            The final global trainable state.

        Raises:
            RoundFailed: a round had fewer than ``min_clients`` successful clients, even after the retries.
        """
        rounds = self.federation.rounds
        self.progress.start(self.completed or 0, rounds)
        try:
            with quiet_lightning():
                if self.completed is None:
                    t0 = time.perf_counter()
                    self.progress.round_start(0, 1)
                    accs = self.evaluate_tasks(0)
                    self._end_round(0, t0, f"round 0/{rounds} (before training): test accuracy {_fmt(accs)}")
                elif self.completed < rounds:
                    log.info("resuming after round %d of %d", self.completed, rounds)
                first, t_first = self.completed + 1, time.perf_counter()
                for rnd in range(first, rounds + 1):
                    t0 = time.perf_counter()
                    n = len(self.sample(rnd))
                    self.progress.round_start(rnd, n)
                    self.run_round(rnd)
                    fit_loss = self.metrics.mean(rnd, "fit", "loss")
                    msg = f"round {rnd}/{rounds}: {n}/{len(self.clients)} clients sampled, fit loss {fit_loss:.4f}"
                    kept = [r for r in self.metrics.rows if r["round"] == rnd and r["split"] == "pseudo_labels"]
                    if kept:  # the unlabeled clients' loss is on their own pseudo-labels: apart
                        unlabeled = self.metrics.mean(rnd, "fit_unlabeled", "loss")
                        msg += f" (unlabeled: {unlabeled:.4f} on {sum(int(r['examples']) for r in kept)} pseudo-labels)"
                    if rnd % self.federation.eval_every == 0 or rnd == rounds:
                        accs = self.evaluate_tasks(rnd)
                        msg += f", test accuracy {_fmt(accs)}"
                    accs = self.end_average(rnd)
                    if accs:
                        msg += f"; averaged over {self.window()}: {_fmt(accs)}"
                    left = (time.perf_counter() - t_first) / (rnd - first + 1) * (rounds - rnd)  # mean round so far
                    self._end_round(rnd, t0, msg, f", ETA {human_duration(left)}" if rnd < rounds else "")
        finally:
            self.progress.stop()
        return self.global_state


def _fmt(accs: dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in accs.items())
