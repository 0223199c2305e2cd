"""``mmfl evaluate`` end to end: outputs, a checkpoint scored as training scored it, bad input, hub recipes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mmfl import cli

HUB = sorted((Path(__file__).parent.parent / "recipes" / "hub").glob("*.yaml"))

B2N = """
backbone: {model_name: mmfl-mini}
tasks:
  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 3, shots: 2, max_test_examples: 30}
  - {name: animals, data: {class_path: mmfl.data.AnimalSilhouettes}, clients: 3, shots: 2, max_test_examples: 30}
parts:
  - class_path: mmfl.prompts.CoOp
    init_args: {n_ctx: 4, ctx_init: a photo of a, scope: task}
training: {accelerator: cpu, max_steps: 1, optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.01}}}
federation: {rounds: 2}
evaluation:
  base_to_novel: true
  val_fraction: 0.02
  selection: best_val
  unseen_clients: 1
  seeds: [0, 1]
  transfer:
    - source: animals
      task: {name: photos, data: {class_path: mmfl.data.SkimagePhotos}}
"""


def _evaluate(*args: str) -> int:
    return cli.main(["evaluate", *args])


@pytest.fixture
def no_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command builds a model."""

    def refuse(*a, **k):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse)


def test_evaluate_on_mmfl_mini_writes_every_output(tmp_path: Path) -> None:
    recipe = tmp_path / "b2n.yaml"
    recipe.write_text(B2N)
    out = tmp_path / "eval"
    assert _evaluate("-c", str(recipe), "--output_dir", str(out)) == 0
    for f in ("report.md", "metrics.json", "accuracy_per_round.png", "base_novel.png", "config.yaml"):
        assert (out / f).is_file(), f
    for png in ("accuracy_per_round.png", "base_novel.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["summary"]) == {"zeroshot", "ensemble", "federated", "centralised"}
    fed = doc["summary"]["federated"]
    for key in ("digits/image", "animals/image"):
        for leaf in (fed["tasks"][key]["base"]["top1"], fed["tasks"][key]["novel"]["top1"], fed["tasks"][key]["hm"]):
            assert leaf["n"] == 2 and 0.0 <= leaf["mean"] <= 1.0 and leaf["std"] >= 0.0  # two seeds
        assert 0.0 <= fed["tasks"][key]["base"]["ece"]["mean"] <= 1.0
    for seed in ("0", "1"):  # the summary is the mean of the seeds' own numbers
        runs = doc["seeds"][seed]["methods"]["federated"]["tasks"]["digits/image"]
        b, n = runs["base"]["top1"], runs["novel"]["top1"]
        assert runs["hm"] == pytest.approx(0 if b + n == 0 else 2 * b * n / (b + n))
    hms = [doc["seeds"][s]["methods"]["federated"]["tasks"]["digits/image"]["hm"] for s in ("0", "1")]
    assert fed["tasks"]["digits/image"]["hm"]["mean"] == pytest.approx(sum(hms) / 2)
    assert set(fed["unseen"]) == {"digits/image/2", "animals/image/2"}
    assert set(fed["transfer"]) == {"animals→photos"}
    assert set(fed["means"]["modality"]) == {"image"}
    assert fed["means"]["clients_local"]["n"] == 2
    facts = doc["protocol"]
    assert facts["selection"] == "best_val" and facts["seeds"] == [0, 1]
    assert [t["base"] + t["novel"] for t in facts["tasks"]] == [10, 10]
    assert [(t["clients"], t["unseen"]) for t in facts["tasks"]] == [(2, 1), (2, 1)]
    report = (out / "report.md").read_text()
    for heading in ("## Protocol", "Base-to-novel", "Calibration", "Per modality", "Local vs global", "Unseen clients"):
        assert heading in report
    assert "test data are never read to choose" in report and "± " in report
    for seed in (0, 1):
        for run in ("federated", "centralised"):
            rows = list(csv.DictReader((out / f"seed_{seed}" / run / "metrics.csv").open()))
            assert {"val", "test", "test_novel"} <= {r["split"] for r in rows}
        assert (out / f"seed_{seed}" / "federated" / "best.safetensors").is_file()
    # an evaluation is not overwritten by accident
    assert _evaluate("-c", str(recipe), "--output_dir", str(out)) == 2


SMALL = """
backbone: {model_name: mmfl-tiny}
tasks:
  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 2, shots: 4, max_test_examples: 40}
parts:
  - class_path: mmfl.prompts.CoOp
    init_args: {n_ctx: 2, scope: task}
training: {accelerator: cpu, max_steps: 2}
federation: {rounds: 2}
"""


def test_a_checkpoint_is_scored_as_training_scored_it(tmp_path: Path) -> None:
    recipe = tmp_path / "small.yaml"
    recipe.write_text(SMALL + "evaluation: {baselines: [], seeds: [3]}\n")
    run = tmp_path / "run"
    assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(run), "--seed=3"]) == 0
    out = tmp_path / "eval"
    ckpt = run / "global.safetensors"
    assert _evaluate("-c", str(recipe), "--seed=3", "--checkpoint", str(ckpt), "--output_dir", str(out)) == 0
    doc = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    last = [r for r in rows if r["round"] == "2" and r["level"] == "task" and r["split"] == "test"]
    top1 = doc["seeds"]["3"]["methods"]["federated"]["tasks"]["digits/image"]["base"]["top1"]
    assert top1 == pytest.approx(float(last[0]["accuracy"]), abs=1e-6)  # same state, same test split
    assert doc["seeds"]["3"]["facts"]["federated_checkpoint"] == str(ckpt)
    assert not (out / "seed_3").exists()  # nothing was trained
    assert list(doc["summary"]) == ["federated"]

    # a checkpoint of another recipe is refused, naming what does not fit
    other = tmp_path / "other.yaml"
    other.write_text(SMALL.replace("scope: task", "scope: global") + "evaluation: {baselines: [], seeds: [3]}\n")
    assert _evaluate("-c", str(other), "--seed=3", "--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "x")) == 2


@pytest.mark.parametrize(
    ("extra", "args", "message"),
    [
        ("evaluation: {selection: best_val}", [], "val_fraction is 0"),
        ("evaluation: {unseen_clients: 2}", [], "leaves task 'digits'"),
        ("evaluation: {seeds: [1, 2]}", ["--checkpoint", "CKPT"], "not among evaluation.seeds"),
        ("", ["--checkpoint", "MISSING"], "no trainable-state file"),
        ("", ["--checkpoint", "CORRUPT"], "not a valid safetensors file"),
        (
            "evaluation: {transfer: [{source: letters, task: {name: p, data: {class_path: mmfl.data.SkimagePhotos}}}]}",
            [],
            "not a task of the recipe",
        ),
        ("evaluation: {variants: [{name: federated, knowledge: {text: 8}}]}", [], "is a built-in method's name"),
        ("evaluation: {variants: [{name: a, knowledge: {text: 1}}, {name: a, knowledge: {text: 2}}]}", [], "another"),
        ("evaluation: {variants: [{name: a/b, knowledge: {text: 1}}]}", [], "names a folder"),
        ("evaluation: {variants: [{name: a}]}", [], "changes nothing"),
        ("evaluation: {variants: [{name: a, knowledge: {text: -1}}]}", [], "variants.0 (a): training.knowledge"),
        (
            "evaluation: {variants: [{name: a, parts: [{class_path: mmfl.prompts.PromptGenerator, "
            "init_args: {scope: galaxy}}]}]}",
            [],
            "evaluation.variants.0.parts.0 (mmfl.prompts.PromptGenerator) scope",
        ),
    ],
)
def test_bad_input_is_reported_before_any_model(extra, args, message, tmp_path, capsys, no_backbone) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SMALL + extra + "\n")
    save_file({"task/digits/coop.ctx": torch.zeros(2, 64)}, tmp_path / "ckpt.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    paths = {
        "CKPT": str(tmp_path / "ckpt.safetensors"),
        "MISSING": str(tmp_path / "none.safetensors"),
        "CORRUPT": str(tmp_path / "corrupt.safetensors"),
    }
    args = [paths.get(a, a) for a in args]
    out = tmp_path / "eval"
    assert _evaluate("-c", str(recipe), "--output_dir", str(out), *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_variants_are_trained_and_scored_beside_the_recipe_with_the_same_protocol(tmp_path: Path) -> None:
    """A variant that changes nothing in effect (a setting of a term whose weight is 0) is trained and scores exactly
    as the recipe's own method; one that changes only scoring (``unseen_blend``) is not trained again: it scores the
    recipe's trained state, the base classes as it does, the novel ones otherwise; a prompt generator trained on the
    base classes scores the novel ones and the transfer target; the report lists each variant with what it changes."""
    recipe = tmp_path / "v.yaml"
    recipe.write_text(
        B2N.replace("seeds: [0, 1]", "seeds: [0]\n  baselines: [zeroshot]").replace("mmfl-mini", "mmfl-tiny")
        + "  variants:\n"
        + "    - {name: same, knowledge: {text: 0, anchor_source: merged}}\n"
        + "    - {name: blend, knowledge: {unseen_blend: 0.5}}\n"
        + "    - name: generator\n"
        + "      parts: [{class_path: mmfl.prompts.PromptGenerator, init_args: {depth: 1}}]\n"
        + "      optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.01}}\n"
    )
    out = tmp_path / "eval"
    assert _evaluate("-c", str(recipe), "--output_dir", str(out)) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["summary"]) == ["zeroshot", "federated", "same", "blend", "generator"]
    methods = doc["seeds"]["0"]["methods"]
    assert methods["same"] == methods["federated"] and (out / "seed_0" / "same").is_dir()
    blend, fed = methods["blend"]["tasks"]["digits/image"], methods["federated"]["tasks"]["digits/image"]
    assert not (out / "seed_0" / "blend").exists()  # scored with the recipe's trained state
    assert blend["base"] == fed["base"] and blend["novel"] != fed["novel"]
    facts = doc["seeds"]["0"]["facts"]
    assert facts["blend_selected_round"] == facts["federated_selected_round"]
    gen = methods["generator"]
    assert 0.0 <= gen["tasks"]["digits/image"]["novel"]["top1"] <= 1.0 and "animals→photos" in gen["transfer"]
    assert gen != methods["federated"]
    state = load_file(out / "seed_0" / "generator" / "best.safetensors")
    assert state and all(k.startswith("global/generator.") for k in state)
    report = (out / "report.md").read_text()
    assert "- variant `same`: the recipe with knowledge anchor_source merged" in report
    assert "- variant `blend`: the recipe with knowledge unseen_blend 0.5" in report
    assert "- variant `generator`: the recipe with parts PromptGenerator(depth=1); optimizer SGD(lr=0.01)" in report
    table = report.split("## Base-to-novel top-1 (%)")[1].split("\n\n")[1].splitlines()
    assert [line.split(" | ")[0] for line in table if not line.startswith("|---")] == [
        "| method",
        "| zero-shot (one template)",
        "| federated (this recipe)",
        "| variant `same`",
        "| variant `blend`",
        "| variant `generator`",
    ]


def test_variants_that_differ_only_in_scoring_are_found_before_training() -> None:
    from mmfl.evaluation.command import training_twins
    from mmfl.recipe import lists_replace

    variants = (
        "[{name: zero, knowledge: {text: 0}}, {name: k, knowledge: {text: 1}},"
        " {name: kb, knowledge: {text: 1, unseen_blend: 0.5}}, {name: b, knowledge: {unseen_blend: 1}},"
        " {name: opt, optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.01}}},"
        " {name: optb, knowledge: {unseen_blend: 0.5},"
        " optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.01}}},"
        " {name: gen, knowledge: {unseen_blend: 0.5}, parts: [{class_path: mmfl.prompts.PromptGenerator}]}]"
    )
    recipe = Path(__file__).parent.parent / "recipes" / "base_to_novel.yaml"
    argv = ["evaluate", "-c", str(recipe), f"--evaluation.variants={variants}"]
    cfg = cli.build_parser().parse_args(lists_replace(argv))  # as `mmfl evaluate` parses it: the list replaced
    # the recipe sets no knowledge: `zero` (weights 0) and `b` (scoring only) train as it does; `kb` as `k`
    assert training_twins(cfg.evaluate) == {"zero": "federated", "kb": "k", "b": "federated", "optb": "opt"}


def _localised(recipe: Path, tmp_path: Path) -> Path:
    """The hub recipe with its hub pieces swapped for local ones, and tiny sizes."""
    cfg = yaml.safe_load(recipe.read_text())
    local = ["mmfl.data.SklearnDigits", "mmfl.data.AnimalSilhouettes", "mmfl.data.SklearnDigits"]
    cfg["backbone"] = {"model_name": "mmfl-tiny"}
    for i, task in enumerate(cfg["tasks"]):
        task["data"] = {"class_path": local[i % len(local)]}
        task.update(shots=2, max_test_examples=20)
        if "partitioner" in task:
            task["partitioner"]["init_args"]["min_partition_size"] = 0
    for tr in cfg["evaluation"].get("transfer", []):
        tr["task"]["data"] = {"class_path": "mmfl.data.SkimagePhotos"}
    cfg["training"].update(accelerator="cpu", precision="32-true", max_steps=1)
    cfg["federation"].update(rounds=1)
    cfg["evaluation"]["seeds"] = cfg["evaluation"]["seeds"][:1]
    out = tmp_path / recipe.name
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.parametrize("recipe", HUB, ids=[r.stem for r in HUB])
def test_hub_recipes_parse_and_run_with_local_pieces(recipe: Path, tmp_path: Path, monkeypatch) -> None:
    parser = cli.build_parser()
    cfg = parser.parse_args(["evaluate", "-c", str(recipe)])
    sub = parser._subcommands_action._name_parser_map["evaluate"]
    _, tasks, federation = cli.check_recipe(sub, cfg.evaluate)  # instantiates everything; nothing is downloaded
    assert cfg.evaluate.backbone.model_name == "ViT-B-16" and cfg.evaluate.backbone.pretrained == "openai"
    assert all(type(t.data).__name__ == "HubDataset" for t in tasks) and federation.rounds >= 20
    out = tmp_path / "eval"
    assert _evaluate("-c", str(_localised(recipe, tmp_path)), "--output_dir", str(out)) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert "federated" in doc["summary"] and (out / "report.md").is_file()
