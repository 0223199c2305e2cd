"""DecoupledHead: a classifier head for the trained classes beside the prompt's image-text matching (DePT)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfl.backbone import Backbone
from mmfl.mixup import mixed_cross_entropy
from mmfl.prompts.base import TrainablePart


class DecoupledHead(TrainablePart):
    """DePT's decoupled head (Zhang et al., "DePT: Decoupled Prompt Tuning", CVPR 2024): a linear classifier over the
    task's trained classes on channel-wise transformed joint-space features, trained beside the image-text matching
    (ITM) of the prompts, so what is specific to the base classes can go into the head instead of the prompt.

    - Training: the client's loss is ``(1 − w) · CE(ITM logits) + w · CE(head)``; the head's cross-entropy is the
      mean over the batch's input features and (``text_examples``) the class text features of their labels, each
      through its own channel-wise scale and shift (DePT's "channel-adjusted transfer": ``f' = s ⊙ f + b``).
    - Scoring the trained classes: ``(1 − w) · ITM logits + w · head logits``.
    - Scoring other classes (novel classes, another data set's): the head has no row for them, so a module built for
      other class names leaves the part out (:attr:`~mmfl.prompts.base.TrainablePart.trained_classes_only`) and
      classifies with the prompts' image-text matching alone.

    The transforms start at the identity and the classifier at ``nn.Linear``'s default initialisation (DePT's).

    Args:
        backbone: the shared frozen backbone.
        class_names: the task's label names (one classifier row each).
        weight: ``w`` in [0, 1], the head's share of the loss and of the trained classes' logits (DePT: 0.7).
        text_examples: also train the classifier on the class text features of the batch's labels (DePT's).
        lr_scale: the head's learning rate is the optimizer's times this (DePT: 6.5; the prompts keep the optimizer's).
        name: part name in payload keys.
        scope: scope of its parameters (``task``: merged over the task's clients; ``task_modality`` for a
            multi-modal task, since the input transform is the modality's).
        scopes: per-parameter scope overrides.
        modalities: serve only clients of these modalities (None: all).
    """

    trained_classes_only = True

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        weight: float = 0.7,
        text_examples: bool = True,
        lr_scale: float = 6.5,
        name: str = "head",
        scope: str = "task",
        scopes: Mapping[str, str] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        super().__init__(backbone, class_names, name=name, scope=scope, scopes=scopes, modalities=modalities)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"DecoupledHead: weight must be in [0, 1] (the head's share), got {weight}")
        if not class_names:
            raise ValueError("DecoupledHead: the task has no class names to classify")
        if lr_scale <= 0:
            raise ValueError(f"DecoupledHead: lr_scale must be > 0, got {lr_scale}")
        d = backbone.embed_dim
        self.lr_scale = float(lr_scale)
        self.weight = float(weight)
        self.text_examples = text_examples
        self.input_scale = nn.Parameter(torch.ones(d))  # [D]
        self.input_shift = nn.Parameter(torch.zeros(d))  # [D]
        self.text_scale = nn.Parameter(torch.ones(d))  # [D]
        self.text_shift = nn.Parameter(torch.zeros(d))  # [D]
        self.classifier = nn.Linear(d, len(class_names))  # weight [C, D], bias [C]
        self.check_scopes()

    def head_logits(self, f_x: Tensor) -> Tensor:
        """The head's logits [B, C] for normalised input features [B, D]."""
        f = f_x.to(self.classifier.weight.dtype)
        return self.classifier(self.input_scale * f + self.input_shift)

    def fuse_logits(self, logits: Tensor, f_x: Tensor) -> Tensor:
        """``(1 − w) · logits + w · head`` [B, C], for the ITM ``logits`` [B, C] of input features ``f_x`` [B, D]."""
        return (1.0 - self.weight) * logits + self.weight * self.head_logits(f_x).to(logits.dtype)

    def training_loss(
        self, loss: Tensor, f_x: Tensor, f_t: Tensor, y: Tensor, mix: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """``(1 − w) · loss + w · CE(head)``.

        Args:
            loss: the ITM cross-entropy [] of the batch.
            f_x: the batch's normalised input features [B, D] (mixed, when ``mix``).
            f_t: the normalised class text features [C, D] (or [B, C, D], conditioned on the inputs).
            y: the labels [B].
            mix: the batch's mixup weights [B] and partners [B] (the input half is mixed alike; None: no mixup).
        """
        if self.weight == 0.0:
            return loss
        logits = self.head_logits(f_x).float()  # [B, C]
        head = F.cross_entropy(logits, y) if mix is None else mixed_cross_entropy(logits, y, *mix)
        if self.text_examples:
            t = f_t[y] if f_t.dim() == 2 else f_t[torch.arange(len(y), device=y.device), y]  # [B, D]
            t = t.to(self.classifier.weight.dtype)
            head = (head + F.cross_entropy(self.classifier(self.text_scale * t + self.text_shift).float(), y)) / 2
        return (1.0 - self.weight) * loss + self.weight * head
