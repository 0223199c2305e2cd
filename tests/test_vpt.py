"""VPT: no-token equivalence, a hand-written reference forward (shallow and deep), gradients, scope, CNN error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfl.backbone import Backbone
from mmfl.modalities import get_modality
from mmfl.module import ClientModule
from mmfl.prompts import VisualPromptTokens

NAMES = ["cat", "dog"]


def _x(bb: Backbone) -> torch.Tensor:
    return torch.randn(3, 3, *bb.image_size, generator=torch.Generator().manual_seed(2))


def reference_forward(bb: Backbone, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """VPT written out from the tower's parts: patchify, class token, positions, ln_pre, prompts after
    the class token (replaced before block i < K when deep, [K, P, W]), drop them, ln_post, pool, project."""
    v = bb.model.visual
    b = images.shape[0]
    x = v.conv1(images).flatten(2).transpose(1, 2)  # [B, N, W]
    x = torch.cat([v.class_embedding.expand(b, 1, -1), x], dim=1) + v.positional_embedding  # [B, 1+N, W]
    x = v.ln_pre(x)
    deep = prompts.dim() == 3
    p = prompts.shape[-2]
    for i, block in enumerate(v.transformer.resblocks):
        if i == 0 or (deep and i < prompts.shape[0]):
            layer_prompts = (prompts[i] if deep else prompts).expand(b, -1, -1)
            rest = x[:, 1:] if i == 0 else x[:, 1 + p :]
            x = torch.cat([x[:, :1], layer_prompts, rest], dim=1)
        x = block(x)
    x = torch.cat([x[:, :1], x[:, 1 + p :]], dim=1)
    x = v.ln_post(x)
    pooled = x[:, 1:].mean(dim=1) if v.pool_type == "avg" else x[:, 0]  # mmfl-tiny: avg; default: class token
    return pooled @ v.proj


@pytest.mark.parametrize("which", ["tiny_backbone", "hf_backbone"])  # avg-pooled and class-token-pooled ViTs
@pytest.mark.parametrize("deep", [False, True])
def test_prompted_forward_matches_the_reference(which: str, deep: bool, request: pytest.FixtureRequest) -> None:
    bb: Backbone = request.getfixturevalue(which)
    vpt = VisualPromptTokens(bb, NAMES, n_tokens=3, deep=deep, init_std=0.5)
    x = _x(bb)
    with torch.no_grad():
        got = bb.encode_image(x, vpt.vision_prompt_tokens())
        assert torch.allclose(got, reference_forward(bb, x, vpt.tokens), atol=1e-5)
        assert not torch.allclose(got, bb.encode_image(x), atol=1e-3)  # the tokens do change the features


def test_partial_depth_carries_the_prompts_on(tiny_backbone: Backbone) -> None:
    """[K, P, W] with K < blocks: replaced before the first K blocks only; [1, P, W] is shallow VPT."""
    x = _x(tiny_backbone)
    tokens = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = tiny_backbone.encode_image(x, tokens)
        assert torch.allclose(got, tiny_backbone.encode_image(x, tokens[0]), atol=1e-6)
        assert torch.allclose(got, reference_forward(tiny_backbone, x, tokens), atol=1e-5)
    with pytest.raises(ValueError, match=r"1 <= K <= 2"):
        tiny_backbone.encode_image(x, torch.zeros(3, 3, 64))


@pytest.mark.parametrize("deep", [False, True])
def test_no_tokens_reproduce_the_zero_shot_logits(tiny_backbone: Backbone, deep: bool) -> None:
    vpt = VisualPromptTokens(tiny_backbone, NAMES, n_tokens=0, deep=deep)
    with_part = ClientModule(tiny_backbone, get_modality("image"), "t", NAMES, [vpt])
    without = ClientModule(tiny_backbone, get_modality("image"), "t", NAMES, [])
    with torch.no_grad():
        assert torch.allclose(with_part(_x(tiny_backbone)), without(_x(tiny_backbone)), atol=1e-5)


def test_gradients_reach_only_the_tokens_and_scope_key(tiny_backbone: Backbone) -> None:
    vpt = VisualPromptTokens(tiny_backbone, NAMES, n_tokens=2, deep=True)
    assert vpt.tokens.shape == (2, 2, 64)  # 2 blocks, 2 tokens, width 64
    m = ClientModule(tiny_backbone, get_modality("image"), "t", NAMES, [vpt])
    F.cross_entropy(m(_x(tiny_backbone)), torch.tensor([0, 1, 0])).backward()
    assert vpt.tokens.grad is not None and vpt.tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert m.trainable_keys() == ["modality/image/vpt.tokens"]


def test_cnn_tower_names_the_pixel_prompt(mini_backbone: Backbone) -> None:
    with pytest.raises(
        ValueError, match=r"takes no prompt tokens; use a pixel-space prompt \(mmfl.prompts.PaddingPrompt\)"
    ):
        VisualPromptTokens(mini_backbone, NAMES)
