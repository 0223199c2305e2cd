"""``mmfl evaluate``: train (or load) each seed's federation and baselines, and score every axis of the protocol."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from mmfl.backbone import Backbone
from mmfl.data.loader import make_loader
from mmfl.data.splits import DOMAIN
from mmfl.data.task import ClientData, PreparedTask, Task, load_split, prepare_task
from mmfl.evaluation.metrics import accuracy, harmonic_mean, mean_std, scores
from mmfl.evaluation.protocol import Protocol, Variant
from mmfl.federated.averaging import AVERAGE
from mmfl.federated.checkpoint import load_state
from mmfl.federated.scopes import is_local
from mmfl.federated.simulation import Federation, LocalTraining, PartFactory, Simulation
from mmfl.modalities import get_modality_class
from mmfl.module import ClientModule, make_trainer, quiet_lightning
from mmfl.progress import progress_for

log = logging.getLogger(__name__)

ModuleFor = Callable[[PreparedTask, list[str]], ClientModule]
"""Builds the module a method classifies with: (task, class names) → module holding the method's tensors."""


def predict(module: ClientModule, ds: datasets.Dataset, batch_size: int = 32, accelerator: str = "auto"):
    """Logits [N, C] and labels [N] of ``module`` on ``ds`` (one Lightning predict pass), on the CPU."""
    loader = make_loader(
        ds, module.modality.input_key, module.modality.transform(module.backbone, False), batch_size, shuffle=False
    )
    with quiet_lightning():
        out = make_trainer(accelerator=accelerator).predict(module, dataloaders=loader)
    return torch.cat([o[0].cpu() for o in out]), torch.cat([o[1].cpu() for o in out])


def pooled(task: PreparedTask) -> PreparedTask:
    """The centralised reference of a prepared task: one client holding all its (seen) clients' training data."""
    train = datasets.concatenate_datasets([c.train for c in task.clients])
    tests = [c.test for c in task.clients if c.test is not None]
    test = datasets.concatenate_datasets(tests) if tests else None
    one = ClientData(f"{task.name}/{task.modality}/central", task.name, task.modality, train, test)
    return dataclasses.replace(task, clients=[one], unseen=[])


def transfer_target(task: Task, source: str, limit: int | None) -> PreparedTask:
    """A transfer target's test split, as a prepared task named after ``source`` (whose tensors it uses)."""
    test, names = load_split(task, "test", limit)
    input_key = get_modality_class(task.modality).input_key
    return PreparedTask(dataclasses.replace(task, name=source), names, input_key, test, [])


class Scorer:
    """Scores one method on every axis of the protocol for one seed.

    Args:
        tasks: the prepared tasks of the seed.
        targets: ``(label, target)`` pairs of cross-dataset transfer targets.
        protocol: the protocol (ECE bins, held-out domains come from the tasks).
        batch_size: evaluation batch size.
        accelerator: Lightning accelerator.
    """

    def __init__(
        self,
        tasks: Sequence[PreparedTask],
        targets: Sequence[tuple[str, PreparedTask]],
        protocol: Protocol,
        batch_size: int,
        accelerator: str,
    ) -> None:
        self.tasks, self.targets, self.protocol = list(tasks), list(targets), protocol
        self.batch_size, self.accelerator = batch_size, accelerator

    def _predict(self, module: ClientModule, ds: datasets.Dataset) -> tuple[Tensor, Tensor]:
        return predict(module, ds, self.batch_size, self.accelerator)

    def _scores(self, logits: Tensor, labels: Tensor) -> dict[str, float]:
        return scores(logits, labels, self.protocol.ece_bins)

    def score(
        self,
        module_for: ModuleFor,
        client_module: Callable[[PreparedTask, ClientData], ClientModule] | None = None,
        clients_of: Callable[[PreparedTask], list[ClientData]] | None = None,
    ) -> dict:
        """All metrics of one method.

        Args:
            module_for: the method's classifier for a task and class names (global tensors).
            client_module: a client's own classifier (global + its local tensors), for personalised methods;
                when None every client classifies with ``module_for``'s.
            clients_of: the clients whose local/global accuracy is reported (default: the task's clients).

        Returns:
            ``{"tasks": {task/modality: {"base"|"novel"|"domains"...}}, "clients": ..., "unseen": ...,
            "transfer": ...}``; accuracies and ECE in [0, 1].
        """
        out: dict[str, dict] = {"tasks": {}, "clients": {}, "unseen": {}, "transfer": {}}
        for task in self.tasks:
            key = f"{task.name}/{task.modality}"
            module = module_for(task, task.class_names)
            logits, labels = self._predict(module, task.test)  # [N, C], [N]
            entry: dict = {"base": self._scores(logits, labels)}
            if task.test_novel is not None and len(task.test_novel):
                entry["novel"] = self._scores(*self._predict(module_for(task, task.novel_class_names), task.test_novel))
                entry["hm"] = harmonic_mean(entry["base"]["top1"], entry["novel"]["top1"])
            if task.task.domain_column:
                entry["domains"] = self._domains(task, logits, labels)
            out["tasks"][key] = entry
            for c in (clients_of or (lambda t: t.clients))(task):
                own = logits, labels
                if client_module is not None:
                    own = self._predict(client_module(task, c), task.test)
                out["clients"][c.cid] = {"local": accuracy(*own, c.classes()), "global": accuracy(*own)}
            for c in task.unseen:
                lu, yu = self._predict(module, c.train)
                out["unseen"][c.cid] = {"local": accuracy(lu, yu, c.classes()), "global": accuracy(lu, yu)}
        for label, target in self.targets:
            out["transfer"][label] = self._scores(*self._predict(module_for(target, target.class_names), target.test))
        return out

    def _domains(self, task: PreparedTask, logits: Tensor, labels: Tensor) -> dict[str, dict[str, float]]:
        held = set(map(str, task.task.holdout_domains or []))
        dom = np.asarray([str(d) for d in task.test[DOMAIN]])
        out = {}
        for d in sorted(set(dom.tolist())):
            idx = torch.as_tensor(np.flatnonzero(dom == d))
            out[d] = {"top1": accuracy(logits[idx], labels[idx]), "n": len(idx), "unseen": float(d in held)}
        return out


def zero_shot_method(backbone: Backbone, template: str | None) -> ModuleFor:
    """The hand-written-prompt baseline: one ``template``, or the task's own ensemble when None."""

    def module_for(task: PreparedTask, names: list[str]) -> ClientModule:
        templates = [template] if template else task.task.prompt_templates()
        return ClientModule(backbone, task.task.build_modality(), task.name, names, [], templates=templates)

    return module_for


def learned_method(sim: Simulation, state: dict[str, Tensor]) -> ModuleFor:
    """A trained method's classifier: the simulation's parts holding ``state`` (local tensors at init).

    For other class names than a task's own (novel classes, transfer targets) its parts must be class-agnostic;
    :meth:`Simulation.check_new_classes` says so clearly otherwise.
    """
    trained = {t.name: t.class_names for t in sim.tasks}

    def module_for(task: PreparedTask, names: list[str]) -> ClientModule:
        same = names == trained.get(task.name)
        if not same:
            sim.check_new_classes(dataclasses.replace(task, class_names=names))
        module = sim.build_module(task, names, trained_classes=same)
        loaded = module.load_trainable_state_dict(state)
        if module.trainable_keys(include_local=False) and not loaded:
            raise ValueError(f"no trained tensor fits task {task.name!r} on {task.modality!r}: nothing to evaluate")
        return module

    return module_for


def personal_method(
    sim: Simulation, state: dict[str, Tensor], local: dict[str, dict[str, Tensor]]
) -> Callable[[PreparedTask, ClientData], ClientModule] | None:
    """A client's own classifier (global + its local tensors); None when the method has no local tensors."""
    if not any(local.values()):
        return None
    base = learned_method(sim, state)

    def client_module(task: PreparedTask, client: ClientData) -> ClientModule:
        module = base(task, task.class_names)
        module.load_trainable_state_dict(local.get(client.cid, {}))
        return module

    return client_module


def load_checkpoint(sim: Simulation, path: Path) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """A run's saved state for ``sim``'s clients: global tensors from ``path``, local ones from ``local/`` beside it
    (``local_average/`` for a run's ``average.safetensors``, and for a ``best.safetensors`` that holds the average).

    Raises:
        ValueError: the checkpoint's keys or shapes do not match the recipe's parts.
    """
    state = load_state(path)
    want = {k: v.shape for k, v in sim.global_state.items()}
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    bad = [k for k in want if k in state and state[k].shape != want[k]]
    if missing or extra or bad:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit the recipe's tasks and parts: missing {missing[:5]}, unexpected "
            f"{extra[:5]}, wrong shape {bad[:5]}. Evaluate with the recipe the run was trained with (its config.yaml)"
        )
    with safe_open(path, "pt") as fh:
        averaged = path.name == AVERAGE or "average_of_rounds" in (fh.metadata() or {})
    local = {}
    for c in sim.clients:
        f = path.parent / ("local_average" if averaged else "local") / f"{c.data.cid}.safetensors"
        local[c.data.cid] = load_state(f) if f.is_file() else {}
        if any(not is_local(k) for k in local[c.data.cid]):
            raise ValueError(f"{str(f)!r} holds tensors that are not local; it is not a client's local state")
    return state, local


def summarize(per_seed: list[dict]) -> dict:
    """Mean ± std over seeds of every number in the per-seed results (same nesting, leaves ``{mean, std, n}``)."""

    def walk(trees: list) -> dict | None:
        first = trees[0]
        if isinstance(first, dict):
            return {k: walk([t[k] for t in trees if isinstance(t, dict) and k in t]) for k in first}
        if isinstance(first, int | float) and not isinstance(first, bool):
            return mean_std(trees)
        return None

    return walk(per_seed) or {}


def mean_over(entries: list[float]) -> float:
    """Mean of the finite values (NaN when none)."""
    v = [x for x in entries if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def task_facts(task: PreparedTask) -> dict:
    """What the report states about a prepared task."""
    part = task.task.partitioner
    try:
        part_name = type(part(2)).__name__ if part is not None else "IidPartitioner"
    except Exception:  # a partitioner that cannot be built for 2 partitions: name what was given
        part_name = str(part)
    return {
        "name": task.name,
        "modality": task.modality,
        "base": len(task.class_names),
        "novel": len(task.novel_class_names),
        "clients": len(task.clients),
        "unseen": len(task.unseen),
        "shots": task.task.shots,
        "partitioner": part_name,
        "train": sum(len(c.train) for c in task.clients),
        "val": len(task.val) if task.val is not None else 0,
        "test": len(task.test),
        "test_novel": len(task.test_novel) if task.test_novel is not None else 0,
    }


def run_seed(
    backbone: Backbone,
    tasks: list[Task],
    parts: list[PartFactory],
    training: LocalTraining,
    federation: Federation,
    protocol: Protocol,
    seed: int,
    out: Path,
    checkpoint: Path | None = None,
    twins: Mapping[str, str] | None = None,
) -> tuple[dict, dict]:
    """Train (or load) and score every method for one seed.

    Args:
        twins: variants that train exactly as an earlier method (``federated`` or a variant before them) and differ
            only in how they score, by name → that method's name (:func:`mmfl.evaluation.command.training_twins`):
            scored with its trained state, not trained again.

    Returns:
        ``(results by method, facts)`` where facts records what was trained and selected.
    """
    prepared = [prepare_task(t, seed=seed, **protocol.split_args()) for t in tasks]
    facts: dict[str, object] = {"seed": seed, "tasks": [task_facts(t) for t in prepared]}
    targets = [
        (f"{tr.source}→{tr.task.name}", transfer_target(tr.task, tr.source, tr.task.max_test_examples))
        for tr in protocol.transfer
    ]
    scorer = Scorer(prepared, targets, protocol, training.eval_batch_size, training.accelerator)

    def simulation(
        ptasks: list[PreparedTask],
        parts: list[PartFactory] = parts,
        training: LocalTraining = training,
        federation: Federation = federation,
    ) -> Simulation:
        return Simulation(
            backbone, ptasks, parts, training, federation, seed=seed, output_dir=None, **protocol.selection_args()
        )

    def train(label: str, sim: Simulation) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        sim.attach_output(out / f"seed_{seed}" / label)
        log.info("seed %d: training %s (%d clients, %d rounds)", seed, label, len(sim.clients), federation.rounds)
        sim.progress = progress_for(quiet=not log.isEnabledFor(logging.INFO), label=f"seed {seed}, {label}:")
        sim.run()
        best = f"average of rounds {sim.best_average}" if sim.best_average else sim.best_round
        selected = {"best_val": best, "average": sim.window()}
        facts[f"{label}_selected_round"] = selected.get(protocol.selection, federation.rounds)
        return sim.selected()

    sim = simulation(prepared)
    if checkpoint is not None:  # read and checked before any scoring or training
        state, local = load_checkpoint(sim, checkpoint)
        facts["federated_checkpoint"] = str(checkpoint)
    results: dict[str, dict] = {}
    for name, template in (("zeroshot", protocol.template), ("ensemble", None)):
        if name in protocol.baselines:
            log.info("seed %d: scoring the %s baseline", seed, name)
            results[name] = scorer.score(zero_shot_method(backbone, template))
    if checkpoint is None:
        state, local = train("federated", sim)
    results["federated"] = scorer.score(learned_method(sim, state), personal_method(sim, state, local))
    trained = {"federated": (state, local)}
    for v in protocol.variants:
        v_sim = simulation(prepared, *variant_settings(v, parts, training, federation))
        twin = (twins or {}).get(v.name)
        if twin in trained:  # the same training: only its scoring differs
            log.info("seed %d: %s trains exactly as %s; scoring %s's state", seed, v.name, twin, twin)
            v_state, v_local = trained[twin]
            facts[f"{v.name}_selected_round"] = facts.get(f"{twin}_selected_round", "as the checkpoint")
        else:
            v_state, v_local = train(v.name, v_sim)
        trained[v.name] = (v_state, v_local)
        results[v.name] = scorer.score(learned_method(v_sim, v_state), personal_method(v_sim, v_state, v_local))
    if "centralised" in protocol.baselines:
        central = simulation([pooled(t) for t in prepared])
        c_state, _ = train("centralised", central)
        # one client per task: local vs global is the federation's question, not the reference's
        results["centralised"] = scorer.score(learned_method(central, c_state), clients_of=lambda t: [])
    return results, facts


def variant_settings(
    v: Variant, parts: list[PartFactory], training: LocalTraining, federation: Federation
) -> tuple[list, LocalTraining, Federation]:
    """A variant's parts, local training and federation settings: the recipe's, with what the variant changes."""
    changes = {k: getattr(v, k) for k in ("knowledge", "optimizer") if getattr(v, k) is not None}
    if v.virtual_features is not None:
        federation = dataclasses.replace(federation, virtual_features=v.virtual_features)
    return (parts if v.parts is None else v.parts), dataclasses.replace(training, **changes), federation
