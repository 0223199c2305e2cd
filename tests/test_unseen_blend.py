"""``knowledge.unseen_blend``: the class features of class names the parts never trained on are mixed with the
hand-written ones — by hand, only where the names are not the trained ones, and never in training."""

from __future__ import annotations

import math

import pytest
import torch

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.evaluation.runner import learned_method
from mmfl.federated import Federation, LocalTraining, Simulation
from mmfl.knowledge import KnowledgeGuidance, unseen_mix
from mmfl.modalities import get_modality
from mmfl.module import ClientModule
from mmfl.prompts import CoOp


def test_the_mix_by_hand() -> None:
    f_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # learned [C=2, D=2]
    zs_t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # hand-written
    r = 1 / math.sqrt(2)
    # class 0: 0.5·(1, 0) + 0.5·(0, 1) = (0.5, 0.5) → (1/√2, 1/√2); class 1: equal already → (0, 1)
    assert torch.allclose(unseen_mix(f_t, zs_t, 0.5), torch.tensor([[r, r], [0.0, 1.0]]))
    # w = 0.25: 0.75·(1, 0) + 0.25·(0, 1) = (0.75, 0.25) → (3, 1)/√10
    assert torch.allclose(unseen_mix(f_t, zs_t, 0.25)[0], torch.tensor([3.0, 1.0]) / math.sqrt(10))
    assert torch.equal(unseen_mix(f_t, zs_t, 0.0), f_t) and torch.equal(unseen_mix(f_t, zs_t, 1.0), zs_t)
    per_input = torch.stack([f_t, zs_t])  # [B=2, C, D]: input-conditioned features are mixed per input
    assert torch.allclose(unseen_mix(per_input, zs_t, 0.5)[1], zs_t)


def test_a_module_mixes_its_class_features_with_the_hand_written_ones(tiny_backbone: Backbone) -> None:
    names = ["zero", "one", "two"]
    torch.manual_seed(0)
    part = CoOp(tiny_backbone, names, n_ctx=2)
    with torch.no_grad():
        part.ctx.add_(torch.randn_like(part.ctx))  # a context the hand-written prompt does not give

    def module(w: float) -> ClientModule:
        return ClientModule(tiny_backbone, get_modality("image"), "digits", names, [part], unseen_blend=w)

    with torch.no_grad():
        learned, mixed = module(0.0).class_text_features(), module(0.3).class_text_features()  # [C, D]
        zs = module(0.0).hand_written_features()
    expected = (0.7 * learned + 0.3 * zs) / (0.7 * learned + 0.3 * zs).norm(dim=-1, keepdim=True)
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert not torch.allclose(mixed, learned, atol=1e-3)  # the mix moved them
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1)  # noqa: E731
    assert (cos(mixed, zs) > cos(learned, zs)).all()  # toward the hand-written features
    with pytest.raises(ValueError, match=r"unseen_blend must be in \[0, 1\], got 1.5"):
        module(1.5)


def test_the_setting_is_checked_and_is_no_training_term() -> None:
    assert not KnowledgeGuidance(unseen_blend=0.5).active  # nothing is added to any loss
    KnowledgeGuidance(unseen_blend=1.0).check()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"unseen_blend must be in \[0, 1\].*got " + str(bad)):
            KnowledgeGuidance(unseen_blend=bad).check()


def test_only_modules_for_other_class_names_mix_and_training_is_unchanged(tiny_backbone: Backbone) -> None:
    task = prepare_task(Task("digits", SklearnDigits(), clients=2, shots=2, max_test_examples=20))

    def run(w: float) -> tuple[Simulation, dict[str, torch.Tensor]]:
        knowledge = KnowledgeGuidance(unseen_blend=w)
        training = LocalTraining(max_steps=2, batch_size=8, accelerator="cpu", knowledge=knowledge)
        sim = Simulation(
            tiny_backbone, [task], [lambda bb, names: CoOp(bb, names, n_ctx=2)], training, Federation(rounds=1), seed=0
        )
        assert all(c.module.unseen_blend == 0.0 for c in sim.clients)  # clients train on their task's classes
        sim.run_round(1)
        return sim, sim.global_state

    (sim, mixed), (_, plain) = run(0.5), run(0.0)
    assert mixed.keys() == plain.keys() and all(torch.equal(mixed[k], plain[k]) for k in plain)  # bit for bit
    assert sim.build_module(task).unseen_blend == 0.0
    assert sim.build_module(task, trained_classes=False).unseen_blend == 0.5
    method = learned_method(sim, mixed)  # how `mmfl evaluate` scores novel classes and other data sets
    assert method(task, list(task.class_names)).unseen_blend == 0.0
    novel = method(task, ["cat", "dog", "horse"])
    assert novel.unseen_blend == 0.5 and novel.class_names == ["cat", "dog", "horse"]
    with torch.no_grad():
        alone = ClientModule(
            tiny_backbone,
            novel.modality,
            "digits",
            novel.class_names,
            list(novel.parts.values()),
            templates=novel.templates,
        )
        expected = unseen_mix(alone.class_text_features(), alone.hand_written_features(), 0.5)
        assert torch.allclose(novel.class_text_features(), expected, atol=1e-6)
