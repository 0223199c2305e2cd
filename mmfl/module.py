"""ClientModule: one client's training and evaluation as a LightningModule."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from mmfl.backbone import Backbone
from mmfl.data.splits import ENCODED, LABEL
from mmfl.federated.mixing import MixRule, rules_for
from mmfl.federated.scopes import is_local
from mmfl.guidance import KnowledgeHooks
from mmfl.knowledge import KnowledgeGuidance, unseen_mix
from mmfl.mixup import mix_features, mixed_cross_entropy
from mmfl.modalities.base import Modality
from mmfl.prompts.base import TrainablePart, optimizer_for
from mmfl.text_features import AdaptedTemplates, zero_shot_text_features
from mmfl.trainer import _placement, make_trainer, quiet_lightning  # noqa: F401  (their home was this module)

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum, lr 0.002 — CoOp's setting."""
    return torch.optim.SGD(params, lr=0.002, momentum=0.9)


class ClientModule(KnowledgeHooks, L.LightningModule):
    """One client: frozen backbone + its trainable parts, for one task on one modality.

    ``logits = exp(logit_scale) · norm(f_x) · norm(f_t)ᵀ``, where ``f_x`` comes from the modality's
    encoder and ``f_t`` from the text part (or from hand-written templates when no part provides
    class text features); a part with a classifier of its own (DePT's head) adds its logits when scoring
    (``fuse_logits``) and its loss when training (``training_loss``). Only the parts' parameters are optimised; the
    backbone is held by reference and never appears in this module's state dict or checkpoints.

    Args:
        backbone: the shared frozen backbone.
        modality: the input modality.
        task: task name (scope key of ``task`` tensors).
        class_names: label names of the task, in label order.
        parts: the client's trainable parts (distinct ``part_name``\\ s).
        optimizer: builds the optimizer from the trainable parameters.
        templates: hand-written prompt templates for the zero-shot class features.
        knowledge: terms that keep the learned features near the frozen model's, added to the training loss
            (:mod:`mmfl.knowledge`); None or all weights 0: plain cross-entropy.
        unseen_blend: for a module built for class names its parts were not trained on (novel classes, another data
            set's): the hand-written features' share of the class features (``knowledge.unseen_blend``); 0: none.
    """

    def __init__(
        self,
        backbone: Backbone,
        modality: Modality,
        task: str,
        class_names: Sequence[str],
        parts: Sequence[TrainablePart] = (),
        optimizer: OptimizerFactory = default_optimizer,
        templates: Sequence[str] = ("a photo of a {}.",),
        knowledge: KnowledgeGuidance | None = None,
        unseen_blend: float = 0.0,
    ) -> None:
        super().__init__()
        names = [p.part_name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"parts must have distinct names, got {names}; set `name:` on one of them")
        text_parts = [p for p in parts if type(p).class_text_features is not TrainablePart.class_text_features]
        if len(text_parts) > 1:
            raise ValueError(f"at most one part may provide class text features, got {names}")
        unsupported = [p.part_name for p in parts if not p.supports(modality.name)]
        if unsupported:
            raise ValueError(f"part(s) {unsupported} do not work with the {modality.name!r} modality")
        self.backbone = backbone  # plain attribute: Backbone is not an nn.Module
        self.modality = modality
        self.task = task
        self.class_names = list(class_names)
        for p in parts:
            p.split_components()  # a parameter of several scopes becomes one tensor per scope (idempotent)
        self.parts = nn.ModuleDict({p.part_name: p for p in parts})
        self._text_part_name = text_parts[0].part_name if text_parts else None  # a name: no second registration
        hooks = (TrainablePart.fuse_logits, TrainablePart.training_loss)
        self._head_names = [p.part_name for p in parts if (type(p).fuse_logits, type(p).training_loss) != hooks]
        self.optimizer_factory = optimizer
        self.templates = list(templates)
        self._zs_text: Tensor | None = None
        self._eval_text: Tensor | None = None  # [C, D]: class features fixed for one evaluation pass
        self._adapted_templates = AdaptedTemplates(self.class_names, self.templates)
        self._replaced: frozenset[str] | None = None  # the names of backbone_parameters() (fixed per module)
        self.knowledge = knowledge if knowledge is not None and knowledge.active else None
        if not 0.0 <= unseen_blend <= 1.0:
            raise ValueError(f"unseen_blend must be in [0, 1], got {unseen_blend}")
        self.unseen_blend = unseen_blend
        # (parameter, the zero-shot KL's gradient) of this step, for ProGrad's projection after the backward pass
        self._prograd_ref: list[tuple[nn.Parameter, Tensor]] | None = None
        self._anchor_source: Tensor | None = None  # [C, D], set at each fit's start (anchor_source: merged)
        self.held_classes: list[int] | None = None
        """The labels of this client's training data (set by a simulation); the others get synthetic anchors when
        ``knowledge.anchors`` > 0 (None: no anchors)."""
        self.mixup = 0.0
        """Mix the joint-space input features within each training batch, with weights from Beta(α, α) (manifold
        mixup; an unlabeled client's ``training.pseudo_labels.mixup``); 0: off."""
        self._mix: tuple[Tensor, Tensor] | None = None  # this batch's mixing weights [B] and partners [B]
        self.log_train_metrics = True
        """Log ``train_loss``/``train_acc`` through ``self.log`` at each epoch's end (for loggers and callbacks);
        a simulation, which reads :attr:`epoch_metrics` instead, turns it off."""
        self.epoch_metrics: dict[str, Tensor] = {}
        """The last training epoch's mean ``train_loss`` and ``train_acc`` (0-d tensors on the module's device)."""
        n = len(self.class_names)
        # validate_args=False: the check counts the unique labels of every batch (a device sync per step); labels
        # outside [0, C) already fail in the cross-entropy
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes=n, average="micro", validate_args=False) for _ in range(3)
        )

    # ---------------------------------------------------------------- trainable state
    def _qualified(self) -> Iterable[tuple[str, nn.Parameter]]:
        for part in self.parts.values():
            yield from part.qualified_parameters(self.task, self.modality.name)

    def mix_rules(self) -> dict[str, MixRule]:
        """How the server mixes this client's keys of mixed scopes (``mix(FINE, WIDE, ...)``), by key."""
        return rules_for(self.parts, self.task, self.modality.name)

    def trainable_keys(self, include_local: bool = True) -> list[str]:
        """Scope-qualified keys of this client's trainable tensors."""
        return [k for k, _ in self._qualified() if include_local or not is_local(k)]

    def trainable_state_dict(self, include_local: bool = True, local_only: bool = False) -> dict[str, Tensor]:
        """Trainable tensors by scope-qualified key (``task/digits/coop.ctx``), detached copies on CPU.

        Args:
            include_local: also return ``local/...`` tensors (never sent to a server).
            local_only: return only the ``local/...`` tensors (the others are not copied).
        """
        return {
            k: p.detach().to("cpu", copy=True)
            for k, p in self._qualified()
            if (is_local(k) if local_only else include_local or not is_local(k))
        }

    def load_trainable_state_dict(self, state: dict[str, Tensor], strict: bool = False) -> list[str]:
        """Copy the tensors of this client's keys from ``state`` (other keys are ignored).

        Args:
            state: tensors by qualified key, e.g. the server's global state.
            strict: require every non-local key of this client to be present.

        Returns:
            The keys that were loaded.

        Raises:
            KeyError: ``strict`` and a key is missing. ValueError: a shape does not match.
        """
        loaded = []
        for key, param in self._qualified():
            if key not in state:
                if strict and not is_local(key):
                    raise KeyError(f"client of task {self.task!r}: state has no tensor {key!r}")
                continue
            value = state[key]
            if value.shape != param.shape:
                raise ValueError(f"{key}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}")
            with torch.no_grad():
                param.copy_(value.to(device=param.device, dtype=param.dtype))
            loaded.append(key)
        return loaded

    @property
    def text_part(self) -> TrainablePart | None:
        """The part that provides class text features, if any."""
        return self.parts[self._text_part_name] if self._text_part_name is not None else None

    # ---------------------------------------------------------------- forward
    def class_text_features(self, input_features: Tensor | None = None) -> Tensor:
        """Normalised class features: from the text part, else the zero-shot templates (cached), then
        through the parts' text adapters, then mixed with the hand-written ones when ``unseen_blend`` > 0. [C, D],
        or [B, C, D] from an input-conditioned text part.

        Args:
            input_features: the batch's normalised encoded inputs [B, D], for conditioned prompts.
        """
        text_part = self.text_part
        if text_part is not None:
            f_t = text_part.class_text_features(input_features)
        elif self.adapts_backbone():  # the templates through this client's own weights (in place while encoding)
            if self._replaced is None:
                self._replaced = frozenset(self.backbone_parameters())
            f_t = self._adapted_templates(self.backbone, self._replaced).to(self.device)
        else:
            f_t = self.hand_written_features()
        for part in self.parts.values():
            f_t = part.adapt_text_features(f_t)
        f_t = F.normalize(f_t, dim=-1)
        if self.unseen_blend > 0:  # class names the parts never trained on: mixed with the zero-shot classifier
            f_t = unseen_mix(f_t, self.hand_written_features(), self.unseen_blend)  # [C, D] or [B, C, D]
        return f_t

    def adapts_backbone(self) -> bool:
        """Whether a part replaces backbone weights while this client encodes (``backbone_parameters``)."""
        return any(type(p).backbone_parameters is not TrainablePart.backbone_parameters for p in self.parts.values())

    def backbone_parameters(self) -> dict[str, Tensor]:
        """The parts' replacements of frozen backbone weights, by open_clip state-dict name."""
        out: dict[str, Tensor] = {}
        for p in self.parts.values():
            out.update(p.backbone_parameters())
        return out

    def hand_written_features(self) -> Tensor:
        """The frozen model's class features from the hand-written templates (cached on the module's device). [C, D]"""
        if self._zs_text is None or self._zs_text.device != self.device:
            self._zs_text = zero_shot_text_features(self.backbone, self.class_names, self.templates).to(self.device)
        return self._zs_text

    @torch.no_grad()
    def frozen_input_features(self, x: Tensor | None, encoded: Tensor | None = None) -> Tensor:
        """Normalised input features of the frozen model, without any part. [B, D]"""
        f = encoded.to(self.logit_dtype) if encoded is not None else self.modality.encode(self.backbone, x, [])
        return F.normalize(f, dim=-1)

    def frozen_encoding(self) -> bool:
        """Whether no part acts before or inside the encoder of this client's inputs, so their encodings are a
        function of the inputs alone (and may come from a :class:`~mmfl.data.feature_cache.FeatureCache`)."""
        return not any(p.changes_encoding(self.modality.name) for p in self.parts.values())

    def input_features(self, x: Tensor | None, encoded: Tensor | None = None) -> Tensor:
        """Inputs [B, ...] → normalised joint-space features [B, D], through the parts' input hooks.

        Args:
            x: the inputs (ignored when ``encoded`` is given).
            encoded: cached frozen encodings [B, D] of the inputs (only when :meth:`frozen_encoding`).
        """
        parts = list(self.parts.values())
        if encoded is None:
            for part in parts:
                x = part.prompt_input(x, self.modality.name)
            f_x = self.modality.encode(self.backbone, x, parts)  # [B, D]
        else:
            f_x = encoded.to(self.logit_dtype)  # [B, D]
        for part in parts:
            f_x = part.adapt_input_features(f_x)
        return F.normalize(f_x, dim=-1)

    @property
    def logit_dtype(self) -> torch.dtype:
        """The dtype the frozen encoders produce (their parameters' dtype)."""
        return next(self.backbone.model.parameters()).dtype

    def forward(self, x: Tensor | None, encoded: Tensor | None = None) -> Tensor:
        """Inputs [B, ...] (or their cached encodings [B, D]) → class logits [B, C]."""
        return self._features_and_logits(x, encoded)[2]

    def _features_and_logits(self, x: Tensor | None, encoded: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.adapts_backbone():  # encode with this client's weights in place of the frozen ones
            params = self.backbone_parameters()
            self._replaced = frozenset(params)
            return self.backbone.call_with(params, lambda: self._features_and_logits_as_is(x, encoded))
        return self._features_and_logits_as_is(x, encoded)

    def _features_and_logits_as_is(self, x: Tensor | None, encoded: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        f_x = self.input_features(x, encoded)  # [B, D]
        if self.training and self.mixup > 0 and f_x.shape[0] > 1:  # the loss mixes the labels alike (_step)
            f_x, lam, perm = mix_features(f_x, self.mixup)
            self._mix = (lam, perm)
        if self._eval_text is not None and not self.training:  # weights do not move while evaluating
            f_t = self._eval_text.to(f_x.dtype)  # [C, D]
        else:
            f_t = self.class_text_features(f_x).to(f_x.dtype)  # [C, D] or [B, C, D]
            if not self.training and f_t.dim() == 2 and self._evaluating:
                self._eval_text = f_t.detach()
        scale = self.backbone.logit_scale.exp()
        if f_t.dim() == 3:  # one set of class features per input (CoCoOp)
            logits = scale * torch.einsum("bd,bcd->bc", f_x, f_t)  # [B, C]
        else:
            logits = scale * f_x @ f_t.t()  # [B, C]
        for name in self._head_names if not self.training else ():  # a decoupled head scores beside the prompts
            logits = self.parts[name].fuse_logits(logits, f_x)
        return f_x, f_t, logits

    def _step(self, batch: dict[str, Tensor], metric: MulticlassAccuracy, stage: str) -> Tensor:
        x, y, encoded = batch.get(self.modality.input_key), batch[LABEL], batch.get(ENCODED)
        f_x, f_t, logits = self._features_and_logits(x, encoded)
        mix, self._mix = self._mix, None
        loss = F.cross_entropy(logits.float(), y) if mix is None else mixed_cross_entropy(logits, y, *mix)
        for name in self._head_names if stage == "train" else ():
            loss = self.parts[name].training_loss(loss, f_x, f_t, y, mix)
        if stage == "train" and self.knowledge is not None:
            loss = loss + self._guidance(x, y, encoded, f_x, f_t, logits)
        if stage == "train":
            for part in self.parts.values():
                reg = part.regularization()
                if reg is not None:
                    loss = loss + reg
        metric.update(logits, y)
        bs = y.shape[0]
        if stage == "train":  # summed here, logged once per epoch: self.log costs ~1 ms a call
            self._loss_sum = self._loss_sum + loss.detach() * bs
            self._seen += bs
        else:
            self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=bs)
            self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def on_train_epoch_start(self) -> None:
        """Start the epoch's running loss and accuracy."""
        self._loss_sum: Tensor | float = 0.0
        self._seen = 0
        self.train_acc.reset()

    def on_train_epoch_end(self) -> None:
        """Keep the epoch's mean ``train_loss`` and ``train_acc`` in :attr:`epoch_metrics` and, when
        :attr:`log_train_metrics`, log them (``self.log``: ~1 ms a call, and a device sync)."""
        if self._seen:
            self.epoch_metrics = {"train_loss": self._loss_sum / self._seen, "train_acc": self.train_acc.compute()}
            if self.log_train_metrics:
                for k, v in self.epoch_metrics.items():
                    self.log(k, v)
        self.train_acc.reset()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch; ``train_loss`` and ``train_acc`` are logged at the epoch's end."""
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Logs ``val_loss`` and ``val_acc``."""
        self._step(batch, self.val_acc, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Logs ``test_loss`` and ``test_acc``."""
        self._step(batch, self.test_acc, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> tuple[Tensor, Tensor | None]:
        """Logits [B, C] and labels [B] of one batch (for metrics computed after the pass); labels None for
        unlabeled data."""
        return self(batch.get(self.modality.input_key), batch.get(ENCODED)).float(), batch.get(LABEL)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The configured optimizer over the trainable parts only (:func:`~mmfl.prompts.base.optimizer_for`)."""
        opt = optimizer_for(self.parts.values(), self.optimizer_factory)
        if opt is None:
            raise ValueError(f"client of task {self.task!r} has nothing to train: add a part to `parts`")
        return opt

    def on_fit_start(self) -> None:
        """Move the backbone once the Trainer has placed this module, and keep it frozen in eval mode (walking its
        modules only when something switched them to training mode)."""
        if self.backbone.device != self.device:
            self.backbone.to(self.device)
        if self.backbone.model.training or any(m.training for m in self.backbone.model.children()):
            self.backbone.model.eval()

    _evaluating = False

    def _start_evaluation(self) -> None:
        """An evaluation pass (test, validation, prediction) starts: the class features, unless conditioned on the
        input, are computed on its first batch and reused for the rest (the weights do not move meanwhile)."""
        self.on_fit_start()
        self._evaluating, self._eval_text = True, None

    def _end_evaluation(self) -> None:
        self._evaluating, self._eval_text = False, None

    on_test_start = on_validation_start = on_predict_start = _start_evaluation
    on_test_end = on_validation_end = on_predict_end = _end_evaluation
