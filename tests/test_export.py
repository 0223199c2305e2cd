"""BackboneProjections and `mmfl export`: the backbone's own projections trained, merged, exported and reloaded."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmfl import cli
from mmfl.backbone import Backbone
from mmfl.backbones.args import register_model_configs
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.data.loader import make_loader
from mmfl.modalities import get_modality_class
from mmfl.module import ClientModule
from mmfl.prompts import BackboneProjections
from mmfl.text_features import template_text_features, zero_shot_text_features

RECIPE = """
seed: 3
backbone: {model_name: mmfl-tiny}
tasks:
  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 2, shots: 4, max_test_examples: 40}
parts:
  - class_path: mmfl.prompts.BackboneProjections
training:
  max_steps: 3
  batch_size: 16
  accelerator: cpu
  optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.05}}
federation: {rounds: 2}
"""


def test_projections_start_as_the_frozen_ones_and_train_a_copy(tiny_backbone: Backbone) -> None:
    part = BackboneProjections(tiny_backbone, ["zero", "one"])
    assert set(part.targets.values()) == {"text_projection", "visual.proj"} and part.towers() == {"text", "visual"}
    frozen = {k: v.detach().clone() for k, v in tiny_backbone.projections().items()}
    module = ClientModule(tiny_backbone, get_modality_class("image")(), "digits", ["zero", "one"], [part])
    images = torch.rand(3, 3, *tiny_backbone.image_size)
    with torch.no_grad():  # Δ = 0: the frozen model's zero-shot logits
        f_x = F.normalize(tiny_backbone.encode_image(images), dim=-1)
        f_t = zero_shot_text_features(tiny_backbone, ["zero", "one"], module.templates)
        expected = tiny_backbone.logit_scale.exp() * f_x @ f_t.t()
        assert torch.allclose(module(images), expected, atol=1e-5)
    assert not module.frozen_encoding()  # a ViT: image inputs go through the replaced visual.proj
    loss = F.cross_entropy(module(images), torch.tensor([0, 1, 0]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.delta.values())
    with torch.no_grad():
        for p in part.delta.values():
            p.add_(torch.randn_like(p))
        # W = W0 + s·Δ replaces the projection while this client encodes; the shared backbone never changes
        w = part.weights()["text_projection"]
        tokens = tiny_backbone.tokenize(["a photo of a zero."])
        by_hand = tiny_backbone.call_with({"text_projection": w}, lambda: tiny_backbone.encode_text(tokens))
        assert torch.allclose(
            w, frozen["text_projection"] + part.scales["text_projection"] * part.delta["text_projection"]
        )
        assert not torch.allclose(by_hand, tiny_backbone.encode_text(tokens))
        assert all(torch.equal(v, frozen[k]) for k, v in tiny_backbone.projections().items())
        trimmed = template_text_features(tiny_backbone, ["zero"], ["a {}."], trimmed=True)
        assert torch.allclose(trimmed, template_text_features(tiny_backbone, ["zero"], ["a {}."]), atol=1e-6)


def test_text_only_projection_keeps_cached_image_encodings(mini_backbone: Backbone) -> None:
    part = BackboneProjections(mini_backbone, ["a"], towers=["text"])
    assert part.targets == {"text_proj_weight": "text.proj.weight"}
    assert not part.changes_encoding("image") and not part.changes_encoding("audio") and part.changes_encoding("text")
    with pytest.raises(ValueError, match="no projection layer in towers"):
        BackboneProjections(mini_backbone, ["a"], towers=["visual"])  # its timm tower has no projection head
    from mmfl.prompts.alignment import anchor_pooled

    keep = BackboneProjections(mini_backbone, ["a"], towers=["text"], keep=1.0)
    with torch.no_grad():
        keep.delta["text_proj_weight"].normal_()
        w0, d = mini_backbone.model.text.proj.weight, keep.scales["text_proj_weight"] * keep.delta["text_proj_weight"]
        a = anchor_pooled(mini_backbone)  # [1000, 384]; an nn.Linear weight [1280, 384]: a @ Wᵀ
        expected = ((a @ d.t()).pow(2).sum(-1) / (a @ w0.t()).pow(2).sum(-1)).mean()
        assert torch.allclose(keep.regularization(), expected, rtol=1e-5)


def _fit(tmp_path: Path, recipe: str = RECIPE) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    out = tmp_path / "run"
    assert cli.main(["fit", "-c", str(path), "--output_dir", str(out)]) == 0
    return out


def test_export_reloads_through_open_clip_with_the_runs_logits(tmp_path: Path) -> None:
    run = _fit(tmp_path)
    out = tmp_path / "adapted.safetensors"
    assert cli.main(["export", str(run), "--output", str(out), "--no_guard"]) == 0
    state = load_file(out)
    merged = load_file(run / "global.safetensors")
    assert sorted(merged) == ["global/align.delta.text_projection", "global/align.delta.visual_proj"]
    # the run's final state, as its evaluation scored it: a client module with the merged tensors
    task = prepare_task(Task("digits", SklearnDigits(), clients=2, shots=4, max_test_examples=40), seed=3)
    from mmfl.federated.settings import seed_all

    seed_all(3)
    run_backbone = Backbone("mmfl-tiny")
    part = BackboneProjections(run_backbone, task.class_names)
    module = ClientModule(run_backbone, get_modality_class("image")(), "digits", task.class_names, [part])
    assert module.load_trainable_state_dict(merged) == sorted(merged)
    loader = make_loader(task.test, "image", module.modality.transform(run_backbone, False), 40, False)
    images = next(iter(loader))["image"]
    with torch.no_grad():
        expected = module(images)  # [40, 10]
        # open_clip's own factory, with no mmfl code in the loop
        register_model_configs()
        model = open_clip.create_model("mmfl-tiny", pretrained=str(out)).eval()
        f_x = F.normalize(model.encode_image(images), dim=-1)
        texts = [t.format(c) for c in task.class_names for t in module.templates]
        f_t = F.normalize(model.encode_text(open_clip.get_tokenizer("mmfl-tiny")(texts)), dim=-1)
        f_t = F.normalize(f_t.view(len(task.class_names), len(module.templates), -1).mean(1), dim=-1)
        got = model.logit_scale.exp() * f_x @ f_t.t()
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(state["text_projection"], run_backbone.model.text_projection)  # it did train
    assert all(torch.equal(state[k], v) for k, v in run_backbone.model.state_dict().items() if "proj" not in k)
    # and through mmfl: Backbone(pretrained=FILE), `mmfl zeroshot --pretrained FILE`
    again = Backbone("mmfl-tiny", pretrained=str(out))
    assert torch.equal(again.model.visual.proj, state["visual.proj"])
    # --mix: a weight-space ensemble W0 + mix·(W − W0) of the original and the run's projections
    half, none = tmp_path / "half.safetensors", tmp_path / "none.safetensors"
    for path, mix in ((half, "0.5"), (none, "0")):
        assert cli.main(["export", str(run), "--output", str(path), "--mix", mix, "--no_guard"]) == 0
    s_half, s_none = load_file(half), load_file(none)
    for k in ("text_projection", "visual.proj"):
        w0 = run_backbone.model.state_dict()[k]
        assert torch.equal(s_none[k], w0)
        assert torch.allclose(s_half[k], (w0 + state[k]) / 2, atol=1e-6)
        assert not torch.allclose(s_half[k], state[k]) and not torch.allclose(s_half[k], w0)


def test_export_guard_reports_federation_and_never_seen_sets(tmp_path: Path) -> None:
    run = _fit(tmp_path)
    out = tmp_path / "adapted.safetensors"
    assert cli.main(["export", str(run), "--output", str(out), "--limit", "16", "--accelerator", "cpu"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {r["set"]: r for r in report["zero_shot"]}
    assert rows["digits/image"]["kind"] == "federation" and rows["digits/image"]["n"] == 40
    assert rows["photos/image"]["kind"] == "never seen"
    for r in rows.values():
        assert 0 <= r["original"] <= 1 and 0 <= r["adapted"] <= 1
        assert r["change"] == pytest.approx(r["adapted"] - r["original"])
    metrics = list((run / "metrics.csv").read_text().splitlines())
    last = next(line for line in metrics if line.startswith("2,task,digits,image,,test,"))
    assert float(last.split(",")[7]) == pytest.approx(rows["digits/image"]["adapted"], abs=1e-6)  # the run's own


def test_export_errors_are_clear_and_write_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.safetensors"
    assert cli.main(["export", str(tmp_path), "--output", str(out)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    coop = RECIPE.replace("mmfl.prompts.BackboneProjections", "mmfl.prompts.CoOp").replace(
        "federation: {rounds: 2}", "federation: {rounds: 1}"
    )
    run = _fit(tmp_path, coop)
    assert cli.main(["export", str(run), "--output", str(out)]) == 2
    assert "no mmfl.prompts.BackboneProjections part" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--output", str(tmp_path / "x.pt")]) == 2
    assert "ending in .safetensors" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--output", str(out), "--mix", "1.5"]) == 2
    assert "--mix 1.5: give a number from 0" in capsys.readouterr().err
    assert cli.main(["zeroshot", "--data", "digits", "--pretrained", str(tmp_path / "none.safetensors")]) == 2
    assert "existing checkpoint file" in capsys.readouterr().err
    assert not out.exists()


def test_task_scoped_projections_cannot_be_exported(tmp_path: Path, capsys) -> None:
    recipe = RECIPE.replace(
        "  - class_path: mmfl.prompts.BackboneProjections",
        "  - class_path: mmfl.prompts.BackboneProjections\n    init_args: {scope: task}",
    )
    run = _fit(tmp_path, recipe.replace("federation: {rounds: 2}", "federation: {rounds: 1}"))
    assert cli.main(["export", str(run), "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "only a `global` BackboneProjections" in capsys.readouterr().err


def test_keep_penalises_the_relative_change_of_anchor_texts_by_hand(tiny_backbone: Backbone) -> None:
    from mmfl.prompts.alignment import anchor_pooled, anchor_texts

    assert len(anchor_texts()) == 1000 and anchor_texts()[0] == "a photo of a tench."
    part = BackboneProjections(tiny_backbone, ["a"], keep=2.0)
    assert BackboneProjections(tiny_backbone, ["a"]).regularization() is None  # keep 0: off
    assert float(part.regularization()) == 0.0  # Δ = 0: nothing changed
    with torch.no_grad():
        for p in part.delta.values():
            p.copy_(torch.randn_like(p))
    a = anchor_pooled(tiny_backbone)  # [1000, W]
    tokens = tiny_backbone.tokenize(anchor_texts()[:3])
    assert torch.allclose(a[:3] @ tiny_backbone.model.text_projection, tiny_backbone.encode_text(tokens), atol=1e-5)
    w0t, w0v = tiny_backbone.model.text_projection, tiny_backbone.model.visual.proj
    dt = part.scales["text_projection"] * part.delta["text_projection"]
    dv = part.scales["visual_proj"] * part.delta["visual_proj"]
    text = ((a @ dt).pow(2).sum(-1) / (a @ w0t).pow(2).sum(-1)).mean()
    vision = dv.pow(2).sum() / w0v.pow(2).sum()
    assert torch.allclose(part.regularization(), 2.0 * (text + vision) / 2, rtol=1e-5)
    part.regularization().backward()
    assert all(p.grad is not None for p in part.delta.values())


def test_a_guard_with_a_reference_reuses_its_original_scores(tiny_backbone: Backbone) -> None:
    from mmfl.evaluation.forgetting import forgetting_report, guard_tasks

    tasks = guard_tasks([], limit=4)[:1]  # photos, 4 images: a never-seen set of any machine
    first = forgetting_report(tiny_backbone, tiny_backbone, tasks, accelerator="cpu")
    assert first[0]["change"] == 0 and first[0]["n"] == 4
    again = forgetting_report(
        tiny_backbone, tiny_backbone, tasks, accelerator="cpu", reference=[{**first[0], "original": 0.125}]
    )
    assert again[0]["original"] == 0.125 and again[0]["n"] == 4  # taken, not scored again
    assert again[0]["change"] == pytest.approx(first[0]["adapted"] - 0.125)
