"""One round of a federation, robust to faulty clients: sample, fit each client (leaving out the ones that raise,
time out or reply invalid tensors, retrying them), then clip, merge per scope group, and add DP noise."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

from mmfl.federated.aggregate import Update, update_norms
from mmfl.federated.faults import ClientTimeout, InvalidUpdate, RoundFailed, validate_update
from mmfl.federated.pseudo_labels import NoPseudoLabels
from mmfl.federated.round_merge import RoundMerge

if TYPE_CHECKING:
    from mmfl.federated.pool import Client

log = logging.getLogger("mmfl.federated.simulation")


class Reply(NamedTuple):
    """What a round keeps of a client's reply once its tensors are merged."""

    num_examples: int
    metrics: dict[str, float]
    norm: float  # of its update, before clipping
    nbytes: int  # of the tensors it sent


def _merge_ready(
    stream: RoundMerge, sampled: Sequence[Client], done: int, waiting: dict[str, Update], settled: int = 0
) -> int:
    """Give ``stream`` the waiting replies whose turn has come, in the sampled order, from ``sampled[done]`` on, up to
    the first client that has not replied yet; clients before index ``settled`` that have not replied failed for good
    (no attempt is left for them) and are passed over. Returns the new ``done``."""
    while done < len(sampled):
        cid = sampled[done].data.cid
        if cid in waiting:
            stream.add(waiting.pop(cid))
        elif done >= settled:
            break
        done += 1
    return done


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

        Each reply is merged as soon as every client sampled before it has replied or failed for good (the merge
        takes the replies in the sampled order), so a mean rule holds no reply beyond that (:class:`RoundMerge`): a
        reply waits only while an earlier client has failed and may still be retried.

        Returns:
            The merged tensors.

        Raises:
            RoundFailed: fewer than ``min_clients`` clients succeeded after the retries.
        """
        sampled = [self.clients[i] for i in self.sample(rnd)]
        if not sampled:  # only unlabeled clients were drawn, before training.pseudo_labels.start_round
            log.info("round %d: no sampled client trains yet (unlabeled clients wait); the state is unchanged", rnd)
            return {}
        stream = self.open_merge()
        replies: dict[str, Reply] = {}
        waiting: dict[str, Update] = {}  # replies that wait for an earlier sampled client's
        failed: dict[str, str] = {}
        done = 0  # sampled[:done] are merged or left out for good
        needed = min(self.federation.min_clients, len(sampled))
        for attempt in range(self.federation.retries + 1):
            last = attempt == self.federation.retries  # a client that fails now has failed for good
            for i, c in enumerate(sampled):
                if c.data.cid in replies or (attempt and c.data.cid not in failed):
                    continue
                update, m, why = self.try_client(c, rnd)
                if not attempt:  # retries do not move the bar: it counts the sampled clients once
                    self.progress.client_done()
                if update is None:
                    failed[c.data.cid] = why
                else:
                    norm = update_norms([update], self.global_state)[0]
                    nbytes = sum(v.numel() * v.element_size() for v in update.state.values())
                    replies[c.data.cid] = Reply(update.num_examples, m, norm, nbytes)
                    waiting[c.data.cid] = update
                    failed.pop(c.data.cid, None)
                done = _merge_ready(stream, sampled, done, waiting, settled=i + 1 if last else 0)
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
        for c in sampled:
            if c.data.cid in replies:
                r = replies[c.data.cid]
                self.record_fit(rnd, c, r.metrics, r.num_examples, r.norm)
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
        if len(replies) < needed:
            self.metrics.rows = [r for r in self.metrics.rows if r["round"] != rnd]  # the round did not happen
            reasons = "; ".join(f"{cid}: {why}" for cid, why in failed.items())
            raise RoundFailed(
                f"round {rnd}: only {len(replies)} of {len(sampled)} sampled clients succeeded, fewer than "
                f"min_clients={needed} (after {self.federation.retries} retries); {reasons}. The run stops; the last "
                f"complete round is {rnd - 1} (resume with --resume once the clients are mended)"
            )
        _merge_ready(stream, sampled, done, waiting, settled=len(sampled))  # the rest failed for good
        merged = self.close_merge(rnd, stream, len(sampled))
        if self.output_dir is not None:
            self.save_local_states(sampled, rnd)
        return merged

    def _record_traffic(self, rnd: int, sampled: Sequence[Client], replies: dict[str, Reply]) -> None:
        """One ``traffic`` row per (task, modality) that replied: how many clients sent, and the bytes of the tensors
        they sent (as held: fp32 unless a part keeps another dtype)."""
        sent: dict[tuple[str, str], list[int]] = {}
        for c in sampled:
            if c.data.cid in replies:
                row = sent.setdefault((c.task.name, c.task.modality), [0, 0])
                row[0] += 1
                row[1] += replies[c.data.cid].nbytes
        for (task, modality), (clients, nbytes) in sent.items():
            self.metrics.add(rnd, "traffic", task, modality, "", "sent", math.nan, math.nan, clients, value=nbytes)

    def open_merge(self) -> RoundMerge:
        """A merge for this round's replies: the recipe's rule and mixing, clipping each reply to ``clip_norm`` (or
        DP's) against the global state before the round."""
        dp = self.federation.dp
        clip = dp.clip_norm if dp is not None else self.federation.clip_norm
        return RoundMerge(self.federation.aggregator, self.global_state, self.mixing, clip)

    def merge(self, rnd: int, updates: Sequence[Update], sampled: int) -> dict[str, Tensor]:
        """Merge ``updates`` (in client order) as :meth:`close_merge` does, given all at once (the Flower engine)."""
        stream = self.open_merge()
        for u in updates:
            stream.add(u)
        return self.close_merge(rnd, stream, sampled)

    def close_merge(self, rnd: int, stream: RoundMerge, sampled: int) -> dict[str, Tensor]:
        """Finish the round's merge (each key over its scope group, clipped), add DP noise and record ε, mix the keys
        of mixed scopes, take the server optimizer's step; update the global state. ``sampled``: how many clients
        were sampled this round (the DP accountant's sample size)."""
        release = None
        if self.federation.dp is not None:
            release = functools.partial(self.private, rnd, sampled=sampled, replied=stream.replies)
        merged = stream.result(release, self.share_chooser(rnd) if self.chooses_shares else None)
        self.global_state.update(merged)
        if self.federation.virtual_features is not None:  # the server's virtual clients (.virtual_features)
            merged.update(self.virtual_round(rnd))
        return merged

    @property
    def chooses_shares(self) -> bool:
        """Whether a mix of the recipe chooses its shares on validation data (``own=val``)."""
        return any(rule.kind == "val" for rule in self.mixing.values())

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
