"""Lightning Trainers for mmfl's many short fits: quiet, and leaving the module and the CUDA cache in place."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import warnings
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import SingleDeviceStrategy


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer banners and known-harmless warnings (one Trainer per client-round)."""
    loggers = [
        logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


@functools.cache
def _entry_point_groups_in_use(group: str) -> bool:
    return bool(importlib.metadata.entry_points(group=group))


def _skip_empty_callback_scan() -> None:
    """Every ``Trainer()`` scans all installed distributions for external-callback entry points (~10 ms, more
    than a client's local round on a GPU). mmfl builds one Trainer per client per round, so the scan is done
    once per process: when the group has no entry points the (unchanged) loader is skipped; when it has some,
    Lightning's own loader runs every time, as before."""
    from lightning.pytorch.trainer.connectors import callback_connector as cc

    original = cc._load_external_callbacks
    if getattr(original, "__mmfl_cached__", False):
        return

    def load(group: str) -> list:
        return original(group) if _entry_point_groups_in_use(group) else []

    load.__mmfl_cached__ = True  # type: ignore[attr-defined]
    cc._load_external_callbacks = load


class KeepCacheCUDAAccelerator(CUDAAccelerator):
    """Lightning's CUDA accelerator, except that it keeps PyTorch's CUDA memory cache and cuBLAS workspaces.

    Lightning's CUDA accelerator empties the memory cache and frees the cuBLAS workspaces at the start (``setup``)
    and at the end (``teardown``) of every ``fit``/``test``. mmfl runs one short ``fit`` per client per round, so
    every client would allocate its memory and workspaces again from the driver (synchronous cudaMalloc calls);
    keeping them lets the next client reuse them. Memory is still released when the process ends, or by
    ``torch.cuda.empty_cache()``.
    """

    def setup(self, trainer: L.Trainer) -> None:
        """What Lightning's does, less emptying the cache."""
        self.set_nvidia_flags(trainer.local_rank)

    def teardown(self) -> None:
        """Keep the cache for the next client."""


class ResidentSingleDeviceStrategy(SingleDeviceStrategy):
    """Lightning's single-device strategy, except that its teardown leaves the module on its device.

    Lightning moves the module (and the optimizer state) back to the CPU after every ``fit``/``test``, so the next
    one copies it to the device again: two transfers per client per round. mmfl's client modules hold only their
    small trainable parts (the frozen backbone is shared and stays on the device anyway), so they stay where the
    strategy put them; :meth:`ClientModule.trainable_state_dict` still hands out CPU copies.
    """

    def teardown(self) -> None:
        """Lightning's teardown, less the moves to the CPU."""
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def _placement(name: str) -> tuple[str | L.pytorch.accelerators.Accelerator, str | L.pytorch.strategies.Strategy]:
    """The accelerator and strategy to give a Trainer for ``training.accelerator`` ``name``.

    ``auto``/``gpu``/``cuda`` with CUDA present: the cache-keeping CUDA accelerator on ``cuda:0`` with the resident
    strategy; ``cpu``: the CPU with the resident strategy; anything else (``auto`` without CUDA, which Lightning
    may resolve to a TPU or MPS; ``mps``; ``tpu``; ...) is passed through to Lightning as written.
    """
    if name in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return KeepCacheCUDAAccelerator(), ResidentSingleDeviceStrategy(device="cuda:0")
    if name == "cpu":
        return "cpu", ResidentSingleDeviceStrategy(device="cpu")
    return name, "auto"


def make_trainer(
    max_epochs: int = 1, max_steps: int = -1, accelerator: str = "auto", precision: str = "32-true"
) -> L.Trainer:
    """A quiet single-device Trainer (no logger, checkpoints, progress bar or sanity steps) that leaves the module
    and, on CUDA, PyTorch's memory cache in place when it ends (see :func:`_placement`)."""
    _skip_empty_callback_scan()
    acc, strategy = _placement(accelerator)
    return L.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator=acc,
        strategy=strategy,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
