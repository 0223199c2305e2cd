"""Client-level DP: accounting against dp-accounting and the analytic Gaussian mechanism, noise of the stated
size, clipping in a real simulation, and settings that would void the guarantee refused."""

from __future__ import annotations

import functools
import itertools
import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from scipy.stats import norm

from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.federated import DifferentialPrivacy, FedAvg, Federation, LocalTraining, Median, Simulation
from mmfl.prompts import CoOp


def test_epsilon_matches_the_library_for_a_known_setting() -> None:
    dp = DifferentialPrivacy(noise_multiplier=1.0, clip_norm=0.1, delta=1e-5)
    # 10 of 100 clients per round, 5 rounds; replace-one neighbours → the accountant sees σ/2
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.5)), 5
        )
    )
    assert dp.epsilon(5, 100, 10) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    eps = [dp.epsilon(t, 100, 10) for t in range(0, 6)]
    assert eps[0] == 0 and all(a < b for a, b in itertools.pairwise(eps))
    assert dp.epsilon(5, 100, 100) > eps[5]  # sampling amplifies privacy


def test_full_participation_epsilon_agrees_with_the_analytic_gaussian_mechanism() -> None:
    """T rounds of the Gaussian mechanism with std σ·C on a sum of replace-one sensitivity 2C compose into one
    Gaussian mechanism with noise multiplier s = (σ/2)/√T, whose exact δ(ε) is
    Φ(1/(2s) − εs) − e^ε Φ(−1/(2s) − εs) (Balle & Wang, 2018). The PLD accountant's ε must satisfy it."""
    sigma, rounds, delta = 2.0, 4, 1e-5
    eps = DifferentialPrivacy(noise_multiplier=sigma, delta=delta, accountant="pld").epsilon(rounds, 10, 10)
    s = (sigma / 2) / math.sqrt(rounds)
    exact = norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s)
    assert 0.5 * delta < exact <= delta * 1.001  # PLD is tight (pessimistic only by its discretisation)
    rdp = DifferentialPrivacy(noise_multiplier=sigma, delta=delta).epsilon(rounds, 10, 10)
    assert rdp >= eps * 0.999  # RDP's conversion is looser, never tighter


def test_noise_has_the_stated_std_and_is_reproducible() -> None:
    dp = DifferentialPrivacy(noise_multiplier=0.8, clip_norm=0.5)
    merged = {"task/a/p": torch.zeros(200_000), "global/q": torch.zeros(200_000)}
    out = dp.noise(merged, {"task/a/p": 4, "global/q": 10}, seed=0, rnd=1)
    assert out["task/a/p"].std().item() == pytest.approx(0.8 * 0.5 / 4, rel=0.01)
    assert out["global/q"].std().item() == pytest.approx(0.8 * 0.5 / 10, rel=0.01)
    again = dp.noise(merged, {"task/a/p": 4, "global/q": 10}, seed=0, rnd=1)
    assert torch.equal(out["task/a/p"], again["task/a/p"])
    other = dp.noise(merged, {"task/a/p": 4, "global/q": 10}, seed=0, rnd=2)
    assert not torch.equal(out["task/a/p"], other["task/a/p"])


def test_dp_in_a_real_simulation_clips_and_reports_epsilon(tiny_backbone) -> None:
    tasks = [prepare_task(Task("digits", SklearnDigits(), clients=4, shots=3, max_test_examples=20))]
    dp = DifferentialPrivacy(noise_multiplier=1e-9, clip_norm=1e-3, delta=1e-6)  # noise negligible here
    fed = Federation(rounds=2, fraction=0.5, aggregator=FedAvg(weighted=False), dp=dp)
    training = LocalTraining(max_steps=2, batch_size=8, accelerator="cpu", optimizer=lambda p: torch.optim.SGD(p, lr=1))
    sim = Simulation(tiny_backbone, tasks, [functools.partial(CoOp, n_ctx=2)], training, fed)
    before = sim.global_state["task/digits/coop.ctx"].clone()
    sim.run_round(1)
    moved = (sim.global_state["task/digits/coop.ctx"] - before).norm().item()
    assert 0 < moved <= 1e-3 * (1 + 1e-4)  # the mean of updates clipped to 1e-3 moves at most that far
    sim.run_round(2)
    rows = [r for r in sim.metrics.rows if r["split"] == "privacy"]
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["value"] for r in rows] == [dp.epsilon(1, 4, 2), dp.epsilon(2, 4, 2)]
    assert rows[0]["note"] == "epsilon at delta=1e-06"


@pytest.mark.parametrize(
    "fed, message",
    [
        (dict(aggregator=FedAvg()), "unweighted mean"),
        (dict(aggregator=Median()), "unweighted mean"),
        (dict(aggregator=FedAvg(weighted=False), clip_norm=1.0), "give the clip norm once"),
        (dict(aggregator=FedAvg(weighted=False), dp_args={"delta": 2.0}), "delta must be in"),
        (dict(aggregator=FedAvg(weighted=False), dp_args={"noise_multiplier": 0}), "noise_multiplier must be > 0"),
        (dict(aggregator=FedAvg(weighted=False), fraction=0.5, dp_args={"accountant": "pld"}), "use accountant: rdp"),
    ],
)
def test_settings_that_would_void_the_guarantee_are_refused(fed: dict, message: str) -> None:
    dp = DifferentialPrivacy(**fed.pop("dp_args", {}))
    with pytest.raises(ValueError, match=message):
        Federation(dp=dp, **fed).check()
