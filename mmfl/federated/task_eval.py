"""Scoring a federation's global tensors: every task's test (and novel-class and validation) split each evaluated
round, with one evaluator module per task, and the check that class-agnostic parts can serve new classes."""

from __future__ import annotations

from mmfl.data.task import PreparedTask
from mmfl.module import ClientModule


class TaskEvaluation:
    """The evaluation logic of :class:`~mmfl.federated.simulation.Simulation` (a mixin: it uses the simulation's
    tasks, clients, global state, module builder, :meth:`~mmfl.federated.client_runner.ClientRunner.evaluate` and
    metrics)."""

    def class_dependent_keys(self, task: PreparedTask) -> list[str]:
        """Keys of the task's trainable tensors whose shape depends on the class list (class-specific parts):
        they cannot serve classes they were not trained on. Found by building the parts for one more class."""
        names = list(task.class_names)
        a = self.build_module(task, names).trainable_state_dict()
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

    def evaluator(self, task: PreparedTask, novel: bool = False) -> ClientModule:
        """A module per task that holds the global tensors (local tensors at their initial values).

        Args:
            task: the task.
            novel: with the task's novel class names (base-to-novel evaluation).
        """
        key = f"{task.name}/{task.modality}" + ("/novel" if novel else "")
        if key not in self._evaluators:
            if novel:
                self.check_new_classes(task)
            self._evaluators[key] = self.build_module(task, task.novel_class_names if novel else None)
        module = self._evaluators[key]
        module.load_trainable_state_dict(self.global_state)
        return module

    def evaluate_tasks(self, rnd: int, local_tests: bool = True) -> dict[str, float]:
        """Evaluate every task on its test split (and its novel classes' and validation data, when it has
        them) with the global tensors; record the rows; keep the best state by validation accuracy.

        Args:
            rnd: the round the rows are recorded under.
            local_tests: also score each client with a local test split on it (its module: the global tensors and
                its local ones). A Flower server leaves that to the nodes, which hold the data and local tensors.
        """
        accs, vals = {}, []
        for task in self.tasks:
            splits = [("test", False, task.test), ("test_novel", True, task.test_novel), ("val", False, task.val)]
            for split, novel, ds in splits:
                if ds is None or len(ds) == 0:
                    continue
                m = self.evaluate(self.evaluator(task, novel), task, ds)
                self.metrics.add(rnd, "task", task.name, task.modality, "", split, m["loss"], m["accuracy"], len(ds))
                if split == "val":
                    vals.append(m["accuracy"])
                else:
                    accs[f"{task.name}/{task.modality}" + ("/novel" if novel else "")] = m["accuracy"]
        if self.selection == "best_val" and sum(vals) / len(vals) > self.best_score:
            self._keep_best(rnd, sum(vals) / len(vals))
        for c in self.clients if local_tests else []:
            if c.data.test is not None and len(c.data.test):
                c.module.load_trainable_state_dict(self.global_state)
                self._record_client(
                    rnd, c, "local_test", self.evaluate(c.module, c.task, c.data.test), len(c.data.test)
                )
        return accs
