"""Quiet third-party output: notices that are expected where mmfl triggers them and read like errors to a user.

A normal run shows mmfl's own log lines only; ``mmfl -v`` (mmfl's logger at DEBUG) shows everything.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def verbose() -> bool:
    """Whether the user asked for everything (``mmfl -v``: mmfl's logger at DEBUG)."""
    return logging.getLogger("mmfl").isEnabledFor(logging.DEBUG)


@contextmanager
def drop_root_messages(*fragments: str) -> Iterator[None]:
    """Within the block, the root logger (where open_clip logs) drops records containing any of ``fragments``
    (nothing is dropped with :func:`verbose`)."""
    drop = _DropMessages(() if verbose() else fragments)
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@contextmanager
def quiet_third_party(*root_messages: str) -> Iterator[None]:
    """Within the block: transformers logs errors only and shows no progress bars, and the root logger (where
    open_clip logs) drops records containing any of ``root_messages``. Everything is restored afterwards; with
    :func:`verbose`, nothing is hidden."""
    if verbose():
        yield
        return
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with drop_root_messages(*root_messages):
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """mmfl's own progress at INFO, other libraries (open_clip logs on the root logger) at WARNING; ``verbose``:
    mmfl at DEBUG, the others at INFO, nothing hidden (:func:`quiet_third_party`); ``quiet``: warnings and errors
    only."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("mmfl").setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    import datasets

    datasets.disable_progress_bars()
    # the Hub client's per-retry warnings (5 of them, twice each, when offline): mmfl reports the failure once
    logging.getLogger("huggingface_hub.utils._http").setLevel(logging.NOTSET if verbose else logging.ERROR)
    # Lightning's "Received SIGTERM" notice: mmfl says what was interrupted and how to continue (mmfl.interrupt)
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(
        logging.NOTSET if verbose else logging.WARNING
    )
    if verbose:
        datasets.logging.set_verbosity_info()
    else:
        datasets.logging.set_verbosity_warning()
