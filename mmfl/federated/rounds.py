"""One round of a federation, robust to faulty clients: sample, fit each client (leaving out the ones that raise,
time out or reply invalid tensors, retrying them), then clip, merge per scope group, and add DP noise."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from mmfl.federated.aggregate import Update, aggregate, clip_updates, update_norms
from mmfl.federated.faults import ClientTimeout, InvalidUpdate, RoundFailed, validate_update
from mmfl.federated.pseudo_labels import NoPseudoLabels

if TYPE_CHECKING:
    from mmfl.federated.pool import Client

log = logging.getLogger("mmfl.federated.simulation")


class Rounds:
    """The round logic of :class:`~mmfl.federated.simulation.Simulation` (a mixin: it uses the simulation's
    clients, federation settings, global state and metrics)."""

    def try_client(self, client: Client, rnd: int) -> tuple[Update | None, dict[str, float], str]:
        """Fit one client and check its reply. Returns (update, metrics, "") or (None, {}, why it failed).

        A client that raises, runs past ``client_timeout`` or returns an invalid reply (NaN/Inf, missing or extra
        keys, wrong shapes or dtypes) gets its local tensors back as they were before the round.
        """
        before = self.local_state(client)
        t0 = time.monotonic()
        try:
            update, m = self.fit_client(client, rnd)
            limit = self.federation.client_timeout
            if limit is not None and time.monotonic() - t0 > limit:
                raise ClientTimeout(f"the reply came after {time.monotonic() - t0:.1f} s (client_timeout {limit:g} s)")
            problem = validate_update(update, self.specs[client.data.cid])
            if problem:
                raise InvalidUpdate(problem)
        except Exception as e:  # a faulty client must not stop the federation
            client.set_local(before)
            why = f"{type(e).__name__}: {e}"
            log.log(
                logging.INFO if isinstance(e, NoPseudoLabels) else logging.WARNING,  # expected while the model is weak
                "round %d: client %s left out: %s",
                rnd,
                client.data.cid,
                why,
                exc_info=not isinstance(e, InvalidUpdate | ClientTimeout | NoPseudoLabels),
            )
            return None, {}, why
        return update, m, ""

    def run_round(self, rnd: int) -> dict[str, Tensor]:
        """One round: sample, fit (leaving faulty clients out, retrying them up to ``retries`` times), merge.

        Returns:
            The merged tensors.

        Raises:
            RoundFailed: fewer than ``min_clients`` clients succeeded after the retries.
        """
        sampled = [self.clients[i] for i in self.sample(rnd)]
        if not sampled:  # only unlabeled clients were drawn, before training.pseudo_labels.start_round
            log.info("round %d: no sampled client trains yet (unlabeled clients wait); the state is unchanged", rnd)
            return {}
        replies: dict[str, tuple[Update, dict[str, float]]] = {}
        failed: dict[str, str] = {}
        needed = min(self.federation.min_clients, len(sampled))
        for attempt in range(self.federation.retries + 1):
            for c in sampled:
                if c.data.cid in replies or (attempt and c.data.cid not in failed):
                    continue
                update, m, why = self.try_client(c, rnd)
                if not attempt:  # retries do not move the bar: it counts the sampled clients once
                    self.progress.client_done()
                if update is None:
                    failed[c.data.cid] = why
                else:
                    replies[c.data.cid] = (update, m)
                    failed.pop(c.data.cid, None)
            if len(replies) >= needed:
                break
            if attempt < self.federation.retries:
                log.warning(
                    "round %d: %d of %d clients succeeded (min_clients %d); retrying the failed ones",
                    rnd,
                    len(replies),
                    len(sampled),
                    needed,
                )
        updates = [replies[c.data.cid][0] for c in sampled if c.data.cid in replies]
        norms = dict(zip([u.cid for u in updates], update_norms(updates, self.global_state), strict=True))
        for c in sampled:
            if c.data.cid in replies:
                update, m = replies[c.data.cid]
                self.record_fit(rnd, c, m, update.num_examples, norms[c.data.cid])
            else:
                self.metrics.add(
                    rnd,
                    "client",
                    c.task.name,
                    c.task.modality,
                    c.data.cid,
                    "fit_failed",
                    math.nan,
                    math.nan,
                    0,
                    note=failed[c.data.cid],
                )
        self._record_traffic(rnd, sampled, replies)
        if len(updates) < needed:
            self.metrics.rows = [r for r in self.metrics.rows if r["round"] != rnd]  # the round did not happen
            reasons = "; ".join(f"{cid}: {why}" for cid, why in failed.items())
            raise RoundFailed(
                f"round {rnd}: only {len(updates)} of {len(sampled)} sampled clients succeeded, fewer than "
                f"min_clients={needed} (after {self.federation.retries} retries); {reasons}. The run stops; the last "
                f"complete round is {rnd - 1} (resume with --resume once the clients are mended)"
            )
        merged = self.merge(rnd, updates, len(sampled))
        if self.output_dir is not None:
            self.save_local_states(sampled, rnd)
        return merged

    def _record_traffic(self, rnd: int, sampled: Sequence[Client], replies: dict[str, tuple[Update, dict]]) -> None:
        """One ``traffic`` row per (task, modality) that replied: how many clients sent, and the bytes of the tensors
        they sent (as held: fp32 unless a part keeps another dtype)."""
        sent: dict[tuple[str, str], list[int]] = {}
        for c in sampled:
            if c.data.cid in replies:
                n = sum(v.numel() * v.element_size() for v in replies[c.data.cid][0].state.values())
                row = sent.setdefault((c.task.name, c.task.modality), [0, 0])
                row[0] += 1
                row[1] += n
        for (task, modality), (clients, nbytes) in sent.items():
            self.metrics.add(rnd, "traffic", task, modality, "", "sent", math.nan, math.nan, clients, value=nbytes)

    def merge(self, rnd: int, updates: Sequence[Update], sampled: int) -> dict[str, Tensor]:
        """Clip (``clip_norm`` or DP), merge each key over its scope group, add DP noise and record ε, mix the keys
        of mixed scopes, take the server optimizer's step; update the global state. ``sampled``: how many clients
        were sampled this round (the DP accountant's sample size)."""
        dp = self.federation.dp
        clip = dp.clip_norm if dp is not None else self.federation.clip_norm
        if clip is not None:
            updates = clip_updates(updates, self.global_state, clip)
        release = None
        if dp is not None:
            release = functools.partial(self.private, rnd, sampled=sampled, replied=len(updates))
        merged = aggregate(updates, self.federation.aggregator, self.global_state, self.mixing, release)
        self.global_state.update(merged)
        return merged

    def private(
        self, rnd: int, merged: dict[str, Tensor], counts: dict[str, int], sampled: int, replied: int
    ) -> dict[str, Tensor]:
        """Add the DP noise of ``federation.dp`` to the merges ``merged`` (``counts``: the clients merged per key;
        before mixing and the server optimizer's step, which are then post-processing), record ε for the
        ``sampled`` clients of the round in a ``privacy`` row, and return the noised tensors."""
        dp = self.federation.dp
        noised = dp.noise(merged, counts, self.seed, rnd)
        eps = dp.epsilon(rnd, len(self.clients), sampled)
        note = f"epsilon at delta={dp.delta:g}"
        self.metrics.add(rnd, "server", "", "", "", "privacy", math.nan, math.nan, replied, value=eps, note=note)
        log.info("round %d: client-level DP, ε = %.3f at δ = %g", rnd, eps, dp.delta)
        return noised
