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
