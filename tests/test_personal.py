"""CoCoOp (input-conditioned context) and personalization: local low-rank context, PromptFolio."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.federated import Federation, LocalTraining, Simulation
from mmfl.federated.checkpoint import load_state
from mmfl.modalities import get_modality
from mmfl.module import ClientModule
from mmfl.prompts import CoOp, PromptFolio

NAMES = ["cat", "dog", "bird"]


def _module(bb: Backbone, part) -> ClientModule:
    return ClientModule(bb, get_modality("image"), "pets", NAMES, [part])


def _x(bb: Backbone, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, *bb.image_size, generator=torch.Generator().manual_seed(1))


def test_cocoop_starts_as_coop(tiny_backbone: Backbone) -> None:
    torch.manual_seed(0)
    plain = CoOp(tiny_backbone, NAMES, n_ctx=2)
    cond = CoOp(tiny_backbone, NAMES, n_ctx=2, conditional=True)
    with torch.no_grad():
        cond.ctx.copy_(plain.ctx)
        x = _x(tiny_backbone)
        assert torch.allclose(_module(tiny_backbone, cond)(x), _module(tiny_backbone, plain)(x), atol=1e-5)


def test_cocoop_gives_each_input_its_own_prompts(tiny_backbone: Backbone) -> None:
    cond = CoOp(tiny_backbone, NAMES, n_ctx=2, conditional=True)
    with torch.no_grad():
        cond.meta[2].weight.normal_(0, 0.5)  # leave the zero start
    f_x = F.normalize(torch.randn(2, tiny_backbone.embed_dim), dim=-1)
    feats = cond.class_text_features(f_x)
    assert feats.shape == (2, 3, tiny_backbone.embed_dim)
    # reference: plain CoOp whose context is shifted by the meta-net's bias for input 1
    ref = CoOp(tiny_backbone, NAMES, n_ctx=2)
    with torch.no_grad():
        ref.ctx.copy_(cond.ctx + cond.meta(f_x)[1])
        assert torch.allclose(feats[1], ref.class_text_features(), atol=1e-5)
    logits = _module(tiny_backbone, cond)(_x(tiny_backbone))
    logits.sum().backward()
    assert cond.ctx.grad is not None and cond.meta[0].weight.grad is not None
    with pytest.raises(ValueError, match="needs the batch's input features"):
        cond.class_text_features()


def test_local_low_rank_term(tiny_backbone: Backbone) -> None:
    coop = CoOp(tiny_backbone, NAMES, n_ctx=4, local_rank=2)
    assert torch.equal(coop.context()[0], coop.ctx)  # U starts at zero
    with torch.no_grad():
        coop.local_u.normal_()
    assert torch.allclose(coop.context()[1], coop.ctx + coop.local_u @ coop.local_v)
    m = _module(tiny_backbone, coop)
    assert m.trainable_keys() == ["task/pets/coop.ctx", "local/coop.local_u", "local/coop.local_v"]
    assert list(m.trainable_state_dict(include_local=False)) == ["task/pets/coop.ctx"]
    with pytest.raises(ValueError, match="local_rank must be in"):
        CoOp(tiny_backbone, NAMES, n_ctx=2, local_rank=3)


def test_prompt_folio_mixes_shared_and_local(tiny_backbone: Backbone) -> None:
    folio = PromptFolio(tiny_backbone, NAMES, n_ctx=2, fraction=0.3)
    with torch.no_grad():
        folio.ctx_local.normal_(0, 0.5)
    shared = CoOp(tiny_backbone, NAMES, n_ctx=2)
    local = CoOp(tiny_backbone, NAMES, n_ctx=2)
    with torch.no_grad():
        shared.ctx.copy_(folio.ctx)
        local.ctx.copy_(folio.ctx_local)
        expected = 0.7 * F.normalize(shared.class_text_features(), dim=-1) + 0.3 * F.normalize(
            local.class_text_features(), dim=-1
        )
        assert torch.allclose(folio.class_text_features(), expected, atol=1e-5)
    m = _module(tiny_backbone, folio)
    assert m.trainable_keys() == ["task/pets/folio.ctx", "local/folio.ctx_local"]
    with pytest.raises(ValueError, match="fraction must be in"):
        PromptFolio(tiny_backbone, NAMES, fraction=2.0)


def test_personal_tensors_stay_with_their_clients(tiny_backbone: Backbone, tmp_path: Path) -> None:
    task = prepare_task(Task("digits", SklearnDigits(), clients=2, shots=3, max_test_examples=20))
    training = LocalTraining(
        max_steps=2, batch_size=8, accelerator="cpu", optimizer=lambda p: torch.optim.SGD(p, lr=1.0)
    )
    folio = functools.partial(PromptFolio, n_ctx=2)
    sim = Simulation(tiny_backbone, [task], [folio], training, Federation(rounds=1), output_dir=tmp_path)
    sim.run()
    assert list(sim.global_state) == ["task/digits/folio.ctx"]
    assert list(load_state(tmp_path / "global.safetensors")) == ["task/digits/folio.ctx"]
    a, b = (c.module.parts["folio"].ctx_local.detach().clone() for c in sim.clients)  # (a pooled module is lent)
    assert not torch.equal(a, b)  # each client trained its own, and nobody averaged them
    for c, mine in zip(sim.clients, (a, b), strict=True):  # ... and each is saved with its client only
        saved = load_state(tmp_path / "local" / f"{c.data.cid}.safetensors")
        assert list(saved) == ["local/folio.ctx_local"] and torch.equal(saved["local/folio.ctx_local"], mine)
