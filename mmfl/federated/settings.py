"""Round and local-training settings of a federation (recipe sections ``federation`` and ``training``), and seeding."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from jsonargparse import lazy_instance

from mmfl.federated.aggregate import Aggregator, FedAvg
from mmfl.module import OptimizerFactory, default_optimizer


@dataclass
class Federation:
    """How the server runs rounds.

    Args:
        rounds: number of rounds.
        fraction: share of clients sampled each round.
        min_clients: sample at least this many clients per round.
        aggregator: how each tensor's copies are merged within its scope group.
        eval_every: evaluate every task's test split every this many rounds (and after the last).
    """

    rounds: int = 5
    fraction: float = 1.0
    min_clients: int = 1
    aggregator: Aggregator = field(default_factory=lambda: lazy_instance(FedAvg))  # serialisable default
    eval_every: int = 1


@dataclass
class LocalTraining:
    """How each client trains in a round (and how evaluation batches are formed).

    Args:
        epochs: local epochs per round.
        max_steps: stop local training after this many optimizer steps (-1: no limit).
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        optimizer: builds the optimizer over the trainable parameters (``class_path`` in recipes,
            e.g. ``torch.optim.AdamW`` with ``init_args: {lr: 0.01}``).
        accelerator: Lightning accelerator (``auto`` picks a GPU when there is one).
        precision: Lightning precision (``32-true``, ``bf16-mixed``, ...).
        num_workers: DataLoader worker processes.
    """

    epochs: int = 1
    max_steps: int = -1
    batch_size: int = 32
    eval_batch_size: int = 32
    optimizer: OptimizerFactory = default_optimizer
    accelerator: str = "auto"
    precision: str = "32-true"
    num_workers: int = 0


def derived_seed(*parts: object) -> int:
    """A stable 31-bit seed from any values (independent of Python's hash randomisation)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
