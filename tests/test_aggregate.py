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
