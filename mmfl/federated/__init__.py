"""Federation: scopes, aggregation, the in-process simulation and state files.

The simulation's names resolve lazily (PEP 562): the parts and data modules import
``mmfl.federated.scopes``, and the simulation imports them.
"""

from importlib import import_module
from typing import Any

from mmfl.federated.aggregate import Aggregator, FedAvg, FedAvgM, Update, clip_updates
from mmfl.federated.checkpoint import load_state, save_state
from mmfl.federated.privacy import DifferentialPrivacy
from mmfl.federated.robust import Flame, Krum, Median, TrimmedMean
from mmfl.federated.round_merge import aggregate
from mmfl.federated.scopes import SCOPES, qualify, scope_prefix

_LAZY = {"Federation", "LocalTraining", "Simulation"}

__all__ = [
    "SCOPES",
    "Aggregator",
    "DifferentialPrivacy",
    "FedAvg",
    "FedAvgM",
    "Federation",
    "Flame",
    "Krum",
    "LocalTraining",
    "Median",
    "Simulation",
    "TrimmedMean",
    "Update",
    "aggregate",
    "clip_updates",
    "load_state",
    "qualify",
    "save_state",
    "scope_prefix",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.simulation"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
