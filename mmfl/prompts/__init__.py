"""Trainable parts: prompts and adapters attached to the frozen backbone."""

from mmfl.prompts.base import TrainablePart
from mmfl.prompts.coop import CoOp

__all__ = ["CoOp", "TrainablePart"]
