"""Faulty clients: the reply validator, the local-training deadline, and the error a failed round raises."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from mmfl.federated.aggregate import Update

Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
"""What a client must return: shape and dtype by payload key."""


class InvalidUpdate(ValueError):
    """A client's reply breaks the contract (keys, shapes, dtypes, finiteness, example count)."""


class ClientTimeout(TimeoutError):
    """A client's local training ran past ``federation.client_timeout``."""


class RoundFailed(RuntimeError):
    """Fewer clients than ``federation.min_clients`` succeeded in a round, even after the retries."""


def spec_of(state: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The shape and dtype of each tensor of ``state``."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def validate_update(update: Any, spec: Spec) -> str | None:
    """Why ``update`` cannot be merged, or None when it can.

    A mergeable reply is an :class:`Update` whose ``state`` has exactly the keys of ``spec``, each a tensor of
    the given shape and dtype with only finite values, and whose ``num_examples`` is a positive int.
    """
    if not isinstance(update, Update):
        return f"the reply is a {type(update).__name__}, not an Update"
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"num_examples must be a positive int, got {n!r}"
    if not isinstance(update.state, Mapping):
        return f"the state is a {type(update.state).__name__}, not a dict of tensors"
    missing = sorted(set(spec) - set(update.state))
    extra = sorted(map(str, set(update.state) - set(spec)))
    if missing:
        return f"missing keys {missing}"
    if extra:
        return f"unexpected keys {extra}"
    for key, (shape, dtype) in spec.items():
        t = update.state[key]
        if not isinstance(t, Tensor):
            return f"{key} is a {type(t).__name__}, not a tensor"
        if tuple(t.shape) != tuple(shape):
            return f"{key} has shape {tuple(t.shape)}, expected {tuple(shape)}"
        if t.dtype != dtype:
            return f"{key} has dtype {t.dtype}, expected {dtype}"
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return f"{key} has {bad} non-finite value(s) (NaN/Inf)"
    return None


class Deadline(L.Callback):
    """Stops a client's local training with :class:`ClientTimeout` once ``seconds`` have passed (checked after
    every batch, so a client is pre-empted at the next batch boundary)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = math.inf

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        elapsed = time.monotonic() - self.start
        if elapsed > self.seconds:
            raise ClientTimeout(f"local training took over {self.seconds:g} s (client_timeout)")
