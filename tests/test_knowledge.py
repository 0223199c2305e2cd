"""Knowledge guidance (KgCoOp, PromptSRC): each term against a hand computation, weight 0 equals unguided training
bit for bit, the terms hold the learned features near the frozen model's, and bad weights are refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, make_loader, prepare_task
from mmfl.knowledge import KnowledgeGuidance, anchor_features, prograd_project, total
from mmfl.modalities import get_modality
from mmfl.module import ClientModule, make_trainer, quiet_lightning
from mmfl.prompts import CoOp, VisualPromptTokens

F_T = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # learned class features [C=2, D=2]
ZS_T = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # hand-written ones: cosines 1 and 0.8


def test_each_term_against_a_hand_computation() -> None:
    g = KnowledgeGuidance(text=8.0, text_l1=25.0, input_l1=10.0, logits_kl=1.0)
    f_x = torch.tensor([[1.0, 0.0]])  # [B=1, D]
    zs_x = torch.tensor([[0.6, 0.8]])
    logits = torch.tensor([[0.0, math.log(3.0)]])  # learned p = (1/4, 3/4)
    # zero-shot logits: log(3) · zs_x @ zs_tᵀ = log(3) · (0.6, 0.6·0.6 + 0.8·0.8) = log(3) · (0.6, 1.0)
    terms = g.terms(F_T, ZS_T, logits, f_x, zs_x, logit_scale=math.log(3.0))
    assert terms["kg_text"].item() == pytest.approx(8.0 * (1 - (1.0 + 0.8) / 2))  # 0.8
    assert terms["src_text"].item() == pytest.approx(25.0 * (0 + 0 + 0.6 + 0.2) / 4)  # 5.0
    assert terms["src_input"].item() == pytest.approx(10.0 * (0.4 + 0.8) / 2)  # 6.0
    q1 = 3**1.0 / (3**0.6 + 3**1.0)  # zero-shot probabilities (q0, q1) ∝ (3^0.6, 3^1)
    q0 = 1 - q1
    kl = q0 * math.log(q0 / 0.25) + q1 * math.log(q1 / 0.75)
    assert terms["src_logits"].item() == pytest.approx(kl, rel=1e-5)
    assert total(terms).item() == pytest.approx(0.8 + 5.0 + 6.0 + kl, rel=1e-5)


def test_temperature_softens_both_distributions_and_scales_by_its_square() -> None:
    g = KnowledgeGuidance(logits_kl=1.0, temperature=2.0)
    logits = torch.tensor([[0.0, math.log(3.0)]])
    zs_x, zs_t = torch.tensor([[1.0, 0.0]]), torch.eye(2)  # zero-shot logits (log 3, 0)
    # at T = 2: p ∝ (1, √3), q ∝ (√3, 1); KL(q ‖ p) = (√3 − 1)/(√3 + 1) · log √3, times T² = 4
    r = math.sqrt(3.0)
    expected = 4 * (r - 1) / (r + 1) * math.log(r)
    got = g.terms(F_T, zs_t, logits, zs_x=zs_x, logit_scale=math.log(3.0))["src_logits"]
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_input_conditioned_class_features_are_compared_per_input() -> None:
    g = KnowledgeGuidance(text=1.0)
    f_t = torch.stack([F_T, ZS_T])  # [B=2, C, D]: the second input's features equal the hand-written ones
    assert g.terms(f_t, ZS_T)["kg_text"].item() == pytest.approx((0.1 + 0.0) / 2)


def test_no_weight_no_term_and_bad_weights_are_refused() -> None:
    assert not KnowledgeGuidance().active and KnowledgeGuidance().terms(F_T, ZS_T) == {}
    assert total({}) == 0.0
    with pytest.raises(ValueError, match=r"weights must be >= 0.*'text': -1"):
        KnowledgeGuidance(text=-1.0).check()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        KnowledgeGuidance(logits_kl=1.0, temperature=0.0).check()


def _fit(bb: Backbone, knowledge: KnowledgeGuidance | None, parts_fn=None, epochs: int = 2) -> ClientModule:
    task = prepare_task(Task("digits", SklearnDigits(), max_test_examples=20, shots=4))
    torch.manual_seed(0)
    parts = parts_fn(bb, task.class_names) if parts_fn else [CoOp(bb, task.class_names, n_ctx=2)]
    m = ClientModule(bb, get_modality("image"), "digits", task.class_names, parts, knowledge=knowledge)
    m.optimizer_factory = lambda p: torch.optim.AdamW(p, lr=0.05)
    loader = make_loader(task.clients[0].train, "image", get_modality("image").transform(bb, False), 8, shuffle=False)
    with quiet_lightning():
        make_trainer(epochs, accelerator="cpu").fit(m, loader)
    return m


def test_zero_weights_train_exactly_as_without_guidance(tiny_backbone: Backbone) -> None:
    plain = _fit(tiny_backbone, None).trainable_state_dict()
    zero = _fit(tiny_backbone, KnowledgeGuidance()).trainable_state_dict()
    assert plain.keys() == zero.keys() and all(torch.equal(plain[k], zero[k]) for k in plain)


def test_text_guidance_keeps_the_class_features_near_the_hand_written_ones(tiny_backbone: Backbone) -> None:
    def drift(m: ClientModule) -> float:
        with torch.no_grad():
            return 1 - F.cosine_similarity(m.class_text_features(), m.hand_written_features(), dim=-1).mean().item()

    free, held = _fit(tiny_backbone, None), _fit(tiny_backbone, KnowledgeGuidance(text=50.0))
    assert drift(held) < 0.5 * drift(free)
    free_ctx, held_ctx = free.parts["coop"].ctx, held.parts["coop"].ctx
    assert not torch.equal(free_ctx, held_ctx)


def test_input_guidance_reaches_parts_inside_the_encoder(tiny_backbone: Backbone) -> None:
    """A visual prompt changes the image features; the frozen pass (no parts) is the reference, and its gradient
    reaches the prompt tokens."""

    def vpt(bb: Backbone, names: list[str]) -> list:
        return [VisualPromptTokens(bb, names, n_tokens=2, scope="task")]

    m = ClientModule(tiny_backbone, get_modality("image"), "digits", ["0", "1"], vpt(tiny_backbone, []))
    m.knowledge = KnowledgeGuidance(input_l1=10.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.nn.init.normal_(m.parts["vpt"].tokens, std=1.0)
    f_x = m.input_features(x)
    zs_x = m.frozen_input_features(x)
    assert torch.allclose(zs_x, F.normalize(tiny_backbone.encode_image(x), dim=-1), atol=1e-6)
    term = m.knowledge.terms(m.class_text_features(), m.hand_written_features(), f_x=f_x, zs_x=zs_x)["src_input"]
    assert term.item() > 0
    term.backward()
    assert m.parts["vpt"].tokens.grad is not None and m.parts["vpt"].tokens.grad.abs().sum() > 0


def test_anchor_features_shift_the_hand_written_features_across_the_batch_gap() -> None:
    zs_t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    f_x = torch.tensor([[0.6, 0.8], [0.0, 1.0]])  # labels 0 and 2: gaps (−0.4, 0.8) and (−0.6, 0.2)
    a = anchor_features(zs_t, torch.tensor([1]), f_x, torch.tensor([0, 2]))
    shifted = torch.tensor([0.0 - 0.5, 1.0 + 0.5])  # class 1's feature + the mean gap (−0.5, 0.5)
    assert torch.allclose(a, (shifted / shifted.norm()).unsqueeze(0))


def test_anchors_train_the_classes_a_client_lacks(tiny_backbone: Backbone) -> None:
    """The anchor term is the cross-entropy of the missing classes' anchors against the learned class features; a
    client that holds every class has none, and its training is the unguided one bit for bit."""
    names = ["cat", "dog", "bird", "fish"]
    m = ClientModule(
        tiny_backbone,
        get_modality("image"),
        "pets",
        names,
        [CoOp(tiny_backbone, names, n_ctx=2)],
        knowledge=KnowledgeGuidance(anchors=2.0),
    )
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 1])
    m.held_classes = [0, 1]
    f_x, f_t, logits = m._features_and_logits(x, None)
    a = anchor_features(m.hand_written_features(), torch.tensor([2, 3]), f_x, y)
    expected = 2.0 * F.cross_entropy(tiny_backbone.logit_scale.exp() * a @ f_t.t(), torch.tensor([2, 3]))
    got = m._guidance(x, y, None, f_x, f_t, logits)
    assert torch.allclose(got, expected)
    got.backward()
    assert m.parts["coop"].ctx.grad.abs().sum() > 0
    m.held_classes = [0, 1, 2, 3]
    assert m._guidance(x, y, None, f_x, f_t, logits) == 0.0
    m.held_classes = None  # not told which classes it holds (outside a simulation): no anchors
    assert m._guidance(x, y, None, f_x, f_t, logits) == 0.0


def test_prograd_projection_by_hand() -> None:
    g, h = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]  # g·h = −1, ‖h‖² = 2
    prograd_project(g, h, 1.0)
    assert torch.allclose(g[0], torch.tensor([0.5, 0.5]))  # g + ½h: orthogonal to h
    g = [torch.tensor([1.0, 0.0])]
    prograd_project(g, h, 0.5)
    assert torch.allclose(g[0], torch.tensor([0.75, 0.25]))  # half the conflicting component removed
    g = [torch.tensor([1.0, 0.0])]
    prograd_project(g, [torch.tensor([1.0, 1.0])], 1.0)
    assert torch.equal(g[0], torch.tensor([1.0, 0.0]))  # no conflict: unchanged
    # over all tensors together: g·h = 1·(−1) + 2·0 = −1, ‖h‖² = 1
    g2 = [torch.tensor([1.0]), torch.tensor([2.0])]
    prograd_project(g2, [torch.tensor([-1.0]), torch.tensor([0.0])], 1.0)
    assert torch.allclose(torch.cat(g2), torch.tensor([0.0, 2.0]))


def test_prograd_removes_the_step_gradients_conflict_with_the_zero_shot_prediction(tiny_backbone: Backbone) -> None:
    names = ["cat", "dog", "bird"]
    coop = CoOp(tiny_backbone, names, n_ctx=2)
    m = ClientModule(
        tiny_backbone, get_modality("image"), "pets", names, [coop], knowledge=KnowledgeGuidance(prograd=1.0)
    )
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():  # labels where the learned prediction exceeds the zero-shot one: the gradients conflict
        zs = tiny_backbone.logit_scale.exp() * m.frozen_input_features(x) @ m.hand_written_features().t()
        y = (m(x).softmax(dim=1) - zs.softmax(dim=1)).argmax(dim=1)
    m.on_train_epoch_start()
    m.training_step({"image": x, "label": y}, 0).backward()
    ((param, h),) = m._prograd_ref
    assert param is coop.ctx
    g = coop.ctx.grad.clone()
    dot = (g * h).sum()
    assert dot < 0
    m.on_after_backward()
    assert torch.allclose(coop.ctx.grad, g - dot / h.pow(2).sum() * h, atol=1e-7)
    assert abs((coop.ctx.grad * h).sum().item()) < 1e-6 * g.norm().item() * h.norm().item()
    assert m._prograd_ref is None  # used once
    # inside a real Trainer the hook runs too: the run differs from the unguided one
    plain, guided = _fit(tiny_backbone, None), _fit(tiny_backbone, KnowledgeGuidance(prograd=1.0))
    assert not torch.equal(plain.parts["coop"].ctx, guided.parts["coop"].ctx)


def test_merged_anchors_come_from_the_received_prompt_and_stay_fixed_during_local_training(
    tiny_backbone: Backbone,
) -> None:
    names = ["cat", "dog", "bird", "fish"]
    coop = CoOp(tiny_backbone, names, n_ctx=2)
    m = ClientModule(
        tiny_backbone,
        get_modality("image"),
        "pets",
        names,
        [coop],
        knowledge=KnowledgeGuidance(anchors=2.0, anchor_source="merged"),
    )
    m.held_classes = [0, 1]
    with torch.no_grad():
        coop.ctx.normal_(0.0, 1.0)  # the received (merged) prompt, far from the hand-written one
        received = m.class_text_features().clone()  # [C, D]
    m.on_train_start()
    with torch.no_grad():
        coop.ctx.add_(1.0)  # local training moves the prompt; the anchors do not follow
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 1])
    f_x, f_t, logits = m._features_and_logits(x, None)
    a = anchor_features(received, torch.tensor([2, 3]), f_x, y)
    expected = 2.0 * F.cross_entropy(tiny_backbone.logit_scale.exp() * a @ f_t.t(), torch.tensor([2, 3]))
    assert torch.allclose(m._guidance(x, y, None, f_x, f_t, logits), expected)
    frozen = anchor_features(m.hand_written_features(), torch.tensor([2, 3]), f_x, y)
    assert not torch.allclose(a, frozen, atol=1e-3)  # a different source than the hand-written prompts
    with pytest.raises(ValueError, match=r"anchor_source must be one of \['frozen', 'merged'\], got 'ema'"):
        KnowledgeGuidance(anchors=1.0, anchor_source="ema").check()


def test_a_simulation_tells_each_client_its_classes_and_anchors_change_the_run(tiny_backbone: Backbone) -> None:
    from flwr_datasets.partitioner import PathologicalPartitioner

    from mmfl.federated import Federation, LocalTraining, Simulation

    def skew(n: int) -> PathologicalPartitioner:  # client i holds classes i and i + 1
        return PathologicalPartitioner(n, "label", num_classes_per_partition=2, class_assignment_mode="deterministic")

    task = prepare_task(Task("digits", SklearnDigits(), clients=5, partitioner=skew, shots=2, max_test_examples=20))

    def run(knowledge: KnowledgeGuidance) -> dict[str, torch.Tensor]:
        training = LocalTraining(max_steps=2, batch_size=8, accelerator="cpu", knowledge=knowledge)
        parts = [lambda bb, names: CoOp(bb, names, n_ctx=2)]
        sim = Simulation(tiny_backbone, [task], parts, training, Federation(rounds=1), seed=0)
        for i, c in enumerate(sim.clients):
            assert c.data.classes() == [i, i + 1]
            # told its own partition's labels only, and only when anchors are on (no label scan otherwise)
            assert c.module.held_classes == (c.data.classes() if knowledge.anchors > 0 else None)
        sim.run_round(1)
        return sim.global_state

    plain, zero, anchored = (
        run(KnowledgeGuidance()),
        run(KnowledgeGuidance(anchors=0.0)),
        run(KnowledgeGuidance(anchors=1.0)),
    )
    assert torch.equal(plain["task/digits/coop.ctx"], zero["task/digits/coop.ctx"])
    assert not torch.equal(plain["task/digits/coop.ctx"], anchored["task/digits/coop.ctx"])
