"""FedAvg per scope group against hand-computed averages."""

from __future__ import annotations

import pytest
import torch

from mmfl.federated import FedAvg, Update, aggregate
from mmfl.federated.scopes import is_local, qualify, scope_prefix


def test_scope_prefixes() -> None:
    assert scope_prefix("global", "digits", "image") == "global"
    assert scope_prefix("task", "digits", "image") == "task/digits"
    assert scope_prefix("modality", "digits", "image") == "modality/image"
    assert scope_prefix("task_modality", "digits", "image") == "task_modality/digits/image"
    assert qualify("local", "digits", "image", "coop.ctx") == "local/coop.ctx"
    assert is_local("local/coop.ctx") and not is_local("task/digits/coop.ctx")


def _u(cid: str, n: int, **tensors: float) -> Update:
    return Update(cid, {k.replace("__", "/"): torch.tensor([v, 2 * v]) for k, v in tensors.items()}, n)


def test_weighted_average_within_each_task_never_across() -> None:
    ups = [
        Update("a0", {"task/a/p": torch.tensor([1.0, 2.0]), "global/g": torch.tensor([0.0])}, 1),
        Update("a1", {"task/a/p": torch.tensor([5.0, 6.0]), "global/g": torch.tensor([4.0])}, 3),
        Update("b0", {"task/b/p": torch.tensor([100.0, 0.0]), "global/g": torch.tensor([8.0])}, 4),
    ]
    merged = aggregate(ups, FedAvg())
    # task a: (1*[1,2] + 3*[5,6]) / 4 = [4, 5]; task b alone: itself; global over all: (0*1+4*3+8*4)/8 = 5.5
    assert torch.equal(merged["task/a/p"], torch.tensor([4.0, 5.0]))
    assert torch.equal(merged["task/b/p"], torch.tensor([100.0, 0.0]))
    assert torch.equal(merged["global/g"], torch.tensor([5.5]))


def test_unweighted_average() -> None:
    ups = [
        Update("a0", {"task/a/p": torch.tensor([1.0])}, 1),
        Update("a1", {"task/a/p": torch.tensor([5.0])}, 3),
    ]
    assert torch.equal(aggregate(ups, FedAvg(weighted=False))["task/a/p"], torch.tensor([3.0]))


def test_dtype_is_preserved_and_arithmetic_is_exact() -> None:
    ups = [Update(str(i), {"global/x": torch.tensor([0.1], dtype=torch.float16)}, 1) for i in range(3)]
    out = aggregate(ups, FedAvg())["global/x"]
    assert out.dtype == torch.float16 and torch.equal(out, torch.tensor([0.1], dtype=torch.float16))


def test_local_tensors_are_refused() -> None:
    with pytest.raises(ValueError, match="local tensors never leave"):
        aggregate([Update("c", {"local/p": torch.zeros(1)}, 1)], FedAvg())


def test_shape_disagreement_names_the_clients() -> None:
    ups = [Update("c0", {"global/p": torch.zeros(2)}, 1), Update("c1", {"global/p": torch.zeros(3)}, 1)]
    with pytest.raises(ValueError, match="client c1 sent"):
        aggregate(ups, FedAvg())


def test_zero_weights_are_an_error() -> None:
    with pytest.raises(ValueError, match="cannot average"):
        aggregate([Update("c0", {"global/p": torch.zeros(2)}, 0)], FedAvg())


@pytest.mark.parametrize("rule", ["fedavg", "unweighted", "median", "trimmed", "fedavgm"])
def test_a_large_key_is_merged_without_stacking_its_copies_bit_for_bit(
    rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from mmfl.federated import FedAvgM, Median, TrimmedMean

    agg = importlib.import_module("mmfl.federated.aggregate")  # the package exports a function of the same name
    make = {
        "fedavg": FedAvg,
        "unweighted": lambda: FedAvg(weighted=False),
        "median": Median,
        "trimmed": lambda: TrimmedMean(0.2),
        "fedavgm": lambda: FedAvgM(server_lr=0.5, momentum=0.9),
    }[rule]
    g = torch.Generator().manual_seed(0)
    k, shape = 9, (3, 1000, 7)  # 21,000 coordinates: slices of 700 at the bound below
    ups = [Update(f"c{i}", {"task/a/w": torch.randn(shape, generator=g)}, 1 + i % 4) for i in range(k)]
    current = {"task/a/w": torch.randn(shape, generator=g)}
    monkeypatch.setattr(agg, "CHUNK_BYTES", 10**12)
    whole = aggregate(ups, make(), current)["task/a/w"]
    bound = 8 * k * 700
    monkeypatch.setattr(agg, "CHUNK_BYTES", bound)
    seen = []
    base = make().rule
    original = type(base).merge

    def spy(self, key, tensors, weights, cur=None):
        seen.append(tensors.numel() * tensors.element_size())
        return original(self, key, tensors, weights, cur)

    monkeypatch.setattr(type(base), "merge", spy)
    sliced = aggregate(ups, make(), current)["task/a/w"]
    if isinstance(base, FedAvg):  # a mean adds one copy at a time: nothing stacked
        assert seen == []
    else:
        assert len(seen) == 30 and max(seen) <= bound  # 21,000 / 700 slices, each within the bound
    assert torch.equal(whole, sliced)


def test_fedavg_sums_the_copies_in_client_order() -> None:
    # weights 1/4 each: the weighted copies are exactly 1e16, 1, −1e16, 1 (float64). In client order the first 1 is
    # lost (1e16 + 1 rounds to 1e16), the large terms cancel, the last 1 stays: 1. Pairwise, (1e16 + 1) + (−1e16 + 1)
    # gives 0: the order is what makes a merge in slices equal the whole merge.
    big = torch.full((5,), 4e16, dtype=torch.float64)
    four = torch.full((5,), 4.0, dtype=torch.float64)
    ups = [Update(c, {"task/t/x": t}, 1) for c, t in zip("abcd", [big, four, -big, four], strict=True)]
    assert torch.equal(aggregate(ups, FedAvg(weighted=False))["task/t/x"], torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("rule", ["fedavg", "median"])
def test_a_mean_rule_keeps_no_reply_once_it_is_added(rule: str) -> None:
    import gc
    import weakref

    from mmfl.federated import Median
    from mmfl.federated.round_merge import RoundMerge

    merge = RoundMerge(FedAvg() if rule == "fedavg" else Median(), mixing={})
    refs = []
    for cid, n, v in [("a", 1, 1.0), ("b", 3, 5.0), ("c", 4, 3.0)]:
        t = torch.full((4,), v)
        refs.append(weakref.ref(t))
        merge.add(Update(cid, {"task/a/p": t}, n))
        del t
    gc.collect()
    alive = [r() is not None for r in refs]
    # FedAvg: one float64 sum, (1·1 + 3·5 + 4·3) / 8 = 3.5; the median holds every copy until the end: 3
    assert alive == ([False] * 3 if rule == "fedavg" else [True] * 3)
    expected = 3.5 if rule == "fedavg" else 3.0
    assert torch.equal(merge.result()["task/a/p"], torch.full((4,), expected))
    assert merge.replies == 3


def test_a_round_merge_checks_each_reply_as_it_comes() -> None:
    from mmfl.federated.round_merge import RoundMerge

    merge = RoundMerge(FedAvg())
    merge.add(Update("a", {"task/a/p": torch.zeros(2)}, 1))
    with pytest.raises(ValueError, match=r"task/a/p: client b sent \(3,\) torch.float32, client a sent \(2,\)"):
        merge.add(Update("b", {"task/a/p": torch.zeros(3)}, 1))
    with pytest.raises(ValueError, match="client c sent local tensor 'local/p'"):
        merge.add(Update("c", {"local/p": torch.zeros(2)}, 1))
