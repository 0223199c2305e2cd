"""The text modality: input-side prompts (token layout, reference encoding), encode and gradients, WordNet
glosses, modality-driven task defaults, zero-shot text classification."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmfl.backbone import Backbone
from mmfl.data import InMemory, Task, WordNetGlosses
from mmfl.data.task import DEFAULT_TEMPLATES
from mmfl.data.wordnet import SUPERSENSES, WORDNET_DIR, read_noun_glosses
from mmfl.evaluation import zero_shot
from mmfl.modalities import get_modality
from mmfl.module import ClientModule
from mmfl.prompts import CoOp, TextInputPrompt, VisualPromptTokens

NAMES = ["cat", "dog"]
HAVE_WORDNET = (Path(WORDNET_DIR) / "data.noun").is_file()


def test_prefix_layout_native(tiny_backbone: Backbone) -> None:
    bb = tiny_backbone  # context length 24; ids: start 49406, end 49407, pad 0
    tokens = bb.tokenize(["a cat", " ".join(["cat"] * 30)])
    new, embeds = bb.insert_prefix(tokens, torch.ones(3, 64))
    sos, eos, cat, a = 49406, 49407, int(tokens[0, 2]), int(tokens[0, 1])
    assert new[0].tolist() == [sos, sos, sos, sos, a, cat, eos] + [0] * 17
    # the long text: 22 content tokens fitted in 24; now 19 remain, and the end token is kept
    assert new[1].tolist() == [sos, sos, sos, sos] + [cat] * 19 + [eos]
    assert torch.equal(embeds[:, 1:4], torch.ones(2, 3, 64))
    assert torch.equal(embeds[0, 4:], bb.embed_tokens(new)[0, 4:])
    with pytest.raises(ValueError, match=r"must be \[P, 64\] with P <= 22"):
        bb.insert_prefix(tokens, torch.ones(23, 64))


def test_prefix_layout_hf(hf_backbone: Backbone) -> None:
    tokens = hf_backbone.tokenize(["a cat"])  # [CLS] a cat [SEP] pad...
    new, _ = hf_backbone.insert_prefix(tokens, torch.zeros(2, 32))
    cls, a, cat, sep = tokens[0, :4].tolist()
    assert new[0].tolist() == [cls, cls, cls, a, cat, sep] + [0] * 10


@pytest.mark.parametrize("which", ["tiny_backbone", "hf_backbone"])
def test_prefixed_encoding_equals_placeholder_replacement(which: str, request: pytest.FixtureRequest) -> None:
    """Same as writing "X X X <sentence>" and swapping the placeholders' embeddings for the prompt."""
    bb: Backbone = request.getfixturevalue(which)
    prefix = torch.randn(3, bb.text_width, generator=torch.Generator().manual_seed(0))
    sentences = ["a cat", "the dog of a cat"]
    tokens = bb.tokenize(["x x x " + s for s in sentences])
    embeds = bb.embed_tokens(tokens)
    embeds[:, 1:4] = prefix
    with torch.no_grad():
        expected = bb.encode_text_embeds(embeds, tokens)
        got = bb.encode_text(bb.tokenize(sentences), prefix)
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, bb.encode_text(bb.tokenize(sentences)), atol=1e-3)


def test_text_client_trains_only_its_parts(tiny_backbone: Backbone) -> None:
    modality = get_modality("text")
    to_ids = modality.transform(tiny_backbone, train=True)
    x = torch.stack([to_ids(s) for s in ["a cat on a mat", "a dog", "the dog"]])  # [3, 24]
    assert x.shape == (3, 24) and x.dtype == torch.long
    prompt = TextInputPrompt(tiny_backbone, NAMES, n_tokens=2)
    coop = CoOp(tiny_backbone, NAMES, n_ctx=2)
    module = ClientModule(tiny_backbone, modality, "pets", NAMES, [prompt, coop])
    logits = module(x)
    assert logits.shape == (3, 2)
    F.cross_entropy(logits, torch.tensor([0, 1, 1])).backward()
    assert prompt.tokens.grad.abs().sum() > 0 and coop.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert module.trainable_keys() == ["modality/text/text_prompt.tokens", "task/pets/coop.ctx"]


def test_text_modality_errors(tiny_backbone: Backbone) -> None:
    with pytest.raises(TypeError, match="takes strings, got int"):
        get_modality("text").transform(tiny_backbone, False)(3)
    with pytest.raises(ValueError, match=r"do not work with the 'text' modality"):
        ClientModule(tiny_backbone, get_modality("text"), "t", NAMES, [VisualPromptTokens(tiny_backbone, NAMES)])
    with pytest.raises(ValueError, match=r"do not work with the 'image' modality"):
        ClientModule(tiny_backbone, get_modality("image"), "t", NAMES, [TextInputPrompt(tiny_backbone, NAMES)])


def test_text_prompt_init_from_words(tiny_backbone: Backbone) -> None:
    prompt = TextInputPrompt(tiny_backbone, NAMES, init="a text about")
    tokens = tiny_backbone.tokenize(["a text about"])
    assert prompt.tokens.shape == (3, 64)
    assert torch.equal(prompt.tokens.detach(), tiny_backbone.embed_tokens(tokens)[0, 1:4])


def test_task_takes_modality_and_templates_from_its_data() -> None:
    texts = InMemory({"text": ["a", "b"], "label": [0, 1]}, input_column="text", class_names=["x", "y"])
    text_task = Task("t", texts, modality="text")
    assert text_task.prompt_templates() == list(get_modality("text").templates)
    assert Task("t", texts, modality="text", templates=["{}!"]).prompt_templates() == ["{}!"]
    image_task = Task("i", InMemory({"image": [], "label": []}, class_names=["x"]))
    assert image_task.modality == "image" and image_task.prompt_templates() == list(DEFAULT_TEMPLATES)
    if HAVE_WORDNET:
        assert Task("g", WordNetGlosses()).modality == "text"


def test_wordnet_parser_on_a_hand_written_file(tmp_path: Path) -> None:
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided\n"
        "00001740 03 n 01 entity 0 000 | that which is perceived to have its own distinct existence\n"
        '00015388 05 n 01 animal 0 000 | a living organism; "animals move"\n'
        '02084071 05 n 01 dog 0 000 | a member of the genus Canis; "the dog barked"; "it ran"\n'
        "03001627 06 n 01 chair 0 000 | a seat for one person\n",
        encoding="latin-1",
    )
    texts, labels = read_noun_glosses(tmp_path / "data.noun")
    assert texts == ["a living organism", "a member of the genus Canis", "a seat for one person"]
    assert [SUPERSENSES[i] for i in labels] == ["animal", "animal", "artifact"]
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        WordNetGlosses(root=str(tmp_path / "nowhere"))


@pytest.mark.skipif(not HAVE_WORDNET, reason="Debian wordnet-base is not installed")
def test_glosses_split_and_zero_shot(mini_backbone: Backbone) -> None:
    dd = WordNetGlosses(max_per_class=40).load()
    assert dd["train"].features["label"].names == SUPERSENSES and len(SUPERSENSES) == 25
    assert not set(dd["train"]["text"]) & set(dd["test"]["text"])
    assert set(dd["test"]["label"]) == set(range(25))  # stratified: every class is tested
    out = zero_shot(mini_backbone, Task("glosses", WordNetGlosses()), limit=300, accelerator="cpu")
    assert out["classes"] == 25 and out["n"] == 300
    assert out["top1"] > 3 * out["chance"]  # the frozen text towers classify definitions with no training
