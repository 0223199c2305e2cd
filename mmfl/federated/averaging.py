"""``evaluation.selection: average``: the state a run is scored with is the mean of its last rounds' states.

A few-shot client's prompt swings from round to round (a 2-shot client's accuracy by 20–30 points in
``benchmarks.collaboration``'s scarce-modality scenario); the mean of the states the last rounds ended with is
steadier, as averaging the prompts over training is in PromptSRC and averaging the iterates is in SWA. The server
keeps running sums — of the merged tensors and of every client's ``local`` tensors after each round of the
window (the last ``average_rounds`` rounds) — and at the end the evaluated state is each sum over the window's
length. The sums are float64 (the same result whatever the order of rounds) and are kept in the round checkpoint,
so a resumed run ends with the same average. Training never sees the average: each round starts from the last
round's merged tensors as before.

With ``selection: best_val`` and ``average_rounds``, the average is one more candidate of the validation choice:
after the last round it replaces the best round's state when its mean validation accuracy over tasks is higher
(``best.safetensors`` then says ``average_of_rounds``), so a run keeps the average only where validation data
say it helps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmfl.federated.checkpoint import save_state

AVERAGE = "average.safetensors"
"""The averaged merged tensors, written when the last round ends (the clients' averaged local tensors:
``local_average/<task>/<modality>/<i>.safetensors``)."""


def window_start(rounds: int, average_rounds: int | None) -> int:
    """The first round of the averaging window: the last ``average_rounds`` rounds (None: the last half of them,
    rounded up; more than ``rounds``: all of them, so a recipe's window survives ``--federation.rounds=1``).

    Raises:
        ValueError: ``average_rounds`` is below 1.
    """
    k = math.ceil(rounds / 2) if average_rounds is None else average_rounds
    if k < 1:
        raise ValueError(
            f"evaluation.average_rounds must be >= 1, got {average_rounds}; it is how many of the last rounds' "
            "states are averaged (leave it unset for the last half)"
        )
    return max(1, rounds - k + 1)


def add_to(sums: dict[str, Tensor], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sums + state``, key by key, in float64 (``sums`` empty: ``state`` itself, as float64)."""
    if not sums:
        return {k: v.detach().to("cpu", torch.float64, copy=True) for k, v in state.items()}
    return {k: sums[k] + v.detach().to("cpu", torch.float64) for k, v in state.items()}


def mean_of(sums: dict[str, Tensor], count: int, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sums / count`` in the dtype of ``like``'s tensor of the same key."""
    return {k: (v / count).to(like[k].dtype) for k, v in sums.items()}


class RoundAverage:
    """The round average of :class:`~mmfl.federated.simulation.Simulation` (a mixin: it uses the simulation's
    ``selection``, rounds, global state and clients). Its state: ``avg_count`` rounds summed, ``avg_global`` (key →
    float64 sum) and ``avg_local`` (client id → key → float64 sum)."""

    def init_average(self, selection: str, average_rounds: int | None) -> None:
        """Check the window against the rounds (before any work) and start with empty sums. The run averages with
        ``selection="average"``, and with ``"best_val"`` when ``average_rounds`` is given (the average is then one
        more candidate of the validation choice)."""
        self.average_rounds = average_rounds
        self.averaging = selection == "average" or (selection == "best_val" and average_rounds is not None)
        self.avg_first = window_start(self.federation.rounds, average_rounds) if self.averaging else 0
        self.best_average: str | None = None
        """With ``best_val``: the averaged rounds (e.g. ``"3–4"``) when the best state is their average, else None."""
        self.avg_count = 0
        self.avg_global: dict[str, Tensor] = {}
        self.avg_local: dict[str, dict[str, Tensor]] = {}
        self.average_local = True
        """Average the clients' local tensors too (False on a Flower ServerApp: the nodes hold them)."""

    def accumulate(self, rnd: int) -> None:
        """Add the state after round ``rnd`` to the sums when the run averages and ``rnd`` is in the window."""
        if not self.averaging or rnd < self.avg_first:
            return
        self.avg_global = add_to(self.avg_global, self.global_state)
        for c in self.clients if self.average_local else []:
            local = c.local_snapshot()
            if local:
                self.avg_local[c.data.cid] = add_to(self.avg_local.get(c.data.cid, {}), local)
        self.avg_count += 1

    def averaged(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """(merged tensors, local tensors per client id), each the mean over the window's rounds so far."""
        if not self.avg_count:
            raise RuntimeError("no round of the averaging window has ended yet")
        glob = mean_of(self.avg_global, self.avg_count, self.global_state)
        local = {}
        for c in self.clients:
            now = c.local_snapshot() if self.average_local else {}
            local[c.data.cid] = mean_of(self.avg_local[c.data.cid], self.avg_count, now) if now else {}
        return glob, local

    def end_average(self, rnd: int) -> dict[str, float]:
        """After round ``rnd``: add its state to the sums; after the last round, score the averaged state on every
        task's test (novel-class, validation) split — rows of level ``average`` — and write :data:`AVERAGE` and the
        averaged local tensors; with ``best_val``, keep the average as the best state when its mean validation
        accuracy over tasks beats the best round's. Returns the test accuracies (empty before the last round or
        without averaging)."""
        self.accumulate(rnd)
        if not self.averaging or rnd != self.federation.rounds:
            return {}
        glob, local = self.averaged()
        accs, vals = self.score_tasks(rnd, "average", glob)
        if self.selection == "best_val" and sum(vals) / len(vals) > self.best_score:
            self.keep_best(rnd, sum(vals) / len(vals), glob, local, average=self.window(numbers=True))
        if self.output_dir is not None:
            meta = {"rounds": f"{self.avg_first}-{rnd}", "backbone": self.backbone.model_name}
            save_state(self.output_dir / AVERAGE, glob, meta)
            for cid, state in local.items():
                if state:
                    save_state(self.output_dir / "local_average" / f"{cid}.safetensors", state, meta)
        return accs

    def window(self, numbers: bool = False) -> str:
        """The averaged rounds, in words (``numbers``: just ``"3–4"``)."""
        last = self.federation.rounds
        if self.avg_first == last:
            return str(last) if numbers else f"round {last}"
        span = f"{self.avg_first}–{last}"
        return span if numbers else f"rounds {span}"
