"""Backbone: the embed-equivalence contract, freezing, and checkpoint/name handling."""

from __future__ import annotations

import pytest
import torch

from mmfl.backbone import Backbone

TEXTS = ["a photo of a cat.", "a dog", "sea lion", "x x x zero."]


@pytest.mark.parametrize("which", ["tiny_backbone", "hf_backbone"])
def test_encode_text_embeds_equals_encode_text(which: str, request: pytest.FixtureRequest) -> None:
    bb: Backbone = request.getfixturevalue(which)
    tokens = bb.tokenize(TEXTS)
    with torch.no_grad():
        via_embeds = bb.encode_text_embeds(bb.embed_tokens(tokens), tokens)
        direct = bb.model.encode_text(tokens)
    assert via_embeds.shape == (len(TEXTS), bb.embed_dim)
    assert (via_embeds - direct).abs().max().item() < 1e-5


def test_hf_tower_is_custom_text_clip(hf_backbone: Backbone) -> None:
    import open_clip

    assert isinstance(hf_backbone.model, open_clip.CustomTextCLIP)
    assert isinstance(hf_backbone.model.text, open_clip.hf_model.HFTextEncoder)
    assert hf_backbone.text_width == 32 and hf_backbone.embed_dim == 24


def test_widths_and_scale(tiny_backbone: Backbone) -> None:
    assert tiny_backbone.text_width == 64
    assert tiny_backbone.embed_dim == 64
    assert tiny_backbone.context_length == 24
    assert tiny_backbone.logit_scale.shape == ()
    assert torch.isclose(tiny_backbone.logit_scale, tiny_backbone.model.logit_scale.detach().reshape(()))


def test_frozen_and_in_eval(tiny_backbone: Backbone) -> None:
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())
    assert not tiny_backbone.model.training


def test_embed_tokens_gradients_flow_through_frozen_tower(tiny_backbone: Backbone) -> None:
    tokens = tiny_backbone.tokenize(["a cat"])
    embeds = tiny_backbone.embed_tokens(tokens).detach().requires_grad_(True)
    tiny_backbone.encode_text_embeds(embeds, tokens).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.model.parameters())


def test_local_checkpoint_path_reloads_identical_weights(tiny_backbone: Backbone, tmp_path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    reloaded = Backbone("mmfl-tiny", pretrained=str(path))
    tokens = tiny_backbone.tokenize(TEXTS)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded.encode_text(tokens), tiny_backbone.encode_text(tokens))
        assert torch.equal(reloaded.encode_image(images), tiny_backbone.encode_image(images))


def test_unknown_model_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not an open_clip model"):
        Backbone("ViT-Q-99")


def test_missing_checkpoint_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        Backbone("mmfl-tiny", pretrained=str(tmp_path / "missing.pt"))


def test_unknown_pretrained_tag_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="neither a pretrained tag"):
        Backbone("ViT-B-32", pretrained="not-a-tag")


@pytest.mark.parametrize("which", ["tiny_backbone", "hf_backbone", "mini_backbone"])
def test_learned_prompts_cut_to_their_longest_prompt_equal_the_full_context(which: str, request) -> None:
    """The text tower sees only up to the longest prompt's end token; the pooled features equal the full-length
    ones (causal mask / padding mask), for prompts of different lengths, with and without deep prompts."""
    bb = request.getfixturevalue(which)
    tokens = bb.tokenize(["a photo of a cat.", "x", "a photo of the sea lion of the digit one two three."])
    embeds = bb.embed_tokens(tokens)  # [3, L, W]
    assert int(bb.text_lengths(tokens).max()) < tokens.shape[1]  # there is something to cut
    with torch.no_grad():
        cut = bb.encode_text_embeds(embeds, tokens)
        bb.truncate_text = False
        try:
            full = bb.encode_text_embeds(embeds, tokens)
            deep = torch.randn(1, 2, bb.text_width) * 0.02
            full_deep = bb.encode_text_embeds(embeds, tokens, deep_prompts=deep) if bb.text_depth > 1 else None
        finally:
            bb.truncate_text = True
        assert torch.allclose(cut, full, atol=1e-5), (cut - full).abs().max()
        known = bb.encode_text_embeds(embeds, tokens, text_len=int(bb.text_lengths(tokens).max()))  # prompt parts
        assert torch.equal(known, cut)
        if full_deep is not None:
            assert torch.allclose(bb.encode_text_embeds(embeds, tokens, deep_prompts=deep), full_deep, atol=1e-5)
        assert torch.allclose(full, bb.encode_text(tokens), atol=1e-5)  # and both equal open_clip's own path


def test_tokenize_keeps_short_calls_and_returns_a_new_tensor_each_time(tiny_backbone: Backbone) -> None:
    names = ["zero", "one", "two"]
    first = tiny_backbone.tokenize(names)
    assert torch.equal(first, tiny_backbone.tokenizer(names))  # the tokenizer's own ids
    first[:, 1] = 0  # a caller that writes into its tokens changes nothing kept
    again = tiny_backbone.tokenize(names)
    assert torch.equal(again, tiny_backbone.tokenizer(names)) and again.data_ptr() != first.data_ptr()
    many = [f"word {i}" for i in range(65)]  # a long list (e.g. glosses): tokenized, not kept
    assert torch.equal(tiny_backbone.tokenize(many), tiny_backbone.tokenizer(many))
    assert tuple(many) not in tiny_backbone._tokens and tuple(names) in tiny_backbone._tokens
