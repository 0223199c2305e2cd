"""The evaluation protocol a recipe fixes: splits, checkpoint selection, seeds, baselines, transfer targets."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mmfl.data.task import Task
from mmfl.federated.settings import OptimizerFactory
from mmfl.federated.simulation import PartFactory
from mmfl.federated.virtual_features import VirtualFeatures
from mmfl.knowledge import KnowledgeGuidance

SELECTIONS = ("last", "best_val", "average")
BASELINES = ("zeroshot", "ensemble", "centralised")
METHODS = ("zeroshot", "ensemble", "federated", "centralised")
"""The methods every evaluation may score; a variant may not take one of these names."""


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
class Variant:
    """Another method trained and scored beside the recipe's own, with the same tasks, splits, seeds, rounds and
    selection: what it changes, and nothing else (a field left None keeps the recipe's value).

    Args:
        name: the method's name in the report, ``metrics.json`` and its run folder (letters, digits, ``_``, ``-``).
        parts: the trainable parts instead of the recipe's (class_path + init_args, as ``parts:``).
        knowledge: ``training.knowledge`` instead of the recipe's.
        optimizer: ``training.optimizer`` instead of the recipe's.
        virtual_features: ``federation.virtual_features`` instead of the recipe's (the server's training on virtual
            features).
    """

    name: str
    parts: list[PartFactory] | None = None
    knowledge: KnowledgeGuidance | None = None
    optimizer: OptimizerFactory | None = None
    virtual_features: VirtualFeatures | None = None


@dataclass
class Protocol:
    """How a recipe's run is evaluated (the ``evaluation:`` section of a recipe).

    ``mmfl fit`` uses the split and selection settings; ``mmfl evaluate`` uses all of them.

    Args:
        base_to_novel: split each task's classes in half (first ``ceil(C/2)`` labels base, the rest novel);
            training and validation see the base classes only.
        val_fraction: share of each task's training split held out, before partitioning, as validation data.
        selection: which global state is evaluated: ``last`` (the final round's) or ``best_val`` (the round
            with the best mean validation accuracy over tasks; needs ``val_fraction > 0``) or ``average`` (the
            mean of the states the last ``average_rounds`` rounds ended with: the merged tensors and each client's
            local ones, as PromptSRC averages prompts over training; :mod:`mmfl.federated.averaging`). Test data
            never take part in the choice.
        average_rounds: with ``selection: average``, how many of the last rounds are averaged (None: the last
            half of ``federation.rounds``, rounded up); with ``best_val``, the average of that many last rounds is one
            more candidate, kept when its mean validation accuracy beats every evaluated round's.
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
    average_rounds: int | None = None
    unseen_clients: int = 0
    transfer: list[Transfer] = field(default_factory=list)
    seeds: list[int] | None = None
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    template: str = "a photo of a {}."
    variants: list[Variant] = field(default_factory=list)
    ece_bins: int = 15

    def check(self, tasks: list[Task]) -> None:
        """Cheap checks against the recipe's tasks. Raises ValueError naming the setting and the fix."""
        if self.selection not in SELECTIONS:
            raise ValueError(f"evaluation.selection must be one of {list(SELECTIONS)}, got {self.selection!r}")
        if self.average_rounds is not None and self.selection == "last":
            raise ValueError(
                f"evaluation.average_rounds is {self.average_rounds} but evaluation.selection is 'last': set "
                "selection: average (score the average) or best_val (let validation choose it), or remove "
                "average_rounds"
            )
        if self.average_rounds is not None and self.average_rounds < 1:
            raise ValueError(f"evaluation.average_rounds must be >= 1 (rounds averaged), got {self.average_rounds}")
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
        self.check_variants()
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

    def selection_args(self) -> dict:
        """The keyword arguments of :class:`~mmfl.federated.simulation.Simulation` this protocol sets."""
        return {"selection": self.selection, "average_rounds": self.average_rounds}

    def check_variants(self) -> None:
        """Each variant's name is a distinct folder-safe name that no built-in method uses; its settings are valid."""
        seen: set[str] = set()
        for i, v in enumerate(self.variants):
            if not isinstance(v.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", v.name):
                raise ValueError(
                    f"evaluation.variants.{i}.name={v.name!r}: use letters, digits, '_' and '-' (it names a folder)"
                )
            if v.name in METHODS or v.name in seen:
                taken = "a built-in method's" if v.name in METHODS else "another variant's"
                raise ValueError(f"evaluation.variants.{i}.name={v.name!r} is {taken} name; give it its own")
            seen.add(v.name)
            if v.parts is not None and not isinstance(v.parts, list):
                raise ValueError(f"evaluation.variants.{i}.parts must be a list of class_path entries")
            if v.knowledge is not None:
                try:
                    v.knowledge.check()
                except ValueError as e:
                    raise ValueError(f"evaluation.variants.{i} ({v.name}): {e}") from None
            if v.virtual_features is not None:
                try:
                    v.virtual_features.check()
                except ValueError as e:
                    raise ValueError(f"evaluation.variants.{i} ({v.name}): {e}") from None
            if v.parts is None and v.knowledge is None and v.optimizer is None and v.virtual_features is None:
                raise ValueError(
                    f"evaluation.variants.{i} ({v.name}) changes nothing; give parts, knowledge, optimizer or "
                    "virtual_features"
                )
