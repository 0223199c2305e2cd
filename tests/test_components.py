"""Parameters made of components at several scopes (``task+task_modality``), for every kind of part: one key per
component, the later components start at zero (so the part starts as before), the gradient reaches each, and in a
federation each component is merged within its own scope group only."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from mmfl.backbone import Backbone
from mmfl.data import InMemory, SklearnDigits, Task, prepare_task
from mmfl.federated import FedAvg, Federation, LocalTraining, Simulation, aggregate
from mmfl.modalities import get_modality
from mmfl.module import ClientModule
from mmfl.prompts import (
    ClipAdapter,
    CoOp,
    MaPLe,
    PaddingPrompt,
    ProjectionTuning,
    PromptFolio,
    TextInputPrompt,
    VisualPromptTokens,
)

NAMES = ["cat", "dog", "bird"]

PARTS = {
    "coop": (functools.partial(CoOp, n_ctx=2), "image"),
    "cocoop": (functools.partial(CoOp, n_ctx=2, conditional=True), "image"),
    "coop_low_rank": (functools.partial(CoOp, n_ctx=2, local_rank=1), "image"),
    "promptfolio": (functools.partial(PromptFolio, n_ctx=2), "image"),
    "adapter": (functools.partial(ClipAdapter, side="both", ratio=0.2), "image"),
    "projection": (functools.partial(ProjectionTuning, side="both"), "image"),
    "pixel": (functools.partial(PaddingPrompt, pad=2), "image"),
    "vpt_deep": (functools.partial(VisualPromptTokens, n_tokens=2, deep=True), "image"),
    "maple": (functools.partial(MaPLe, depth=2), "image"),
    "text_input": (functools.partial(TextInputPrompt, n_tokens=2), "text"),
}


def _inputs(bb: Backbone, modality: str) -> torch.Tensor:
    if modality == "text":
        to_ids = get_modality("text").transform(bb, train=False)
        return torch.stack([to_ids(s) for s in ["a cat on a mat", "a dog", "the bird", "a cat"]])
    return torch.randn(4, 3, *bb.image_size, generator=torch.Generator().manual_seed(0))


def _module(bb: Backbone, make, modality: str, scope: str) -> ClientModule:
    torch.manual_seed(0)
    return ClientModule(bb, get_modality(modality), "pets", NAMES, [make(bb, NAMES, scope=scope)])


@pytest.mark.parametrize("name", list(PARTS))
def test_every_part_splits_into_components_that_start_as_the_plain_part(tiny_backbone: Backbone, name: str) -> None:
    make, modality = PARTS[name]
    plain = _module(tiny_backbone, make, modality, "task")
    split = _module(tiny_backbone, make, modality, "task+task_modality")
    shared = plain.trainable_keys(include_local=False)
    assert shared and all(k.startswith("task/pets/") for k in shared)
    residual = [k.replace("task/pets/", f"task_modality/pets/{modality}/") for k in shared]
    local = [k for k in plain.trainable_keys() if k.startswith("local/")]
    assert sorted(split.trainable_keys()) == sorted(shared + residual + local)
    state = split.trainable_state_dict()
    plain_state = plain.trainable_state_dict()
    for k in shared:  # the first component holds the part's initial value, the second starts at zero
        assert torch.equal(state[k], plain_state[k]), k
    for k in residual:
        assert not state[k].any(), k
    x, y = _inputs(tiny_backbone, modality), torch.tensor([0, 1, 2, 0])
    a, b = plain(x), split(x)
    assert torch.allclose(a, b, atol=1e-6)
    F.cross_entropy(a, y).backward()
    F.cross_entropy(b, y).backward()
    grads = {k: p.grad for k, p in split._qualified()}
    plain_grads = {k: p.grad for k, p in plain._qualified()}
    for k, r in zip(shared, residual, strict=True):  # the sum's gradient reaches both components alike
        assert grads[k] is not None and grads[r] is not None, k
        assert torch.allclose(grads[k], plain_grads[k], atol=1e-6) and torch.equal(grads[k], grads[r]), k
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_loading_a_state_sets_each_component(tiny_backbone: Backbone) -> None:
    m = _module(tiny_backbone, functools.partial(CoOp, n_ctx=2), "image", "global+task_modality")
    coop = m.parts["coop"]
    base = coop.parametrizations.ctx.original.detach().clone()
    m.load_trainable_state_dict({"task_modality/pets/image/coop.ctx": torch.ones(2, tiny_backbone.text_width)})
    assert torch.equal(coop.ctx, base + 1)  # the part reads the sum
    assert m.trainable_keys() == ["global/coop.ctx", "task_modality/pets/image/coop.ctx"]


def _digit_sentences() -> InMemory:
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    texts = [f"the digit {w} {i}" for w in names for i in range(2)]
    return InMemory({"text": texts, "label": [d for d in range(10) for _ in range(2)]}, names, input_column="text")


def _mood_sentences() -> InMemory:
    texts = [f"a {w} sentence number {i}" for w in ("happy", "sad") for i in range(6)]
    return InMemory({"text": texts, "label": [0] * 6 + [1] * 6}, ["joy", "grief"], input_column="text")


def test_each_component_is_merged_within_its_own_scope_group_only(tiny_backbone: Backbone) -> None:
    tasks = [
        prepare_task(Task("digits", SklearnDigits(), clients=2, shots=2, max_test_examples=10)),
        prepare_task(Task("digits", _digit_sentences(), modality="text", clients=1)),
        prepare_task(Task("moods", _mood_sentences(), modality="text", clients=1)),
    ]
    training = LocalTraining(max_steps=2, batch_size=8, accelerator="cpu", optimizer=lambda p: torch.optim.SGD(p, lr=1))
    parts = [functools.partial(CoOp, n_ctx=2, scope="global+task+task_modality")]
    sim = Simulation(tiny_backbone, tasks, parts, training, Federation(rounds=1))
    ups = [sim.fit_client(c, 1)[0] for c in sim.clients]
    assert [sorted(u.state) for u in ups] == [
        ["global/coop.ctx", "task/digits/coop.ctx", "task_modality/digits/image/coop.ctx"],
        ["global/coop.ctx", "task/digits/coop.ctx", "task_modality/digits/image/coop.ctx"],
        ["global/coop.ctx", "task/digits/coop.ctx", "task_modality/digits/text/coop.ctx"],
        ["global/coop.ctx", "task/moods/coop.ctx", "task_modality/moods/text/coop.ctx"],
    ]
    merged = aggregate(ups, FedAvg())

    def mean(key: str, members: list[int]) -> torch.Tensor:
        n = torch.tensor([float(ups[i].num_examples) for i in members]).double()
        stacked = torch.stack([ups[i].state[key].double() for i in members])
        return (stacked * (n / n.sum())[:, None, None]).sum(0)

    for key, members in [
        ("global/coop.ctx", [0, 1, 2, 3]),
        ("task/digits/coop.ctx", [0, 1, 2]),
        ("task/moods/coop.ctx", [3]),
        ("task_modality/digits/image/coop.ctx", [0, 1]),
        ("task_modality/digits/text/coop.ctx", [2]),
    ]:
        assert torch.allclose(merged[key].double(), mean(key, members), atol=1e-6), key
    # every component moved, and the clients' copies differ (so the groups above are really different means)
    assert not torch.allclose(ups[0].state["global/coop.ctx"], ups[3].state["global/coop.ctx"])
    assert ups[0].state["task_modality/digits/image/coop.ctx"].abs().sum() > 0
