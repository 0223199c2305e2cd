"""Data: HF ``datasets`` sources, bundled offline sets, tasks and their partitioning."""

from mmfl.data.bundled import BUNDLED, AnimalSilhouettes, FashionMNIST, SkimagePhotos, SklearnDigits
from mmfl.data.loader import make_loader
from mmfl.data.sounds import AnimalSounds
from mmfl.data.sources import DataSource, HubDataset, ImageFolder, InMemory
from mmfl.data.speech import AsteriskDigits, SpokenWords
from mmfl.data.task import ClientData, PreparedTask, Task, prepare_task
from mmfl.data.wordnet import WordNetGlosses

BUNDLED["sounds"] = AnimalSounds  # registered here: mmfl.data.sounds imports mmfl.data.bundled

__all__ = [
    "BUNDLED",
    "AnimalSilhouettes",
    "AnimalSounds",
    "AsteriskDigits",
    "ClientData",
    "DataSource",
    "FashionMNIST",
    "HubDataset",
    "ImageFolder",
    "InMemory",
    "PreparedTask",
    "SkimagePhotos",
    "SklearnDigits",
    "SpokenWords",
    "Task",
    "WordNetGlosses",
    "make_loader",
    "prepare_task",
]
