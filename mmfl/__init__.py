"""mmfl: multi-modal federated prompt tuning on frozen CLIP-style backbones.

The public API, re-exported here and resolved lazily (``import mmfl`` stays cheap)::

    from mmfl import Backbone, CoOp, Federation, LocalTraining, Simulation, Task, prepare_task
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Backbone": "mmfl.backbone",
    "ClientModule": "mmfl.module",
    "TrainablePart": "mmfl.prompts",
    "CoOp": "mmfl.prompts",
    "Modality": "mmfl.modalities",
    "register_modality": "mmfl.modalities",
    "get_modality": "mmfl.modalities",
    "available_modalities": "mmfl.modalities",
    "Task": "mmfl.data",
    "prepare_task": "mmfl.data",
    "DataSource": "mmfl.data",
    "HubDataset": "mmfl.data",
    "ImageFolder": "mmfl.data",
    "InMemory": "mmfl.data",
    "Federation": "mmfl.federated",
    "LocalTraining": "mmfl.federated",
    "Simulation": "mmfl.federated",
    "FedAvg": "mmfl.federated",
    "Aggregator": "mmfl.federated",
    "aggregate": "mmfl.federated",
    "zero_shot": "mmfl.evaluation",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmfl' has no attribute {name!r}")
