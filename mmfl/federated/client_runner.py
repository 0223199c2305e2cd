"""What training one client takes, apart from the federation around it: the frozen backbone, the part factories,
the local training settings, Lightning Trainers and loaders, and the global tensors last received.

:class:`~mmfl.federated.simulation.Simulation` is a :class:`ClientRunner` that also holds every client and the
server's side; a lean Flower node (:class:`~mmfl.federated.node.Node`) is one that holds a single client.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch import Tensor

from mmfl.backbone import Backbone
from mmfl.data.feature_cache import encoded_loader, make_feature_cache
from mmfl.data.loader import make_loader
from mmfl.data.splits import LABEL
from mmfl.data.task import PreparedTask
from mmfl.federated.aggregate import Update
from mmfl.federated.faults import Deadline
from mmfl.federated.pool import Client, initial_local
from mmfl.federated.pseudo_labels import NoPseudoLabels, PseudoLabeling
from mmfl.federated.settings import Federation, LocalTraining, derived_seed, seed_all
from mmfl.module import ClientModule, make_trainer
from mmfl.prompts.base import TrainablePart

if TYPE_CHECKING:
    import datasets

PartFactory = Callable[[Backbone, list[str]], TrainablePart]
"""Builds one client's part from the backbone and the task's class names (a ``class_path`` in recipes)."""


class ClientRunner(PseudoLabeling):
    """Builds client modules and trains or evaluates one client at a time.

    Args:
        backbone: the frozen backbone every client shares.
        parts: factories of the trainable parts each client owns.
        training: local training settings.
        federation: round settings (a client reads ``client_timeout``).
        seed: with the round and the client id, seeds each client's data order and training.
    """

    def __init__(
        self,
        backbone: Backbone,
        parts: Sequence[PartFactory],
        training: LocalTraining | None = None,
        federation: Federation | None = None,
        seed: int = 0,
    ) -> None:
        self.backbone = backbone
        self.training = training or LocalTraining()
        t = self.training
        self.features = make_feature_cache(backbone, t.feature_cache, t.accelerator, t.eval_batch_size)
        self.part_factories = list(parts)
        self.federation = federation or Federation()
        self.seed = seed
        self.global_state: dict[str, Tensor] = {}
        """The global tensors: the server's merged state, or what a node last received."""

    # ---------------------------------------------------------------- building
    def _all_parts(self, task: PreparedTask) -> list[TrainablePart]:
        return [f(self.backbone, task.class_names) for f in self.part_factories]

    def build_module(
        self,
        task: PreparedTask,
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        trained_classes: bool = True,
    ) -> ClientModule:
        """A fresh ClientModule for a client of ``task``, sharing this simulation's backbone.

        It gets the parts that work with the task's modality (``TrainablePart.supports``), so one recipe
        can list image, text and audio parts for a multi-modal federation.

        Args:
            task: the task (its name is the scope key of ``task`` tensors).
            class_names: other class names than the task's (novel classes).
            templates: other hand-written templates than the task's.
            trained_classes: whether the module classifies the classes the parts were trained on; when not (or when
                ``class_names`` differ from the task's), parts that serve only those (``trained_classes_only``: a
                classifier head) are left out, and ``training.knowledge.unseen_blend`` mixes the class features with
                the hand-written ones.
        """
        names = list(class_names or task.class_names)
        other = not trained_classes or names != list(task.class_names)
        parts = [
            p
            for p in (f(self.backbone, names) for f in self.part_factories)
            if p.supports(task.modality) and not (other and p.trained_classes_only)
        ]
        module = ClientModule(
            self.backbone,
            task.task.build_modality(),
            task.name,
            names,
            parts,
            optimizer=self.training.optimizer,
            templates=templates or task.task.prompt_templates(),
            knowledge=self.training.knowledge,
            unseen_blend=self.training.knowledge.unseen_blend if other else 0.0,
        )
        module.log_train_metrics = False  # fit_client reads module.epoch_metrics
        return module

    def initial_local(self, task: PreparedTask) -> dict[str, Tensor]:
        """The initial ``local`` tensors of a new client of ``task`` (:func:`~mmfl.federated.pool.initial_local`)."""
        return initial_local(self.part_factories, self.backbone, task)

    def _trainer(self, max_epochs: int = 1, max_steps: int = -1) -> L.Trainer:
        return make_trainer(max_epochs, max_steps, self.training.accelerator, self.training.precision)

    def _loader(self, module: ClientModule, ds, train: bool, seed: int = 0):
        """A loader of ``ds`` through the transform of the module's own modality, or of the inputs' cached
        frozen encodings when the module's parts leave its encoder untouched (same batches, same order)."""
        bs = self.training.batch_size if train else self.training.eval_batch_size
        if self.features is not None and module.frozen_encoding():
            encoded = self.features.encodings(module.modality, ds, train)  # [N, D] or None
            if encoded is not None:
                labels = self.features.labels(ds) if LABEL in ds.column_names else None
                return encoded_loader(encoded, labels, bs, shuffle=train, seed=seed)
        return make_loader(
            ds,
            module.modality.input_key,
            module.modality.transform(self.backbone, train),
            bs,
            shuffle=train,
            seed=seed,
            num_workers=self.training.num_workers,
        )

    def fit_client(self, client: Client, rnd: int) -> tuple[Update, dict[str, float]]:
        """Load the global tensors, train locally, and return the reply and training metrics."""
        module = client.module
        module.load_trainable_state_dict(self.global_state)
        s = derived_seed(self.seed, rnd, client.data.cid)
        seed_all(s)
        data, pseudo = client.data.train, None
        if not client.data.labeled:  # this round's training data: its own examples, labelled by the merged model
            if rnd < self.training.pseudo_labels.start_round:  # a Flower node asked before the server knew its client
                raise NoPseudoLabels(f"unlabeled clients join at round {self.training.pseudo_labels.start_round}")
            data, pseudo = self.pseudo_labeled(module, data)
        module.mixup = self.training.pseudo_labels.mixup if pseudo is not None else 0.0
        loader = self._loader(module, data, train=True, seed=s)
        trainer = self._trainer(self.training.epochs, self.training.max_steps)
        if self.federation.client_timeout is not None:
            trainer.callbacks.append(Deadline(self.federation.client_timeout))
        module.epoch_metrics = {}
        try:
            trainer.fit(module, train_dataloaders=loader)
        finally:
            module.trainer = None  # else each client keeps its last Trainer, and with it its optimizer's state
        client.keep_trained()
        m = {k: float(v) for k, v in module.epoch_metrics.items()}
        update = Update(client.data.cid, module.trainable_state_dict(include_local=False), len(data))
        metrics = {"loss": m.get("train_loss", math.nan), "accuracy": m.get("train_acc", math.nan)}
        if pseudo is not None:  # train_acc is agreement with its own pseudo-labels: reported, not as accuracy
            metrics.update({"pseudo_" + k: v for k, v in pseudo.items()})
        return update, metrics

    def evaluate(self, module: ClientModule, task: PreparedTask, ds: datasets.Dataset) -> dict[str, float]:
        """Test loss and accuracy of ``module`` on ``ds``."""
        trainer = self._trainer()
        try:
            out = trainer.test(module, dataloaders=self._loader(module, ds, train=False), verbose=False)[0]
        finally:
            module.trainer = None
        return {"loss": float(out["test_loss"]), "accuracy": float(out["test_acc"])}

    def predict(self, module: ClientModule, ds: datasets.Dataset) -> list[tuple[Tensor, Tensor | None]]:
        """``module``'s logits [B, C] and the labels [B] (None for unlabeled data) of each batch of ``ds``, in order."""
        trainer = self._trainer()
        try:
            return trainer.predict(module, dataloaders=self._loader(module, ds, train=False))
        finally:
            module.trainer = None

    def correct(self, module: ClientModule, ds: datasets.Dataset) -> Tensor:
        """Whether ``module`` classifies each example of ``ds`` (labelled) correctly: [N] bool, in ``ds``'s order."""
        return torch.cat([logits.argmax(dim=-1) == labels for logits, labels in self.predict(module, ds)])  # [N]
