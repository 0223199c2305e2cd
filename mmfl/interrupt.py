"""Stopping on SIGTERM and SIGINT the way schedulers and people expect: one clean stop, then at once.

A scheduler (SLURM, Kubernetes, systemd) sends SIGTERM to stop a job; a person presses Ctrl-C (SIGINT). Within
:func:`stop_on_signals`, the first of either raises :class:`Interrupted` in the main thread wherever it is (data
preparation, a client's training inside Lightning, the merge, an evaluation). It is a ``BaseException``, so the
engine's guards against faulty clients (``except Exception``) let it through and the round in progress is not
committed: the last complete round's checkpoint, written atomically, stays what ``--resume`` continues from. The
command line prints one line and exits with the conventional status, 128 + the signal (130 for SIGINT, 143 for
SIGTERM). A second signal stops the process at once, with the same status.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A run stopped by SIGTERM or SIGINT.

    Attributes:
        signum: the signal.
        status: the exit status to report, 128 + the signal.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.status = 128 + signum
        self.run: str | None = None  # the run folder, when the command knows one that can be resumed
        self.completed: int | None = None  # its last complete round
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


_received: list[int] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    """The first signal raises :class:`Interrupted`; a later one ends the process at once. (Lightning re-installs
    the handlers it found when a fit ends, so the state lives here, not in which function is installed.)"""
    if _received:
        os.write(2, f"\n{signal.Signals(signum).name} again: stopping at once\n".encode())
        os._exit(128 + signum)
    _received.append(signum)
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block (in the main thread), SIGTERM and SIGINT raise :class:`Interrupted`; afterwards the
    previous handlers are back. Outside the main thread it does nothing (Python delivers signals there only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _received.clear()
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _received.clear()


def interrupted_message(command: str, e: Interrupted, run: str | None, completed: int | None) -> str:
    """The one line a user sees: what was interrupted and how to continue."""
    what = f"mmfl {command}: {e}"
    if command != "fit" or run is None:
        return f"{what}; nothing of it is complete: run the command again"
    done = "no round is complete yet" if completed is None else f"the last complete round is {completed}"
    return f"{what}; {done}: continue with `mmfl fit --resume {run}`"


def flush_streams() -> None:
    """Flush stdout and stderr (best effort) before the process exits."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):
            stream.flush()
