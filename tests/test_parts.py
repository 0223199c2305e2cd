"""Feature adapters, projection tuning and pixel prompts: maths, zero-init equivalence, gradients, scopes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfl.backbone import Backbone
from mmfl.modalities import get_modality, register_modality, unregister_modality
from mmfl.modalities.image import ImageModality
from mmfl.module import ClientModule
from mmfl.prompts import ClipAdapter, CoOp, PaddingPrompt, ProjectionTuning

NAMES = ["cat", "dog", "bird"]


def _module(bb: Backbone, *parts) -> ClientModule:
    return ClientModule(bb, get_modality("image"), "pets", NAMES, list(parts))


def _images(bb: Backbone, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, *bb.image_size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("which", ["tiny_backbone", "mini_backbone"])
@pytest.mark.parametrize(
    "make",
    [
        lambda bb: ClipAdapter(bb, NAMES, side="both", ratio=0.0),
        lambda bb: ProjectionTuning(bb, NAMES, side="both"),
        lambda bb: PaddingPrompt(bb, NAMES, pad=2),
    ],
    ids=["adapter_ratio0", "projection_identity", "pixel_zero"],
)
def test_initial_parts_reproduce_the_zero_shot_logits(which, make, request) -> None:
    bb: Backbone = request.getfixturevalue(which)
    x = _images(bb)
    with torch.no_grad():
        assert torch.allclose(_module(bb, make(bb))(x), _module(bb)(x), atol=1e-5)


def test_adapter_matches_the_hand_written_formula(tiny_backbone: Backbone) -> None:
    a = ClipAdapter(tiny_backbone, NAMES, side="input", reduction=4, ratio=0.3)
    f = torch.randn(5, tiny_backbone.embed_dim)
    w1, w2 = a.input[0].weight, a.input[2].weight  # [D/4, D], [D, D/4]
    expected = 0.3 * torch.relu(torch.relu(f @ w1.T) @ w2.T) + 0.7 * f
    assert torch.allclose(a.adapt_input_features(f), expected, atol=1e-6)
    assert torch.equal(a.adapt_text_features(f), f)  # side="input" leaves the text alone
    assert [n for n, _ in a.named_parameters()] == ["input.0.weight", "input.2.weight"]


def test_projection_is_affine(tiny_backbone: Backbone) -> None:
    p = ProjectionTuning(tiny_backbone, NAMES, side="text")
    with torch.no_grad():
        p.text.weight.mul_(2.0)
        p.text.bias.fill_(1.0)
    f = torch.randn(3, tiny_backbone.embed_dim)
    assert torch.allclose(p.adapt_text_features(f), 2 * f + 1, atol=1e-6)
    assert torch.equal(p.adapt_input_features(f), f)


def test_padding_prompt_frame_touches_only_the_border(tiny_backbone: Backbone) -> None:
    p = PaddingPrompt(tiny_backbone, NAMES, pad=3)
    with torch.no_grad():
        for t in (p.top, p.bottom, p.left, p.right):
            t.fill_(1.0)
    frame = p.frame()  # [3, 32, 32]
    assert frame.shape == (3, 32, 32)
    assert frame[:, 3:-3, 3:-3].abs().sum() == 0
    border = torch.ones(32, 32, dtype=torch.bool)
    border[3:-3, 3:-3] = False
    assert bool((frame[:, border] == 1).all())
    x = _images(tiny_backbone)
    assert torch.equal(p.prompt_input(x, "image"), x + frame)
    assert sum(t.numel() for t in p.parameters()) == 3 * (2 * 3 * 32 + 2 * 3 * (32 - 6))


@pytest.mark.parametrize(
    "make",
    [
        lambda bb: ClipAdapter(bb, NAMES, side="both", ratio=0.5),
        lambda bb: ProjectionTuning(bb, NAMES, side="both"),
        lambda bb: PaddingPrompt(bb, NAMES, pad=2),
    ],
    ids=["adapter", "projection", "pixel"],
)
def test_gradients_reach_only_the_part(tiny_backbone: Backbone, make) -> None:
    part = make(tiny_backbone)
    coop = CoOp(tiny_backbone, NAMES, n_ctx=2)
    m = _module(tiny_backbone, part, coop)
    loss = F.cross_entropy(m(_images(tiny_backbone)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert coop.ctx.grad is not None
    assert all(p.grad is None for p in tiny_backbone.model.parameters())


def test_scope_keys_and_local_tensors(tiny_backbone: Backbone) -> None:
    m = _module(
        tiny_backbone,
        ClipAdapter(tiny_backbone, NAMES, side="input", scopes={"input.2.weight": "local"}),
        PaddingPrompt(tiny_backbone, NAMES, pad=2),
        CoOp(tiny_backbone, NAMES, n_ctx=2, scope="global"),
    )
    assert m.trainable_keys() == [
        "task/pets/adapter.input.0.weight",
        "local/adapter.input.2.weight",
        "modality/image/pixel.top",
        "modality/image/pixel.bottom",
        "modality/image/pixel.left",
        "modality/image/pixel.right",
        "global/coop.ctx",
    ]
    sent = m.trainable_state_dict(include_local=False)
    assert "local/adapter.input.2.weight" not in sent and len(sent) == 6


def test_image_parts_serve_modalities_that_render_images_only(tiny_backbone: Backbone) -> None:
    class Depth(ImageModality):  # a plugin's modality drawn as images: the image parts work with it
        name = "depth-test"

    class Tensors(ImageModality):  # one that does not say it renders images
        name = "tensors-test"
        renders_image = False

    register_modality(Depth)
    register_modality(Tensors)
    try:
        pixel = PaddingPrompt(tiny_backbone, NAMES, pad=2)
        assert pixel.supports("depth-test") and pixel.supports("audio") and not pixel.supports("text")
        ClientModule(tiny_backbone, Depth(), "t", NAMES, [pixel])
        with pytest.raises(ValueError, match=r"\['pixel'\] do not work with the 'tensors-test' modality"):
            ClientModule(tiny_backbone, Tensors(), "t", NAMES, [PaddingPrompt(tiny_backbone, NAMES, pad=2)])
        # a restriction set on the part is taken literally: image only means not audio, not depth
        only_image = PaddingPrompt(tiny_backbone, NAMES, pad=2, modalities=["image"])
        assert only_image.supports("image") and not only_image.supports("audio")
        assert not only_image.supports("depth-test")
        assert PaddingPrompt(tiny_backbone, NAMES, pad=2, modalities=["depth-test"]).supports("depth-test")
        with pytest.raises(ValueError, match="and modalities that render images"):
            PaddingPrompt(tiny_backbone, NAMES, pad=2, modalities=["tensors-test"])
        assert CoOp(tiny_backbone, NAMES).supports("tensors-test")  # text-side parts serve every modality
    finally:
        unregister_modality("depth-test")
        unregister_modality("tensors-test")


def test_bad_settings_are_clear_errors(tiny_backbone: Backbone) -> None:
    with pytest.raises(ValueError, match="side="):
        ClipAdapter(tiny_backbone, NAMES, side="image")
    with pytest.raises(ValueError, match="ratio must be in"):
        ClipAdapter(tiny_backbone, NAMES, ratio=1.5)
    with pytest.raises(ValueError, match="pad must be in"):
        PaddingPrompt(tiny_backbone, NAMES, pad=16)


def test_parts_survive_device_and_dtype_moves(tiny_backbone: Backbone) -> None:
    # Lightning moves modules with .to(); a part must not break nn.Module's own machinery
    parts = [
        ClipAdapter(tiny_backbone, NAMES, side="both"),
        ProjectionTuning(tiny_backbone, NAMES),
        PaddingPrompt(tiny_backbone, NAMES, pad=2),
    ]
    m = _module(tiny_backbone, *parts).to("cpu").to(torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
