"""MaPLe and deep text prompts: hand-written reference forwards (native and HF text towers), the coupling,
equivalence with CoOp at depth 1, gradients, scope keys and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_vpt import reference_forward as vision_reference

from mmfl.backbone import Backbone
from mmfl.modalities import get_modality
from mmfl.module import ClientModule
from mmfl.prompts import CoOp, MaPLe

NAMES = ["cat", "dog", "bird"]


def _replace(x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    p = prompts.shape[0]
    return torch.cat([x[:, :1], prompts.expand(x.shape[0], -1, -1), x[:, 1 + p :]], dim=1)


def native_text_reference(bb: Backbone, embeds: torch.Tensor, tokens: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """open_clip's text transformer written out: positions, causal blocks with the prompt positions
    replaced before block k + 1, ln_final, the EOT token's state, projection."""
    m = bb.model
    x = embeds + m.positional_embedding  # [N, L, W]
    for i, block in enumerate(m.transformer.resblocks):
        if 1 <= i <= deep.shape[0]:
            x = _replace(x, deep[i - 1])
        x = block(x, attn_mask=m.attn_mask)
    x = m.ln_final(x)
    pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # EOT has the largest id
    return pooled @ m.text_projection


def hf_text_reference(bb: Backbone, embeds: torch.Tensor, tokens: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """The HF BERT tower written out, one text at a time over its unpadded tokens (so no mask is needed):
    BERT embeddings, blocks with the prompt positions replaced before block k + 1, mean, projection."""
    text = bb.model.text
    out = []
    for c in range(tokens.shape[0]):
        n = int((tokens[c] != bb.pad_token_id).sum())
        h = text.transformer.embeddings(inputs_embeds=embeds[c : c + 1, :n])  # [1, n, W]
        for i, layer in enumerate(text.transformer.encoder.layer):
            if 1 <= i <= deep.shape[0]:
                h = _replace(h, deep[i - 1])
            h = layer(h)
        out.append(text.proj(h.mean(dim=1)))
    return torch.cat(out)


@pytest.mark.parametrize(
    ("which", "reference"), [("tiny_backbone", native_text_reference), ("hf_backbone", hf_text_reference)]
)
def test_deep_text_prompts_match_the_reference(which: str, reference, request: pytest.FixtureRequest) -> None:
    bb: Backbone = request.getfixturevalue(which)
    part = MaPLe(bb, NAMES, n_ctx=3, ctx_init=None, depth=2, couple_vision=False)
    with torch.no_grad():
        part.deep_ctx.normal_(0.0, 1.0)
        embeds, tokens = part.prompt_embeddings(), part.tokens
        got = part.class_text_features()
        assert torch.allclose(got, reference(bb, embeds, tokens, part.deep_ctx), atol=1e-5)
        plain = bb.encode_text_embeds(embeds, tokens)
        assert not torch.allclose(got, plain, atol=1e-3)  # the deep prompts do change the features
        # no deep prompts, [0, P, W], is the plain encoder
        assert torch.allclose(bb.encode_text_embeds(embeds, tokens, part.deep_ctx[:0]), plain, atol=1e-6)


def test_hf_hooks_are_removed_even_after_an_error(hf_backbone: Backbone) -> None:
    layers = hf_backbone.model.text.transformer.encoder.layer
    tokens = hf_backbone.tokenize(["cat"])
    embeds = hf_backbone.embed_tokens(tokens)
    hf_backbone.encode_text_embeds(embeds, tokens, torch.zeros(1, 2, 32))
    assert all(not layer._forward_pre_hooks for layer in layers)
    with pytest.raises(RuntimeError):  # embeddings of the wrong width fail inside the HF model
        hf_backbone.encode_text_embeds(torch.zeros(1, tokens.shape[1], 7), tokens, torch.zeros(1, 2, 32))
    assert all(not layer._forward_pre_hooks for layer in layers)


def test_deep_text_prompt_shape_errors(tiny_backbone: Backbone) -> None:
    tokens = tiny_backbone.tokenize(["cat"])
    embeds = tiny_backbone.embed_tokens(tokens)
    with pytest.raises(ValueError, match=r"K <= 1 .*2 blocks"):
        tiny_backbone.encode_text_embeds(embeds, tokens, torch.zeros(2, 2, 64))
    with pytest.raises(ValueError, match=r"\[K, P, 64\]"):
        tiny_backbone.encode_text_embeds(embeds, tokens, torch.zeros(1, 2, 32))


def test_coupled_vision_prompts_are_the_projected_text_prompts(tiny_backbone: Backbone) -> None:
    part = MaPLe(tiny_backbone, NAMES, depth=2)
    text = torch.cat([part.ctx.unsqueeze(0), part.deep_ctx])  # [2, M, 64]
    expected = torch.stack(
        [F.linear(text[j], part.proj_weight[j], part.proj_bias[j]) for j in range(2)]
    )  # [2, M, 64]: one text→vision map per block
    tokens = part.vision_prompt_tokens()
    assert tokens.shape == (2, part.n_ctx, 64)
    assert torch.allclose(tokens, expected, atol=1e-6)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    module = ClientModule(tiny_backbone, get_modality("image"), "pets", NAMES, [part])
    with torch.no_grad():
        f_x = module.input_features(x)
        expected_f = F.normalize(vision_reference(tiny_backbone, x, expected), dim=-1)
        assert torch.allclose(f_x, expected_f, atol=1e-5)


def test_depth_one_text_only_is_coop(tiny_backbone: Backbone) -> None:
    maple = MaPLe(tiny_backbone, NAMES, ctx_init="a photo of a", depth=1, couple_vision=False)
    coop = CoOp(tiny_backbone, NAMES, ctx_init="a photo of a")
    assert maple.deep_ctx is None and maple.proj_weight is None and maple.vision_prompt_tokens() is None
    assert torch.equal(maple.ctx, coop.ctx)
    with torch.no_grad():
        assert torch.allclose(maple.class_text_features(), coop.class_text_features(), atol=1e-6)


def test_gradients_reach_every_tensor_and_only_those(tiny_backbone: Backbone) -> None:
    part = MaPLe(tiny_backbone, NAMES, depth=2, scopes={"ctx": "task"})
    module = ClientModule(tiny_backbone, get_modality("image"), "pets", NAMES, [part])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    F.cross_entropy(module(x), torch.tensor([0, 1, 2, 0])).backward()
    for name, p in part.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert module.trainable_keys() == [
        "task/pets/maple.ctx",
        "task_modality/pets/image/maple.deep_ctx",
        "task_modality/pets/image/maple.proj_weight",
        "task_modality/pets/image/maple.proj_bias",
    ]


def test_text_only_works_on_the_cnn_backbone_and_other_modalities(mini_backbone: Backbone) -> None:
    part = MaPLe(mini_backbone, NAMES, depth=6, couple_vision=False)
    assert part.supports("text") and part.supports("image")
    assert part.deep_ctx.shape == (5, 4, 384)  # "a photo of a" → 4 tokens; MiniLM: 6 blocks, width 384
    assert MaPLe.modalities == ("image", "audio")  # the coupled part stays on the vision tower
    module = ClientModule(mini_backbone, get_modality("image"), "pets", NAMES, [part])
    x = torch.randn(2, 3, *mini_backbone.image_size, generator=torch.Generator().manual_seed(3))
    F.cross_entropy(module(x), torch.tensor([0, 2])).backward()
    assert part.ctx.grad.abs().sum() > 0 and part.deep_ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in mini_backbone.model.parameters())


def test_errors_name_the_fix(tiny_backbone: Backbone, mini_backbone: Backbone) -> None:
    with pytest.raises(ValueError, match=r"PaddingPrompt.*couple_vision=false"):
        MaPLe(mini_backbone, NAMES)
    with pytest.raises(ValueError, match=r"depth=3 must be in \[1, 2\].*vision tower: 2 blocks"):
        MaPLe(tiny_backbone, NAMES, depth=3)
    with pytest.raises(ValueError, match=r"depth=7 must be in \[1, 6\]"):
        MaPLe(mini_backbone, NAMES, depth=7, couple_vision=False)
    with pytest.raises(ValueError, match=r"unknown parameters \['proj'\]"):
        MaPLe(tiny_backbone, NAMES, depth=2, scopes={"proj": "local"})
