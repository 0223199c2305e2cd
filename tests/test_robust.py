"""Robust rules, the server optimizer and update clipping against hand-computed results."""

from __future__ import annotations

import math

import pytest
import torch

from mmfl.federated import FedAvg, FedAvgM, Flame, Krum, Median, TrimmedMean, Update, aggregate, clip_updates

W = torch.ones(5, dtype=torch.float64)


def _t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_coordinate_wise_median_odd_and_even() -> None:
    assert torch.equal(Median().merge("k", _t([1, 10], [3, -2], [2, 5]), W[:3]), torch.tensor([2.0, 5.0]).double())
    # even: the mean of the two middle values, per coordinate: sorted 1,2,4,10 → 3
    assert torch.equal(Median().merge("k", _t([1], [4], [2], [10]), W[:4]), torch.tensor([3.0]).double())


def test_trimmed_mean() -> None:
    # K=5, beta=0.2 → cut 1 at each end: (2+3+4)/3 = 3, and (-1+0+1)/3 = 0 in the second coordinate
    out = TrimmedMean(0.2).merge("k", _t([1, 0], [2, -1], [3, 1], [4, -50], [100, 60]), W)
    assert torch.allclose(out, torch.tensor([3.0, 0.0]).double())
    # beta=0.25 with K=4 → cut 1: mean(2, 4) = 3; beta=0 is the mean
    assert torch.equal(TrimmedMean(0.25).merge("k", _t([1], [4], [2], [10]), W[:4]), torch.tensor([3.0]).double())
    assert torch.equal(TrimmedMean(0.0).merge("k", _t([1], [4], [2], [9]), W[:4]), torch.tensor([4.0]).double())
    # never trims everything: K=2 keeps both
    assert torch.equal(TrimmedMean(0.49).merge("k", _t([1], [3]), W[:2]), torch.tensor([2.0]).double())
    with pytest.raises(ValueError, match="beta"):
        TrimmedMean(0.5)


def test_krum_and_multi_krum() -> None:
    x = _t([0], [1], [2], [3], [100])
    # f=1, K=5 → 2 nearest neighbours. Squared distances: 0 → 1+4 = 5; 1 → 1+1 = 2; 2 → 1+1 = 2; 3 → 1+4 = 5;
    # 100 → 97² + 98². Krum picks the lowest score, ties to the earlier client: copy 1.
    k = Krum(f=1)
    assert torch.equal(k.scores(x), torch.tensor([5.0, 2.0, 2.0, 5.0, 97.0**2 + 98.0**2]).double())
    assert k.select(x) == [1]
    assert torch.equal(k.merge("k", x, W), torch.tensor([1.0]).double())
    # multi-Krum m=3: copies 1, 2 (score 2) and 0 (score 5, earlier than 3) → mean 1
    assert Krum(f=1, m=3).select(x) == [0, 1, 2]
    assert torch.equal(Krum(f=1, m=3).merge("k", x, W), torch.tensor([1.0]).double())
    # vectors: the distance is over all coordinates
    v = _t([0, 0], [0, 1], [1, 0], [50, 50], [0, 0.5])
    assert 3 not in Krum(f=1, m=4).select(v)


def test_fedavgm_momentum_by_hand_and_its_state_round_trips() -> None:
    m = FedAvgM(server_lr=1.0, momentum=0.9)
    cur = torch.tensor([1.0]).double()
    # round 1: mean 0 → g = 1, m = 1, new = 1 - 1 = 0
    new = m.merge("k", _t([-1], [1]) * 0, W[:2], cur)
    assert torch.equal(new, torch.tensor([0.0]).double())
    # round 2: mean -1 → g = 1, m = 0.9·1 + 1 = 1.9, new = 0 - 1.9
    state = m.state_dict()
    new2 = m.merge("k", _t([-1], [-1]), W[:2], new)
    assert torch.allclose(new2, torch.tensor([-1.9]).double())
    restored = FedAvgM(server_lr=1.0, momentum=0.9)
    restored.load_state_dict(state)
    assert torch.equal(restored.merge("k", _t([-1], [-1]), W[:2], new), new2)
    # momentum 0, lr 1 is plain FedAvg
    plain = FedAvgM(momentum=0.0).merge("k", _t([1], [3]), torch.tensor([1.0, 3.0]).double(), cur)
    assert torch.equal(plain, FedAvg().merge("k", _t([1], [3]), torch.tensor([1.0, 3.0]).double()))
    with pytest.raises(ValueError, match="keeps no state"):
        FedAvg().load_state_dict({"x": torch.zeros(1)})


def test_clipping_is_over_all_keys_of_a_client() -> None:
    current = {"task/a/p": torch.zeros(1), "global/q": torch.zeros(1)}
    big = Update("c0", {"task/a/p": torch.tensor([3.0]), "global/q": torch.tensor([4.0])}, 1)  # norm 5
    small = Update("c1", {"global/q": torch.tensor([0.5])}, 1)  # norm 0.5: unchanged
    out = clip_updates([big, small], current, max_norm=1.0)
    assert torch.allclose(out[0].state["task/a/p"], torch.tensor([0.6]))
    assert torch.allclose(out[0].state["global/q"], torch.tensor([0.8]))
    assert torch.equal(out[1].state["global/q"], torch.tensor([0.5]))
    # clipping is relative to the current global tensors
    shifted = clip_updates([big], {"task/a/p": torch.tensor([3.0]), "global/q": torch.tensor([2.0])}, 1.0)
    assert torch.allclose(shifted[0].state["global/q"], torch.tensor([3.0]))  # Δ = (0, 2) → (0, 1)


def test_robust_rules_work_within_scope_groups() -> None:
    """An attacker of task a cannot move task b's tensor, and the median of task a ignores it."""
    ups = [Update(f"a{i}", {"task/a/p": torch.tensor([float(i)])}, 1) for i in range(3)]
    ups.append(Update("evil", {"task/a/p": torch.tensor([1e6])}, 1000))
    ups += [Update(f"b{i}", {"task/b/p": torch.tensor([10.0 + i])}, 1) for i in range(2)]
    med = aggregate(ups, Median())
    assert med["task/a/p"].item() == 1.5  # median of 0, 1, 2, 1e6
    assert med["task/b/p"].item() == 10.5
    avg = aggregate(ups, FedAvg())
    assert avg["task/a/p"].item() > 1e5  # FedAvg is moved by the attacker (and its claimed example count)
    assert math.isclose(avg["task/b/p"].item(), 10.5)


def test_flame_drops_the_minority_direction_and_clips_to_the_median_norm() -> None:
    current = _t([1.0, 1.0])[0]
    # updates: three honest along +x (norms 1, 2, 3), two sign-flipped attackers along −x (norm 10)
    deltas = _t([1, 0], [2, 0], [3, 0], [-10, 0], [-10, 0])
    flame = Flame(noise=0.0)
    out = flame.merge("k", current + deltas, W, current)
    assert flame.last_admitted["k"] == [0, 1, 2]  # the minority cluster is left out
    # S = median(1, 2, 3, 10, 10) = 3: no admitted update is above it; mean of 1, 2, 3 = 2
    assert torch.allclose(out, current + _t([2.0, 0.0])[0])
    # one boosted update in the honest direction stays in the cluster but is clipped to S
    deltas = _t([1, 0.1], [2, -0.1], [3, 0], [100, 0], [2, 0.05])
    flame = Flame(noise=0.0)
    out = flame.merge("k", current + deltas, W, current)
    keep = flame.last_admitted["k"]
    assert 3 in keep and len(keep) >= 3  # a majority cluster (HDBSCAN's), holding the boosted update
    norms = deltas.norm(dim=1)
    s = float(norms.median())  # the third largest of five norms: ‖(2, -0.1)‖
    clipped = deltas[keep] * torch.clamp(s / norms[keep], max=1.0)[:, None]
    assert torch.allclose(out, current + clipped.mean(dim=0))
    assert float(out[0] - current[0]) < s + 1e-9  # the boost (×50) is gone


def test_flame_noise_is_its_level_times_the_bound_and_replays_after_a_resume() -> None:
    current = torch.zeros(20000, dtype=torch.float64)
    copies = torch.stack([current + 0.01 * (i + 1) for i in range(3)])  # norms √20000 · (0.01, 0.02, 0.03)
    flame = Flame(noise=0.5, seed=3)
    first = flame.merge("task/a/k", copies, W[:3], current)
    bound = 0.02 * math.sqrt(20000)
    clipped_mean = (0.01 + 0.02 + 0.02) / 3  # S is the median norm: the third update is scaled down to it
    noise = first - clipped_mean
    assert abs(float(noise.std()) - 0.5 * bound) < 0.02 * 0.5 * bound
    state = flame.state_dict()
    assert {k: int(v) for k, v in state.items()} == {"calls/task/a/k": 1}
    second = flame.merge("task/a/k", copies, W[:3], current)
    assert not torch.equal(first, second)  # a new draw each round
    resumed = Flame(noise=0.5, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.merge("task/a/k", copies, W[:3], current), second)
    with pytest.raises(ValueError, match="unexpected entries"):
        resumed.load_state_dict({"momentum/x": torch.zeros(1)})
