"""Evaluation: zero-shot baselines (and, later, the transfer protocol)."""

from mmfl.evaluation.zeroshot import DEFAULT_TEMPLATES, resolve_data, zero_shot

__all__ = ["DEFAULT_TEMPLATES", "resolve_data", "zero_shot"]
