"""Scoring a federation's global tensors: every task's test (and novel-class and validation) split each evaluated
round, with one evaluator module per task, and the check that class-agnostic parts can serve new classes."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from mmfl.data.task import PreparedTask
from mmfl.federated.mixing import SHARES, Candidates, ShareChooser, at_share, choose_share
from mmfl.module import ClientModule

log = logging.getLogger(__name__)


class TaskEvaluation:
    """The evaluation logic of :class:`~mmfl.federated.simulation.Simulation` (a mixin: it uses the simulation's
    tasks, clients, global state, module builder, :meth:`~mmfl.federated.client_runner.ClientRunner.evaluate` and
    metrics)."""

    def class_dependent_keys(self, task: PreparedTask) -> list[str]:
        """Keys of the task's trainable tensors whose shape depends on the class list (class-specific parts):
        they cannot serve classes they were not trained on. Found by building the parts for one more class. Parts
        that serve only the trained classes (``trained_classes_only``) are left out of other classes' modules, so
        they do not count."""
        names = list(task.class_names)
        module = self.build_module(task, names)
        a = {
            k: v
            for p in module.parts.values()
            if not p.trained_classes_only
            for k, v in p.qualified_parameters(task.name, task.modality)
        }
        b = self.build_module(task, [*names, f"{names[0]} extra"]).trainable_state_dict()
        return sorted(k for k in a if k not in b or a[k].shape != b[k].shape)

    def check_new_classes(self, task: PreparedTask) -> None:
        """Raise a clear error when the task's parts cannot classify classes they were not trained on."""
        keys = self.class_dependent_keys(task)
        if keys:
            raise ValueError(
                f"task {task.name!r}: tensors {keys} are class-specific (one per trained class, e.g. CoOp "
                "class_specific: true), so they cannot classify novel classes or another data set's; base-to-novel "
                "and cross-dataset evaluation need class-agnostic parts"
            )

    def evaluator(
        self, task: PreparedTask, novel: bool = False, state: Mapping[str, Tensor] | None = None
    ) -> ClientModule:
        """A module per task that holds the global tensors (local tensors at their initial values).

        Args:
            task: the task.
            novel: with the task's novel class names (base-to-novel evaluation).
            state: load these tensors (of its keys) instead of the global ones.
        """
        key = f"{task.name}/{task.modality}" + ("/novel" if novel else "")
        if key not in self._evaluators:
            if novel:
                self.check_new_classes(task)
            self._evaluators[key] = self.build_module(task, task.novel_class_names if novel else None)
        module = self._evaluators[key]
        module.load_trainable_state_dict(self.global_state if state is None else state)
        return module

    def evaluate_tasks(self, rnd: int, local_tests: bool = True) -> dict[str, float]:
        """Evaluate every task on its test split (and its novel classes' and validation data, when it has
        them) with the global tensors; record the rows; keep the best state by validation accuracy.

        Args:
            rnd: the round the rows are recorded under.
            local_tests: also score each client with a local test split on it (its module: the global tensors and
                its local ones). A Flower server leaves that to the nodes, which hold the data and local tensors.
        """
        accs, vals = self.score_tasks(rnd)
        if self.selection == "best_val" and sum(vals) / len(vals) > self.best_score:
            self.keep_best(rnd, sum(vals) / len(vals))
        for c in self.clients if local_tests else []:
            if c.data.test is not None and len(c.data.test):
                c.module.load_trainable_state_dict(self.global_state)
                self._record_client(
                    rnd, c, "local_test", self.evaluate(c.module, c.task, c.data.test), len(c.data.test)
                )
        return accs

    def score_tasks(
        self, rnd: int, level: str = "task", state: Mapping[str, Tensor] | None = None
    ) -> tuple[dict[str, float], list[float]]:
        """Score ``state`` (None: the global tensors) on every task's test, novel-class and validation splits, each a
        metrics row of ``level``. Returns (test accuracy per ``task/modality[/novel]``, validation accuracy per task
        that has validation data)."""
        accs, vals = {}, []
        for task in self.tasks:
            splits = [("test", False, task.test), ("test_novel", True, task.test_novel), ("val", False, task.val)]
            for split, novel, ds in splits:
                if ds is None or len(ds) == 0:
                    continue
                m = self.evaluate(self.evaluator(task, novel, state=state), task, ds)
                self.metrics.add(rnd, level, task.name, task.modality, "", split, m["loss"], m["accuracy"], len(ds))
                if split == "val":
                    vals.append(m["accuracy"])
                else:
                    accs[f"{task.name}/{task.modality}" + ("/novel" if novel else "")] = m["accuracy"]
        return accs, vals

    def val_mixed_tasks(self, keys: set[str]) -> list[PreparedTask]:
        """The tasks whose clients hold any of ``keys`` (their evaluators do)."""
        return [t for t in self.tasks if keys & set(self.evaluator(t, state={}).trainable_keys(include_local=False))]

    def check_val_mixing(self) -> None:
        """Raise a clear error when a mix chooses its shares on validation data (``own=val``) and a task whose
        clients hold such a key has none."""
        keys = {k for k, rule in self.mixing.items() if rule.kind == "val"}
        bare = [f"{t.name}/{t.modality}" for t in self.val_mixed_tasks(keys) if t.val is None or len(t.val) == 0]
        if bare:
            raise ValueError(
                f"a part's scope mix(..., own=val) chooses its shares on validation data, but task(s) {bare} have "
                "none: set evaluation.val_fraction (e.g. 0.2) to hold some of each task's training data out"
            )

    def share_chooser(self, rnd: int) -> ShareChooser:
        """The :data:`~mmfl.federated.mixing.ShareChooser` of round ``rnd``: for each group of ``own=val`` keys, in
        turn, every share of :data:`~mmfl.federated.mixing.SHARES` is scored by the example-weighted accuracy of the
        tasks holding the group's keys on their validation splits (the other keys at the round's new values, the
        groups already chosen at their choice); :func:`~mmfl.federated.mixing.choose_share` picks one (the largest
        within one standard error of the best), recorded in a ``mix_share`` row (``value``: the share,
        ``accuracy``: its validation accuracy, ``note``: the group)."""

        def choose(groups: Candidates, targets: Mapping[str, Tensor]) -> dict[str, float]:
            state = {**self.global_state, **targets}
            shares: dict[str, float] = {}
            for group, items in groups.items():
                tasks = self.val_mixed_tasks({k for k, _, _ in items})
                correct = {}  # share → [N]: each validation example of the group's tasks, right or wrong
                for a in SHARES:
                    trial = {**state, **at_share(items, a)}
                    correct[a] = torch.cat([self.correct(self.evaluator(t, state=trial), t.val) for t in tasks])
                best = choose_share(correct)
                shares[group] = best
                state.update(at_share(items, best))
                task, modality = _names(group)
                acc, n = float(correct[best].double().mean()), correct[best].numel()
                self.metrics.add(rnd, "server", task, modality, "", "mix_share", math.nan, acc, n, best, group)
            log.info(
                "round %d: own shares chosen on validation data: %s",
                rnd,
                ", ".join(f"{g} {a:g}" for g, a in shares.items()),
            )
            return shares

        return choose


def _names(group: str) -> tuple[str, str]:
    """(task, modality) of a scope group's prefix (empty where the scope does not name one)."""
    scope, *rest = group.split("/")
    if scope == "task_modality":
        return rest[0], rest[1]
    if scope == "task":
        return rest[0], ""
    if scope == "modality":
        return "", rest[0]
    return "", ""
