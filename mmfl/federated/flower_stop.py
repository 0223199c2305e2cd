"""Stopping mmfl's Flower apps the way ``mmfl fit`` stops: one line that says what was interrupted and how to go on.

Flower runs a ServerApp or ClientApp inside a process it manages (``flwr-serverapp``, ``flwr-clientapp``,
``flwr-simulation``) and installs its own handlers there: SIGTERM, SIGINT (also what ``flwr stop`` sends the app's
process) and SIGQUIT end it through ``flwr_exit``, which runs the registered exit handlers (reporting the run as
stopped to the SuperLink, flushing its logs) and exits. mmfl keeps that machinery and adds to it, while an app's code
runs inside :func:`stop_line`:

- an exit handler, run before Flower's own (so the line still reaches ``flwr log`` and ``flwr run --stream``), logs
  the app's line: for the ServerApp the last complete round and ``--run-config resume=true``; for a ClientApp the
  round it was training and the round its local tensors are kept from;
- where the app runs in the process's main thread (Flower's deployment processes), the first signal is recorded so
  the line names it, and the process then exits with the conventional status, 128 + the signal (143 for SIGTERM,
  130 for SIGINT) instead of Flower's 0. In ``flwr-simulation`` the ServerApp runs in a thread of its own: the line
  says "stopped" without the signal and the exit status stays Flower's.

Nothing is half-written by a stop: the checkpoint and a node's local tensors are written atomically, so the last
complete round's files stay what ``resume=true`` continues from.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from flwr.supercore.exit import add_exit_handler

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
Describe = Callable[[str], str]  # the stop's cause ("SIGTERM", or "a signal or `flwr stop`") → the line to log

_running: list[Describe] = []  # the lines of the app code now running (innermost last)
_cause: list[str] = []  # the signal that stopped it, when it was seen in the main thread
_registered: list[bool] = []


def _on_exit() -> None:
    """Flower's exit handler: log the running app's line (nothing when no app code is running, e.g. a normal end)."""
    if _running:
        log.warning("%s", _running[-1](_cause[0] if _cause else "a signal or `flwr stop`"))


def _wrap(previous: object) -> Callable[[int, FrameType | None], None]:
    """A handler that records the signal, lets ``previous`` (Flower's) stop the process, and makes the exit status
    128 + the signal."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if _cause:  # a second signal while stopping: at once
            os.write(2, f"\n{signal.Signals(signum).name} again: stopping at once\n".encode())
            os._exit(128 + signum)
        _cause.append(signal.Signals(signum).name)
        if previous is signal.SIG_IGN:
            return
        if callable(previous):
            try:
                previous(signum, frame)  # Flower's: the exit handlers (ours first), then sys.exit
            except SystemExit:
                raise SystemExit(128 + signum) from None
            return
        _on_exit()  # no Flower handler (the app called outside a Flower process)
        raise SystemExit(128 + signum)

    return handler


@contextmanager
def stop_line(describe: Describe) -> Iterator[None]:
    """Within the block, a stop of the Flower process logs ``describe(cause)`` and, in the main thread, exits with
    128 + the signal.

    Args:
        describe: builds the one line from the stop's cause (a signal's name, or "a signal or `flwr stop`").
    """
    if not _registered:
        add_exit_handler(_on_exit, run_before_force_exit=True)  # Flower's own exit handlers run after it
        _registered.append(True)
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in SIGNALS} if main else {}
    wrappers = {s: _wrap(h) for s, h in previous.items()}
    for s, h in wrappers.items():
        signal.signal(s, h)
    _running.append(describe)
    try:
        yield
    finally:
        _running.remove(describe)
        for s, h in previous.items():
            if signal.getsignal(s) is wrappers[s]:  # (Flower resets the handlers itself once it is stopping)
                signal.signal(s, h if h is not None else signal.SIG_DFL)
        if not _running:
            _cause.clear()
