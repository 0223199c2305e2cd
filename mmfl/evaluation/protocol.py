"""The evaluation protocol a recipe fixes: splits, checkpoint selection, seeds, baselines, transfer targets."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmfl.data.task import Task

SELECTIONS = ("last", "best_val")
BASELINES = ("zeroshot", "ensemble", "centralised")


@dataclass
class Transfer:
    """A cross-dataset target: the tensors learned for task ``source`` applied with ``task``'s class names.

    Args:
        source: name of a trained task whose ``task``-scoped tensors (and the global and modality ones) are used.
        task: the target task; it is never trained on (its clients, shots and partitioner are ignored).
    """

    source: str
    task: Task


@dataclass
class Protocol:
    """How a recipe's run is evaluated (the ``evaluation:`` section of a recipe).

    ``mmfl fit`` uses the split and selection settings; ``mmfl evaluate`` uses all of them.

    Args:
        base_to_novel: split each task's classes in half (first ``ceil(C/2)`` labels base, the rest novel);
            training and validation see the base classes only.
        val_fraction: share of each task's training split held out, before partitioning, as validation data.
        selection: which global state is evaluated: ``last`` (the final round's) or ``best_val`` (the round
            with the best mean validation accuracy over tasks; needs ``val_fraction > 0``). Test data never
            take part in the choice.
        unseen_clients: per task, the last this many client partitions are never trained; they are evaluated
            with the merged tensors on their own data.
        transfer: cross-dataset targets.
        seeds: ``mmfl evaluate`` trains and scores once per seed and reports mean ± std; the recipe's ``seed``
            alone when None.
        baselines: reference methods scored in the same table: ``zeroshot`` (one hand-written template),
            ``ensemble`` (the task's template ensemble), ``centralised`` (each (task, modality)'s training data
            pooled in one client, same parts, rounds and epochs: the upper reference).
        template: the single hand-written template of the ``zeroshot`` baseline.
        ece_bins: bins of the expected calibration error.
    """

    base_to_novel: bool = False
    val_fraction: float = 0.0
    selection: str = "last"
    unseen_clients: int = 0
    transfer: list[Transfer] = field(default_factory=list)
    seeds: list[int] | None = None
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    template: str = "a photo of a {}."
    ece_bins: int = 15

    def check(self, tasks: list[Task]) -> None:
        """Cheap checks against the recipe's tasks. Raises ValueError naming the setting and the fix."""
        if self.selection not in SELECTIONS:
            raise ValueError(f"evaluation.selection must be one of {list(SELECTIONS)}, got {self.selection!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"evaluation.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.selection == "best_val" and self.val_fraction <= 0:
            raise ValueError(
                "evaluation.selection: best_val chooses on validation data, but evaluation.val_fraction is 0; "
                "set val_fraction (e.g. 0.1) or use selection: last"
            )
        if self.unseen_clients < 0:
            raise ValueError(f"evaluation.unseen_clients must be >= 0, got {self.unseen_clients}")
        for t in tasks:
            if self.unseen_clients >= t.clients:
                raise ValueError(
                    f"evaluation.unseen_clients={self.unseen_clients} leaves task {t.name!r} ({t.clients} clients) "
                    "no client to train; raise the task's clients or lower unseen_clients"
                )
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"evaluation.baselines {bad} are unknown; choose from {list(BASELINES)}")
        if "{}" not in self.template:
            raise ValueError(f"evaluation.template needs a '{{}}' for the class name, got {self.template!r}")
        if self.ece_bins < 1:
            raise ValueError(f"evaluation.ece_bins must be >= 1, got {self.ece_bins}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"evaluation.seeds must be a non-empty list of distinct seeds, got {self.seeds}")
        names = {t.name for t in tasks}
        for tr in self.transfer:
            if tr.source not in names:
                raise ValueError(
                    f"evaluation.transfer: source {tr.source!r} is not a task of the recipe ({sorted(names)})"
                )
            if tr.task.name in names:
                raise ValueError(
                    f"evaluation.transfer: target {tr.task.name!r} is also trained on; a transfer target must be "
                    "a task never seen in training (give it another name)"
                )

    def split_args(self) -> dict:
        """The keyword arguments of :func:`mmfl.data.prepare_task` this protocol sets."""
        return {
            "base_to_novel": self.base_to_novel,
            "val_fraction": self.val_fraction,
            "unseen_clients": self.unseen_clients,
        }
