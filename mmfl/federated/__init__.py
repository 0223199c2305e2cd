"""Federation: scopes, aggregation, the in-process simulation and state files.

Re-exports resolve lazily (PEP 562) so that ``mmfl.federated.scopes`` can be imported by the parts
and data modules without pulling in the simulation (which imports them).
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "SCOPES": "scopes",
    "qualify": "scopes",
    "scope_prefix": "scopes",
    "Aggregator": "aggregate",
    "FedAvg": "aggregate",
    "Update": "aggregate",
    "aggregate": "aggregate",
    "load_state": "checkpoint",
    "save_state": "checkpoint",
    "Federation": "simulation",
    "LocalTraining": "simulation",
    "Simulation": "simulation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
