"""Trainable parts: prompts and adapters attached to the frozen backbone."""

from mmfl.prompts.adapter import ClipAdapter, ProjectionTuning
from mmfl.prompts.alignment import BackboneProjections
from mmfl.prompts.base import TrainablePart
from mmfl.prompts.coop import CoOp, PromptFolio
from mmfl.prompts.generator import PromptGenerator
from mmfl.prompts.head import DecoupledHead
from mmfl.prompts.maple import MaPLe
from mmfl.prompts.pixel import PaddingPrompt
from mmfl.prompts.text_input import TextInputPrompt
from mmfl.prompts.vpt import VisualPromptTokens

__all__ = [
    "BackboneProjections",
    "ClipAdapter",
    "CoOp",
    "DecoupledHead",
    "MaPLe",
    "PaddingPrompt",
    "ProjectionTuning",
    "PromptFolio",
    "PromptGenerator",
    "TextInputPrompt",
    "TrainablePart",
    "VisualPromptTokens",
]
