"""Trainable parts: prompts and adapters attached to the frozen backbone."""

from mmfl.prompts.adapter import ClipAdapter, ProjectionTuning
from mmfl.prompts.base import TrainablePart
from mmfl.prompts.coop import CoOp, PromptFolio
from mmfl.prompts.pixel import PaddingPrompt

__all__ = ["ClipAdapter", "CoOp", "PaddingPrompt", "ProjectionTuning", "PromptFolio", "TrainablePart"]
