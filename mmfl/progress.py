"""Progress of a run: a live display of the rounds and of the current round's clients (Rich, as Lightning's
``RichProgressBar``), with elapsed time and ETA, on a terminal; nothing extra elsewhere (the per-round log lines,
which carry the ETA too, are the plain fallback)."""

from __future__ import annotations

import logging
import sys
from typing import IO


class NoProgress:
    """The progress interface a :class:`~mmfl.federated.simulation.Simulation` calls; shows nothing."""

    def start(self, done_rounds: int, rounds: int) -> None:
        """The run starts (``done_rounds`` already complete: a resumed run)."""

    def round_start(self, rnd: int, clients: int) -> None:
        """Round ``rnd`` starts with ``clients`` sampled clients (round 0: the zero-shot evaluation)."""

    def client_done(self) -> None:
        """One sampled client finished (or was left out)."""

    def round_end(self, rnd: int) -> None:
        """Round ``rnd`` is complete (merged, evaluated, checkpointed)."""

    def stop(self) -> None:
        """The run ended (or stopped); release the terminal."""


class RichProgress(NoProgress):
    """Two bars on the terminal of ``stream`` (stderr by default): the rounds, and the clients of the current
    round. While it shows, log lines written to that stream appear above the bars."""

    def __init__(self, stream: IO[str] | None = None, label: str = "") -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._stream = stream or sys.stderr
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=self._stream),
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._rounds = self.bars.add_task(f"{label} rounds".strip(), total=1, visible=False)
        self._clients = self.bars.add_task("clients", total=1, visible=False)
        self._handlers: list[tuple[logging.StreamHandler, IO[str]]] = []

    def start(self, done_rounds: int, rounds: int) -> None:
        self.bars.update(self._rounds, total=rounds, completed=done_rounds, visible=True)
        self.bars.start()
        # log lines go through the display's console, so they print above the bars instead of through them
        proxy = _ConsoleWriter(self.bars.console)
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and h.stream is self._stream:
                self._handlers.append((h, h.setStream(proxy)))  # type: ignore[arg-type]

    def round_start(self, rnd: int, clients: int) -> None:
        what = "round 0: zero-shot evaluation" if rnd == 0 else f"round {rnd}: clients"
        self.bars.reset(self._clients, total=max(clients, 1), description=what, visible=True)

    def client_done(self) -> None:
        self.bars.advance(self._clients)

    def round_end(self, rnd: int) -> None:
        self.bars.update(self._clients, completed=self.bars.tasks[self._clients].total)
        if rnd > 0:
            self.bars.advance(self._rounds)

    def stop(self) -> None:
        for h, old in self._handlers:
            h.setStream(old)
        self._handlers.clear()
        self.bars.stop()


class _ConsoleWriter:
    """A text stream that prints whole lines through a Rich console (above its live display)."""

    def __init__(self, console) -> None:
        self.console = console

    def write(self, text: str) -> int:
        self.console.out(text.rstrip("\n"), highlight=False)
        return len(text)

    def flush(self) -> None:
        """Nothing buffered."""


def progress_for(stream: IO[str] | None = None, quiet: bool = False, label: str = "") -> NoProgress:
    """A live display when ``stream`` (stderr) is a terminal and not ``quiet``; else the silent one. ``label``
    names the run on the rounds bar (``mmfl evaluate``: the seed and method)."""
    stream = stream or sys.stderr
    if quiet or not stream.isatty():
        return NoProgress()
    return RichProgress(stream, label)
