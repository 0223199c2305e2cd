"""Evaluation: the fixed protocol (splits, selection, seeds, baselines), its metrics, runner and report, and
the zero-shot baseline."""

from mmfl.evaluation.metrics import accuracy, calibration_error, harmonic_mean, mean_std
from mmfl.evaluation.protocol import Protocol, Transfer, Variant
from mmfl.evaluation.runner import Scorer, predict, run_seed
from mmfl.evaluation.zeroshot import DEFAULT_TEMPLATES, resolve_data, zero_shot

__all__ = [
    "DEFAULT_TEMPLATES",
    "Protocol",
    "Scorer",
    "Transfer",
    "Variant",
    "accuracy",
    "calibration_error",
    "harmonic_mean",
    "mean_std",
    "predict",
    "resolve_data",
    "run_seed",
    "zero_shot",
]
