"""DecoupledHead (DePT): its fused logits and loss against a hand computation, weight 0 trains exactly as without it,
its own learning rate, and base-to-novel scoring without it (novel classes, transfer) while the base classes use it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, make_loader, prepare_task
from mmfl.evaluation.runner import learned_method, zero_shot_method
from mmfl.federated import Federation
from mmfl.federated.simulation import LocalTraining, Simulation
from mmfl.modalities import get_modality
from mmfl.module import ClientModule, make_trainer, quiet_lightning
from mmfl.prompts import CoOp, DecoupledHead

NAMES = ["zero", "one", "two"]


def _ce(logits: list[float], label: int) -> float:
    """Cross-entropy of one example, by hand."""
    return -logits[label] + math.log(sum(math.exp(v) for v in logits))


def _hand_set_head(bb: Backbone, weight: float) -> DecoupledHead:
    head = DecoupledHead(bb, NAMES, weight=weight)
    d = bb.embed_dim
    with torch.no_grad():
        head.input_scale.fill_(2.0)
        head.input_shift.zero_()
        head.input_shift[0] = 0.5
        head.text_scale.fill_(1.0)
        head.text_shift.zero_()
        head.classifier.weight.zero_()
        head.classifier.weight[0, 0] = 1.0  # class 0 reads channel 0, class 1 channel 1, class 2 nothing
        head.classifier.weight[1, 1] = 3.0
        head.classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.25]))
    assert d >= 2
    return head


def test_fused_logits_and_loss_by_hand(tiny_backbone: Backbone) -> None:
    head = _hand_set_head(tiny_backbone, weight=0.75)
    d = tiny_backbone.embed_dim
    f_x = torch.zeros(2, d)
    f_x[0, 0], f_x[1, 1] = 1.0, 1.0  # two unit inputs
    # head logits: class 0 = 1·(2·x0 + 0.5), class 1 = 3·(2·x1), class 2 = 0.25
    head_expected = [[2.5, 0.0, 0.25], [0.5, 6.0, 0.25]]
    itm = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    fused = head.fuse_logits(itm, f_x)
    want = [
        [0.25 * a + 0.75 * b for a, b in zip(i, h, strict=True)]
        for i, h in zip(itm.tolist(), head_expected, strict=True)
    ]
    assert torch.allclose(fused, torch.tensor(want))

    f_t = torch.zeros(3, d)  # class text features: class c is the unit vector on channel c
    for c in range(3):
        f_t[c, c] = 1.0
    y = torch.tensor([0, 1])
    # text half: class 0's text → logits [1, 0, 0.25]; class 1's → [0, 3, 0.25]
    text_expected = [[1.0, 0.0, 0.25], [0.0, 3.0, 0.25]]
    itm_loss = torch.tensor(1.5)
    head_ce = (_ce(head_expected[0], 0) + _ce(head_expected[1], 1)) / 2
    text_ce = (_ce(text_expected[0], 0) + _ce(text_expected[1], 1)) / 2
    expected = 0.25 * 1.5 + 0.75 * (head_ce + text_ce) / 2
    assert head.training_loss(itm_loss, f_x, f_t, y).item() == pytest.approx(expected, rel=1e-6)
    head.text_examples = False
    assert head.training_loss(itm_loss, f_x, f_t, y).item() == pytest.approx(0.25 * 1.5 + 0.75 * head_ce, rel=1e-6)


def _fit(bb: Backbone, parts: list, steps: int = 3) -> ClientModule:
    task = prepare_task(Task("digits", SklearnDigits(), max_test_examples=20, shots=2))
    m = ClientModule(bb, get_modality("image"), "digits", task.class_names, parts)
    m.optimizer_factory = lambda p: torch.optim.AdamW(p, lr=0.01)
    loader = make_loader(task.clients[0].train, "image", get_modality("image").transform(bb, False), 8, shuffle=False)
    with quiet_lightning():
        make_trainer(1, max_steps=steps, accelerator="cpu").fit(m, loader)
    return m


def test_weight_zero_trains_and_scores_exactly_as_without_the_head(tiny_backbone: Backbone) -> None:
    names = [str(i) for i in range(10)]
    torch.manual_seed(0)
    plain = _fit(tiny_backbone, [CoOp(tiny_backbone, names, n_ctx=2)])
    torch.manual_seed(0)
    start = CoOp(tiny_backbone, names, n_ctx=2)
    init = start.ctx.detach().clone()
    with_head = _fit(tiny_backbone, [start, DecoupledHead(tiny_backbone, names, 0.0)])
    a, b = plain.trainable_state_dict(), with_head.trainable_state_dict()
    assert torch.equal(a["task/digits/coop.ctx"], b["task/digits/coop.ctx"])
    assert not torch.equal(a["task/digits/coop.ctx"], init)  # it did train
    x = torch.randn(4, 3, *tiny_backbone.image_size)
    plain.eval(), with_head.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), with_head(x))


def test_the_head_has_its_own_learning_rate_and_learns(tiny_backbone: Backbone) -> None:
    names = [str(i) for i in range(10)]
    head = DecoupledHead(tiny_backbone, names, lr_scale=6.5)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    m = _fit(tiny_backbone, [CoOp(tiny_backbone, names, n_ctx=2), head], steps=2)
    groups = m.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [pytest.approx(0.01), pytest.approx(0.065)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in head.parameters()}
    assert all(not torch.equal(before[k], v) for k, v in head.state_dict().items())  # every tensor learns
    assert sorted(m.trainable_keys()) == sorted(
        ["task/digits/coop.ctx"] + [f"task/digits/head.{n}" for n, _ in head.named_parameters()]
    )


def test_novel_classes_and_transfer_are_scored_without_the_head(tiny_backbone: Backbone) -> None:
    """Base-to-novel accepts the head (it is class-specific but serves the trained classes only): with the head as
    the only part, novel classes and another data set's are scored exactly as zero-shot, base classes with the head."""
    task = prepare_task(Task("digits", SklearnDigits(), clients=1, max_test_examples=20), base_to_novel=True)
    parts = [lambda b, names: DecoupledHead(b, names)]
    sim = Simulation(tiny_backbone, [task], parts, LocalTraining(max_steps=2, accelerator="cpu"), Federation(rounds=1))
    sim.run()  # the novel-class evaluator is built each round: no "class-specific" refusal
    assert sim.class_dependent_keys(task) == []
    learned, zs = learned_method(sim, sim.global_state), zero_shot_method(tiny_backbone, None)
    novel = learned(task, task.novel_class_names)
    assert not novel.parts  # left out: no row for these classes
    x = torch.randn(5, 3, *tiny_backbone.image_size)
    with torch.no_grad():
        assert torch.equal(novel.eval()(x), zs(task, task.novel_class_names).eval()(x))
        base = learned(task, task.class_names)
        assert list(base.parts) == ["head"]
        assert not torch.allclose(base.eval()(x), zs(task, task.class_names).eval()(x))
    target = dataclasses.replace(task, class_names=["cat", "dog"])  # a transfer target scored with the task's tensors
    assert not learned(target, ["cat", "dog"]).parts


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"weight": 1.5}, "weight must be in"), ({"lr_scale": 0.0}, "lr_scale must be > 0")],
)
def test_bad_arguments_are_refused(tiny_backbone: Backbone, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DecoupledHead(tiny_backbone, NAMES, **kwargs)
