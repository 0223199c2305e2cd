"""ClientModule: one client's training and evaluation as a LightningModule."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from mmfl.backbone import Backbone
from mmfl.data.splits import ENCODED, LABEL
from mmfl.federated.mixing import MixRule, rules_for
from mmfl.federated.scopes import is_local, qualify
from mmfl.modalities.base import Modality
from mmfl.prompts.base import TrainablePart

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer banners and known-harmless warnings (one Trainer per client-round)."""
    loggers = [
        logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


@functools.cache
def _entry_point_groups_in_use(group: str) -> bool:
    return bool(importlib.metadata.entry_points(group=group))


def _skip_empty_callback_scan() -> None:
    """Every ``Trainer()`` scans all installed distributions for external-callback entry points (~10 ms, more
    than a client's local round on a GPU). mmfl builds one Trainer per client per round, so the scan is done
    once per process: when the group has no entry points the (unchanged) loader is skipped; when it has some,
    Lightning's own loader runs every time, as before."""
    from lightning.pytorch.trainer.connectors import callback_connector as cc

    original = cc._load_external_callbacks
    if getattr(original, "__mmfl_cached__", False):
        return

    def load(group: str) -> list:
        return original(group) if _entry_point_groups_in_use(group) else []

    load.__mmfl_cached__ = True  # type: ignore[attr-defined]
    cc._load_external_callbacks = load


class KeepCacheCUDAAccelerator(CUDAAccelerator):
    """Lightning's CUDA accelerator, except that it keeps PyTorch's CUDA memory cache and cuBLAS workspaces.

    Lightning's CUDA accelerator empties the memory cache and frees the cuBLAS workspaces at the start (``setup``)
    and at the end (``teardown``) of every ``fit``/``test``. mmfl runs one short ``fit`` per client per round, so
    every client would allocate its memory and workspaces again from the driver (synchronous cudaMalloc calls);
    keeping them lets the next client reuse them. Memory is still released when the process ends, or by
    ``torch.cuda.empty_cache()``.
    """

    def setup(self, trainer: L.Trainer) -> None:
        """What Lightning's does, less emptying the cache."""
        self.set_nvidia_flags(trainer.local_rank)

    def teardown(self) -> None:
        """Keep the cache for the next client."""


class ResidentSingleDeviceStrategy(SingleDeviceStrategy):
    """Lightning's single-device strategy, except that its teardown leaves the module on its device.

    Lightning moves the module (and the optimizer state) back to the CPU after every ``fit``/``test``, so the next
    one copies it to the device again: two transfers per client per round. mmfl's client modules hold only their
    small trainable parts (the frozen backbone is shared and stays on the device anyway), so they stay where the
    strategy put them; :meth:`ClientModule.trainable_state_dict` still hands out CPU copies.
    """

    def teardown(self) -> None:
        """Lightning's teardown, less the moves to the CPU."""
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def _placement(name: str) -> tuple[str | L.pytorch.accelerators.Accelerator, str | L.pytorch.strategies.Strategy]:
    """The accelerator and strategy to give a Trainer for ``training.accelerator`` ``name``.

    ``auto``/``gpu``/``cuda`` with CUDA present: the cache-keeping CUDA accelerator on ``cuda:0`` with the resident
    strategy; ``cpu``: the CPU with the resident strategy; anything else (``auto`` without CUDA, which Lightning
    may resolve to a TPU or MPS; ``mps``; ``tpu``; ...) is passed through to Lightning as written.
    """
    if name in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return KeepCacheCUDAAccelerator(), ResidentSingleDeviceStrategy(device="cuda:0")
    if name == "cpu":
        return "cpu", ResidentSingleDeviceStrategy(device="cpu")
    return name, "auto"


def make_trainer(
    max_epochs: int = 1, max_steps: int = -1, accelerator: str = "auto", precision: str = "32-true"
) -> L.Trainer:
    """A quiet single-device Trainer (no logger, checkpoints, progress bar or sanity steps) that leaves the module
    and, on CUDA, PyTorch's memory cache in place when it ends (see :func:`_placement`)."""
    _skip_empty_callback_scan()
    acc, strategy = _placement(accelerator)
    return L.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator=acc,
        strategy=strategy,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum, lr 0.002 — CoOp's setting."""
    return torch.optim.SGD(params, lr=0.002, momentum=0.9)


@torch.no_grad()
def zero_shot_text_features(backbone: Backbone, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
    """Hand-written prompt features: templates filled with each class name, normalised, averaged over
    templates and normalised again (CLIP's prompt ensembling). Returns [C, D]."""
    names = [c.replace("_", " ") for c in class_names]
    texts = [t.format(c) for c in names for t in templates]
    feats = F.normalize(backbone.encode_text(backbone.tokenize(texts)).float(), dim=-1)  # [C*T, D]
    feats = feats.view(len(names), len(templates), -1).mean(dim=1)  # [C, D]
    return F.normalize(feats, dim=-1)


class ClientModule(L.LightningModule):
    """One client: frozen backbone + its trainable parts, for one task on one modality.

    ``logits = exp(logit_scale) · norm(f_x) · norm(f_t)ᵀ``, where ``f_x`` comes from the modality's
    encoder and ``f_t`` from the text part (or from hand-written templates when no part provides
    class text features). Only the parts' parameters are optimised; the backbone is held by
    reference and never appears in this module's state dict or checkpoints.

    Args:
        backbone: the shared frozen backbone.
        modality: the input modality.
        task: task name (scope key of ``task`` tensors).
        class_names: label names of the task, in label order.
        parts: the client's trainable parts (distinct ``part_name``\\ s).
        optimizer: builds the optimizer from the trainable parameters.
        templates: hand-written prompt templates for the zero-shot class features.
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
        self.optimizer_factory = optimizer
        self.templates = list(templates)
        self._zs_text: Tensor | None = None
        self.log_train_metrics = True
        """Log ``train_loss``/``train_acc`` through ``self.log`` at each epoch's end (for loggers and callbacks);
        a simulation, which reads :attr:`epoch_metrics` instead, turns it off."""
        self.epoch_metrics: dict[str, Tensor] = {}
        """The last training epoch's mean ``train_loss`` and ``train_acc`` (0-d tensors on the module's device)."""
        n = len(self.class_names)
        # validate_args=False: the check counts the unique labels of every batch (a device sync per step); labels
        # outside [0, C) already fail in the cross-entropy
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes=n, average="micro", validate_args=False)

    # ---------------------------------------------------------------- trainable state
    def _qualified(self) -> Iterable[tuple[str, nn.Parameter]]:
        for part_name, part in self.parts.items():
            for scope, pname, param, _ in part.scoped_parameters():
                yield qualify(scope, self.task, self.modality.name, f"{part_name}.{pname}"), param

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
        through the parts' text adapters. [C, D], or [B, C, D] from an input-conditioned text part.

        Args:
            input_features: the batch's normalised encoded inputs [B, D], for conditioned prompts.
        """
        text_part = self.text_part
        if text_part is not None:
            f_t = text_part.class_text_features(input_features)
        else:
            if self._zs_text is None or self._zs_text.device != self.device:
                self._zs_text = zero_shot_text_features(self.backbone, self.class_names, self.templates).to(self.device)
            f_t = self._zs_text
        for part in self.parts.values():
            f_t = part.adapt_text_features(f_t)
        return F.normalize(f_t, dim=-1)

    def frozen_encoding(self) -> bool:
        """Whether no part acts before or inside the encoder of this client's inputs, so their encodings are a
        function of the inputs alone (and may come from a :class:`~mmfl.data.feature_cache.FeatureCache`)."""
        return not any(p.changes_encoding() for p in self.parts.values())

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
        f_x = self.input_features(x, encoded)  # [B, D]
        f_t = self.class_text_features(f_x).to(f_x.dtype)  # [C, D] or [B, C, D]
        scale = self.backbone.logit_scale.exp()
        if f_t.dim() == 3:  # one set of class features per input (CoCoOp)
            return scale * torch.einsum("bd,bcd->bc", f_x, f_t)  # [B, C]
        return scale * f_x @ f_t.t()  # [B, C]

    def _step(self, batch: dict[str, Tensor], metric: MulticlassAccuracy, stage: str) -> Tensor:
        x, y = batch.get(self.modality.input_key), batch[LABEL]
        logits = self(x, batch.get(ENCODED))
        loss = F.cross_entropy(logits.float(), y)
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

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> tuple[Tensor, Tensor]:
        """Logits [B, C] and labels [B] of one batch (for metrics computed after the pass)."""
        return self(batch.get(self.modality.input_key), batch.get(ENCODED)).float(), batch[LABEL]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The configured optimizer over the trainable parts only."""
        params = [p for p in self.parts.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"client of task {self.task!r} has nothing to train: add a part to `parts`")
        return self.optimizer_factory(params)

    def on_fit_start(self) -> None:
        """Move the backbone once the Trainer has placed this module, and keep it frozen in eval mode (walking its
        modules only when something switched them to training mode)."""
        if self.backbone.device != self.device:
            self.backbone.to(self.device)
        if self.backbone.model.training or any(m.training for m in self.backbone.model.children()):
            self.backbone.model.eval()

    on_test_start = on_fit_start
    on_validation_start = on_fit_start
    on_predict_start = on_fit_start
