"""Data: HF ``datasets`` sources, bundled offline sets, tasks and their partitioning."""

from mmfl.data.bundled import AnimalSilhouettes, SklearnDigits
from mmfl.data.loader import make_loader
from mmfl.data.sources import DataSource, HubDataset, ImageFolder, InMemory
from mmfl.data.task import ClientData, PreparedTask, Task, prepare_task

__all__ = [
    "AnimalSilhouettes",
    "ClientData",
    "DataSource",
    "HubDataset",
    "ImageFolder",
    "InMemory",
    "PreparedTask",
    "SklearnDigits",
    "Task",
    "make_loader",
    "prepare_task",
]
