"""Round and local-training settings of a federation (recipe sections ``federation`` and ``training``), and seeding."""

from __future__ import annotations

import logging
import random
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from jsonargparse import lazy_instance

from mmfl.federated.aggregate import Aggregator, FedAvg
from mmfl.federated.privacy import DifferentialPrivacy
from mmfl.federated.pseudo_labels import PseudoLabels
from mmfl.federated.virtual_features import VirtualFeatures
from mmfl.knowledge import KnowledgeGuidance
from mmfl.module import OptimizerFactory, default_optimizer

log = logging.getLogger(__name__)


@dataclass
class Federation:
    """How the server runs rounds.

    Args:
        rounds: number of rounds.
        fraction: share of clients sampled each round.
        min_clients: sample at least this many clients per round, and complete a round only when at least
            this many (or all sampled, if fewer were sampled) replied with a valid update.
        aggregator: how each tensor's copies are merged within its scope group (FedAvg, FedAvgM, or a robust
            rule of :mod:`mmfl.federated.robust`: Median, TrimmedMean, Krum).
        eval_every: evaluate every task's test split every this many rounds (and after the last).
        retries: when fewer than ``min_clients`` succeeded, run the failed clients again this many times before
            the run stops.
        client_timeout: seconds a client may train in a round; a slower one is stopped at its next batch and
            left out of the round (None: no limit).
        clip_norm: clip each client's update (over all its keys) to this L2 norm before merging (None: no
            clipping).
        dp: client-level differential privacy (clipping + Gaussian noise + accounting); None: off.
        virtual_features: after every merge, train the merged tensors on virtual features drawn from the clients' class
            statistics (CCVR; :class:`~mmfl.federated.virtual_features.VirtualFeatures`), against label skew; None: off.
    """

    rounds: int = 5
    fraction: float = 1.0
    min_clients: int = 1
    aggregator: Aggregator = field(default_factory=lambda: lazy_instance(FedAvg))  # serialisable default
    eval_every: int = 1
    retries: int = 0
    client_timeout: float | None = None
    clip_norm: float | None = None
    dp: DifferentialPrivacy | None = None
    virtual_features: VirtualFeatures | None = None

    def check(self) -> None:
        """Raise a clear error for impossible settings (before any data or model is loaded)."""
        if self.rounds < 0 or not 0 < self.fraction <= 1:
            raise ValueError("federation.rounds must be >= 0 and federation.fraction in (0, 1]")
        if self.min_clients < 1 or self.retries < 0 or self.eval_every < 1:
            raise ValueError("federation.min_clients and eval_every must be >= 1, federation.retries >= 0")
        if self.client_timeout is not None and not self.client_timeout > 0:
            raise ValueError(f"federation.client_timeout must be > 0 seconds, got {self.client_timeout}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"federation.clip_norm must be > 0, got {self.clip_norm}")
        if self.dp is not None:
            if self.clip_norm is not None:
                raise ValueError("give the clip norm once: federation.dp.clip_norm (drop federation.clip_norm)")
            self.dp.check(self.aggregator, self.fraction)
        if self.virtual_features is not None:
            self.virtual_features.check()
            if self.dp is not None:
                raise ValueError(
                    "federation.virtual_features sends each task's class statistics to the server unprotected, so it "
                    "cannot be combined with federation.dp: drop one of them"
                )


@dataclass
class LocalTraining:
    """How each client trains in a round (and how evaluation batches are formed).

    Args:
        epochs: local epochs per round (-1: no limit on epochs, only with a ``max_steps`` limit).
        max_steps: stop local training after this many optimizer steps (-1: no limit, only with an ``epochs`` limit).
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        optimizer: builds the optimizer over the trainable parameters (``class_path`` in recipes,
            e.g. ``torch.optim.AdamW`` with ``init_args: {lr: 0.01}``).
        accelerator: Lightning accelerator (``auto`` picks a GPU when there is one).
        precision: Lightning precision (``32-true``, ``bf16-mixed``, ...).
        num_workers: DataLoader worker processes.
        feature_cache: ``disk`` (default), ``memory`` or ``off``: when no part of a client acts before or inside
            its input encoder (e.g. CoOp), encode each input once and reuse the encoding across epochs, rounds,
            clients (``memory``) and runs (``disk``: under ``$MMFL_CACHE/features``). See
            :mod:`mmfl.data.feature_cache`.
        knowledge: weights of the terms that keep the learned features near the frozen model's (KgCoOp's
            ``text``, PromptSRC's ``text_l1``, ``input_l1``, ``logits_kl``; :mod:`mmfl.knowledge`); all 0 by default.
        pseudo_labels: how clients of unlabeled data (a task's ``labeled_fraction`` < 1) choose the examples they
            train on each round (:class:`~mmfl.federated.pseudo_labels.PseudoLabels`).
    """

    epochs: int = 1
    max_steps: int = -1
    batch_size: int = 32
    eval_batch_size: int = 32
    optimizer: OptimizerFactory = default_optimizer
    accelerator: str = "auto"
    precision: str = "32-true"
    num_workers: int = 0
    feature_cache: str = "disk"
    knowledge: KnowledgeGuidance = field(default_factory=KnowledgeGuidance)
    pseudo_labels: PseudoLabels = field(default_factory=PseudoLabels)

    def check(self) -> None:
        """Raise a clear error for impossible or endless settings (before any data or model is loaded)."""
        if not (self.epochs >= 1 or (self.epochs == -1 and self.max_steps >= 1)):
            raise ValueError(
                f"training.epochs must be >= 1, or -1 (no limit) together with training.max_steps >= 1; got "
                f"epochs={self.epochs}, max_steps={self.max_steps}: a client would "
                + ("never stop training" if self.epochs == -1 else "train on nothing")
            )
        if not (self.max_steps >= 1 or self.max_steps == -1):
            raise ValueError(
                f"training.max_steps must be >= 1, or -1 (no limit: the epochs decide); got {self.max_steps}"
            )
        if self.epochs == -1:
            log.info("training.epochs -1: no epoch limit; each client stops after %d steps a round", self.max_steps)
        for key in ("batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"training.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ValueError(f"training.num_workers must be >= 0, got {self.num_workers}")
        self.knowledge.check()
        self.pseudo_labels.check()


def derived_seed(*parts: object) -> int:
    """A stable 31-bit seed from any values (independent of Python's hash randomisation)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
