"""PromptGenerator (FedTPG-like): starts as the hand-written prompt, its block against a hand computation, context
generated for class names it never saw, one global tensor set for every task, and bad arguments refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmfl.backbone import Backbone
from mmfl.data import PreparedTask, SklearnDigits, Task, make_loader, prepare_task
from mmfl.modalities import get_modality
from mmfl.module import ClientModule, make_trainer, quiet_lightning
from mmfl.prompts import PromptGenerator
from mmfl.prompts.generator import _Block

NAMES = ["cat", "sea lion", "dog"]


@pytest.mark.parametrize("which", ["tiny_backbone", "hf_backbone"])
def test_a_fresh_generator_is_the_hand_written_prompt(which: str, request: pytest.FixtureRequest) -> None:
    bb: Backbone = request.getfixturevalue(which)
    gen = PromptGenerator(bb, NAMES)  # ctx_init "a photo of a"
    assert gen.n_ctx == 4
    with torch.no_grad():
        learned = gen.class_text_features()
        written = bb.encode_text(bb.tokenize([f"a photo of a {c}." for c in NAMES]))
    assert (learned - written).abs().max().item() < 1e-5


def test_block_against_a_hand_computation() -> None:
    """One head: x + W_o·softmax(q kᵀ / √W)·v + b_o, then + FF(LayerNorm(·)), with every weight set by hand."""
    torch.manual_seed(0)
    block = _Block(width=2, kv_dim=3, heads=1, mult=1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.tensor([[1.0, -1.0], [0.5, 2.0]])  # [M=2, W=2]
    kv = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0], [3.0, 1.0, 0.0]])  # [K=3, E=3]

    def norm(t: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    a = block.attn
    q = norm(x, block.norm_q) @ a.q_proj_weight.T + a.in_proj_bias[:2]
    k = norm(kv, block.norm_kv) @ a.k_proj_weight.T + a.in_proj_bias[2:4]
    v = norm(kv, block.norm_kv) @ a.v_proj_weight.T + a.in_proj_bias[4:]
    h = x + torch.softmax(q @ k.T / math.sqrt(2), dim=-1) @ v @ a.out_proj.weight.T + a.out_proj.bias
    ln, lin1, lin2 = block.ff[0], block.ff[1], block.ff[3]
    expected = h + F.gelu(norm(h, ln) @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
    with torch.no_grad():
        assert torch.allclose(block(x, kv), expected, atol=1e-5)


def _fit(bb: Backbone, names: list[str], task: PreparedTask) -> ClientModule:
    torch.manual_seed(0)
    m = ClientModule(bb, get_modality("image"), "digits", names, [PromptGenerator(bb, names, depth=1)])
    m.optimizer_factory = lambda p: torch.optim.AdamW(p, lr=0.01)
    loader = make_loader(task.clients[0].train, "image", get_modality("image").transform(bb, False), 8, shuffle=False)
    with quiet_lightning():
        make_trainer(2, accelerator="cpu").fit(m, loader)
    return m


def test_it_generates_context_for_class_names_it_never_saw(tiny_backbone: Backbone) -> None:
    """Trained on the digits, the generator's tensors fit a part built for other (unseen) names, which then gets
    its own context: different from the trained names' and from what an untrained generator gives them."""
    task = prepare_task(Task("digits", SklearnDigits(), max_test_examples=20, shots=4))
    trained = _fit(tiny_backbone, task.class_names, task)
    state = trained.trainable_state_dict()
    assert all(k.startswith("global/generator.") for k in state)  # one set for every task and modality
    gen = trained.parts["generator"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())  # every tensor learns

    unseen = ["cat", "dog"]
    fresh = ClientModule(
        tiny_backbone, get_modality("image"), "pets", unseen, [PromptGenerator(tiny_backbone, unseen, depth=1)]
    )
    before = fresh.parts["generator"].generated_context().detach().clone()  # [M, W]: "a photo of a"
    assert set(fresh.load_trainable_state_dict(state)) == set(state)  # same keys and shapes for 2 or 10 classes
    with torch.no_grad():
        after = fresh.parts["generator"].generated_context()
        assert fresh.class_text_features().shape == (2, tiny_backbone.embed_dim)
        assert (after - before).abs().max() > 1e-3  # training moved the unseen classes' context too
        assert (after - gen.generated_context()).abs().max() > 1e-4  # and it depends on the names


def test_each_class_gets_the_same_context_with_its_own_name(tiny_backbone: Backbone) -> None:
    gen = PromptGenerator(tiny_backbone, NAMES, n_ctx=3, ctx_init=None, depth=2)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.1 * torch.randn_like(p))
        emb = gen.prompt_embeddings()  # [C, L, W]
        ctx = gen.generated_context()  # [M, W]
    for c in range(len(NAMES)):
        assert torch.equal(emb[c, 1:4], ctx)
        assert torch.equal(emb[c, 4:], tiny_backbone.embed_tokens(gen.tokens[c])[4:])  # name, ".", end, padding


def test_scopes_and_personal_terms(tiny_backbone: Backbone) -> None:
    gen = PromptGenerator(tiny_backbone, NAMES, scopes={"ctx": "task"}, local_rank=1)
    m = ClientModule(tiny_backbone, get_modality("image"), "pets", NAMES, [gen])
    keys = m.trainable_keys()
    assert "task/pets/generator.ctx" in keys and "local/generator.local_u" in keys
    assert all(k.startswith("global/generator.") for k in keys if ".cross." in k)


def test_bad_arguments_are_refused(tiny_backbone: Backbone) -> None:
    with pytest.raises(ValueError, match="heads=3 must be >= 1 and divide the text width 64"):
        PromptGenerator(tiny_backbone, NAMES, heads=3)
    with pytest.raises(ValueError, match="must contain"):
        PromptGenerator(tiny_backbone, NAMES, name_template="a photo")
    with pytest.raises(ValueError, match="n_ctx=2 but ctx_init"):
        PromptGenerator(tiny_backbone, NAMES, n_ctx=2)
    with pytest.raises(ValueError, match="depth must be >= 0"):
        PromptGenerator(tiny_backbone, NAMES, depth=-1)
    with pytest.raises(ValueError, match="scopes name unknown parameters"):
        PromptGenerator(tiny_backbone, NAMES, scopes={"bias": "local"})
