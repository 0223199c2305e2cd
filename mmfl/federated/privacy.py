"""Client-level differential privacy (DP-FedAvg, McMahan et al., 2018): clip each client's update, add Gaussian
noise to each merged tensor at the server, and account for the privacy spent with Google's ``dp-accounting``.

What is protected: the participation and data of any one client (a replaced client changes the released
tensors by a bounded amount). The server itself sees each client's clipped update in the clear (central DP:
the server is trusted); see the "What is protected" table of docs/reliability.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from mmfl.federated.aggregate import Aggregator, FedAvg, FedAvgM


@dataclass
class DifferentialPrivacy:
    """Client-level DP settings (recipe section ``federation.dp``).

    Each sampled client's update (its tensors minus the round's global ones, over all its keys) is clipped to
    L2 norm ``clip_norm``; each key's unweighted mean over the ``n`` clients of its scope group that replied
    gets Gaussian noise of standard deviation ``noise_multiplier · clip_norm / n``, so the noise on the group's
    *sum* is ``noise_multiplier · clip_norm`` whatever the group size.

    Accounting: fixed-size sampling of ``k`` of ``N`` clients without replacement per round, neighbouring
    federations differ by one replaced client (so the clipped sum moves by at most ``2 · clip_norm``, which the
    accountant is told); Rényi-DP accountant (``accountant: rdp``) or privacy-loss distributions (``pld``:
    tighter, full participation only) of dp-accounting; ε is reported for ``delta`` after every round.

    Args:
        noise_multiplier: noise standard deviation on each group's sum, in units of ``clip_norm``.
        clip_norm: the L2 bound on each client's update.
        delta: the δ for which ε is reported.
        accountant: ``rdp`` or ``pld``.
    """

    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"

    def check(self, aggregator: Aggregator, fraction: float = 1.0) -> None:
        """Raise a clear error for settings that would not give the stated guarantee (``fraction``: the share of
        clients sampled per round)."""
        if not self.noise_multiplier > 0:
            raise ValueError(f"federation.dp.noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not self.clip_norm > 0:
            raise ValueError(f"federation.dp.clip_norm must be > 0, got {self.clip_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"federation.dp.delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ("rdp", "pld"):
            raise ValueError(f"federation.dp.accountant must be 'rdp' or 'pld', got {self.accountant!r}")
        if self.accountant == "pld" and fraction < 1:
            raise ValueError(
                "federation.dp.accountant 'pld' cannot account for client sampling without replacement "
                f"(federation.fraction {fraction}); use accountant: rdp, or fraction: 1"
            )
        base = aggregator.base if isinstance(aggregator, FedAvgM) else aggregator
        if not isinstance(base, FedAvg) or base.weighted:
            raise ValueError(
                "federation.dp needs the unweighted mean as the merge rule (example counts would change the "
                "sensitivity): set federation.aggregator to mmfl.federated.FedAvg with init_args {weighted: false} "
                "(optionally inside FedAvgM as its base)"
            )

    def noise(self, merged: Mapping[str, Tensor], counts: Mapping[str, int], seed: int, rnd: int) -> dict[str, Tensor]:
        """``merged`` with Gaussian noise of std ``noise_multiplier · clip_norm / counts[key]`` on each key.

        The noise of each key comes from its own generator seeded by (seed, round, key), so a resumed run draws
        the same noise as an uninterrupted one.
        """
        from mmfl.federated.settings import derived_seed  # settings imports this module

        out = {}
        for key, value in merged.items():
            g = torch.Generator().manual_seed(derived_seed(seed, rnd, "dp", key))
            std = self.noise_multiplier * self.clip_norm / counts[key]
            z = torch.randn(value.shape, generator=g, dtype=torch.float64)
            out[key] = (value.to(torch.float64) + std * z).to(value.dtype)
        return out

    def epsilon(self, rounds: int, population: int, sample_size: int) -> float:
        """ε after ``rounds`` rounds that each sample ``sample_size`` of ``population`` clients, for ``delta``."""
        import dp_accounting
        from dp_accounting.pld import PLDAccountant
        from dp_accounting.rdp import RdpAccountant

        if rounds == 0:
            return 0.0
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
        # Replace-one moves the clipped sum by up to 2 · clip_norm. dp-accounting's PLD accountant applies that
        # factor itself under REPLACE_ONE; its RDP accountant takes the noise multiplier relative to the
        # sensitivity as given, so it is handed noise_multiplier / 2.
        one = dp_accounting.GaussianDpEvent(self.noise_multiplier / (2 if self.accountant == "rdp" else 1))
        if sample_size < population:
            one = dp_accounting.SampledWithoutReplacementDpEvent(population, sample_size, one)
        event = dp_accounting.SelfComposedDpEvent(one, rounds)
        acc = RdpAccountant(neighboring_relation=relation) if self.accountant == "rdp" else PLDAccountant(relation)
        if not acc.supports(event):
            raise ValueError(
                f"the {self.accountant} accountant cannot account for {sample_size} of {population} clients sampled "
                "without replacement; use accountant: rdp (or federation.fraction: 1)"
            )
        acc.compose(event)
        return float(acc.get_epsilon(self.delta))
