"""CoOp: initialisation, shapes, class-token positions, gradients, and what its state holds."""

from __future__ import annotations

import pytest
import torch

from mmfl.backbone import Backbone
from mmfl.prompts import CoOp

NAMES = ["cat", "sea lion", "dog"]


@pytest.mark.parametrize("which", ["tiny_backbone", "hf_backbone"])
def test_init_from_words_reproduces_the_hand_written_prompt(which: str, request: pytest.FixtureRequest) -> None:
    bb: Backbone = request.getfixturevalue(which)
    coop = CoOp(bb, NAMES, ctx_init="a photo of a")
    assert coop.n_ctx == 4
    with torch.no_grad():
        learned = coop.class_text_features()
        written = bb.encode_text(bb.tokenize([f"a photo of a {c}." for c in NAMES]))
    assert (learned - written).abs().max().item() < 1e-5


@pytest.mark.parametrize("class_specific", [False, True])
def test_context_shapes_follow_backbone_widths(tiny_backbone: Backbone, class_specific: bool) -> None:
    coop = CoOp(tiny_backbone, NAMES, n_ctx=5, class_specific=class_specific)
    expected = (3, 5, tiny_backbone.text_width) if class_specific else (5, tiny_backbone.text_width)
    assert tuple(coop.ctx.shape) == expected
    assert tuple(coop.class_text_features().shape) == (3, tiny_backbone.embed_dim)
    assert 0.005 < coop.ctx.std().item() < 0.05  # N(0, 0.02)


def test_default_context_length_is_16(tiny_backbone: Backbone) -> None:
    assert CoOp(tiny_backbone, NAMES).ctx.shape == (16, tiny_backbone.text_width)


def test_context_longer_than_the_tokenizer_allows_is_an_error(hf_backbone: Backbone) -> None:
    # 16 context tokens + [CLS] + name + "." + [SEP] do not fit a 16-token context
    with pytest.raises(ValueError, match="does not keep 16 placeholder tokens"):
        CoOp(hf_backbone, NAMES, n_ctx=16)


def test_conflicting_n_ctx_and_ctx_init_is_an_error(tiny_backbone: Backbone) -> None:
    with pytest.raises(ValueError, match="n_ctx=3 but ctx_init"):
        CoOp(tiny_backbone, NAMES, n_ctx=3, ctx_init="a photo of a")


@pytest.mark.parametrize("position", ["front", "middle", "end"])
def test_class_token_position_places_name_and_context(tiny_backbone: Backbone, position: str) -> None:
    coop = CoOp(tiny_backbone, NAMES, n_ctx=4, class_token_position=position, class_specific=True)
    emb = coop.prompt_embeddings().detach()  # [C, L, W]
    c = 1  # "sea lion": more than one token
    name_tok = tiny_backbone.tokenize(["sea lion"])[0]
    n = int((name_tok != 0).sum()) - 2
    name_emb = tiny_backbone.embed_tokens(name_tok[1 : 1 + n])  # [n, W]
    ctx = coop.ctx[c].detach()
    if position == "front":
        expected = torch.cat([name_emb, ctx])
    elif position == "middle":
        expected = torch.cat([ctx[:2], name_emb, ctx[2:]])
    else:
        expected = torch.cat([ctx, name_emb])
    assert torch.equal(emb[c, 1 : 1 + 4 + n], expected)
    # the start token, the "." and the EOT stay where the token ids say
    full = tiny_backbone.embed_tokens(coop.tokens[c])
    assert torch.equal(emb[c, 0], full[0])
    assert torch.equal(emb[c, 1 + 4 + n :], full[1 + 4 + n :])


def test_gradients_reach_only_the_context(tiny_backbone: Backbone) -> None:
    coop = CoOp(tiny_backbone, NAMES, n_ctx=2)
    coop.class_text_features().pow(2).sum().backward()
    assert coop.ctx.grad is not None and coop.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert [n for n, _ in coop.named_parameters()] == ["ctx"]


def test_state_holds_only_the_context(tiny_backbone: Backbone) -> None:
    coop = CoOp(tiny_backbone, NAMES, n_ctx=2)
    assert list(coop.state_dict()) == ["ctx"]  # token buffers are persistent=False


def test_unknown_scope_is_an_error(tiny_backbone: Backbone) -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        CoOp(tiny_backbone, NAMES, scope="galaxy")
    with pytest.raises(ValueError, match="scopes name unknown parameters"):
        CoOp(tiny_backbone, NAMES, scopes={"bias": "local"})
