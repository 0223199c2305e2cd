"""`mmfl choose`: per (task, modality), the run whose kept state scores highest on the group's validation split —
read from hand-made run folders (exact figures) and from real runs of `mmfl fit`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from mmfl import cli
from mmfl.choose import ChooseError, RunScores, choose, group_state, run_choose, run_scores
from mmfl.federated.checkpoint import save_state
from mmfl.federated.metrics import COLUMNS

GROUPS = [("digits", "image", 2), ("animals", "image", 1), ("animals", "audio", 1)]


def _row(rnd: int, level: str, task: str, modality: str, split: str, acc: float) -> dict:
    return dict.fromkeys(COLUMNS, "") | {
        "round": rnd, "level": level, "task": task, "modality": modality, "split": split, "accuracy": acc
    }  # fmt: skip


def _folder(
    path: Path, val: dict, test: dict, selection: str = "last", seed: int = 0, files: dict | None = None
) -> Path:
    """A finished run folder: its config.yaml, metrics.csv rows of level ``task`` (``val`` / ``test``: accuracy per
    (round, group)) and state files (name → (metadata, tensors)); 2 rounds by default."""
    path.mkdir(parents=True)
    tasks = [{"name": t, "modality": m, "clients": n} for t, m, n in GROUPS]
    config = {"seed": seed, "tasks": tasks, "evaluation": {"selection": selection}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    with (path / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for t, m, n in GROUPS:  # each client's training row
            for i in range(n):
                w.writerow(_row(1, "client", t, m, "fit", 0.5) | {"client": f"{t}/{m}/{i}"})
        for split, accs in (("val", val), ("test", test)):
            for (rnd, level, g), acc in accs.items():
                w.writerow(_row(rnd, level, *g.split("/"), split, acc))
    state = {
        "global/coop.ctx": torch.zeros(2),
        "task/digits/coop.ctx": torch.ones(2),
        "task/animals/coop.ctx": torch.full((2,), 2.0),
        "modality/audio/proj.w": torch.full((3,), 3.0),
        "task_modality/animals/audio/proj.w": torch.full((3,), 4.0),
    }
    files = files or {"global.safetensors": ({"round": "2", "rounds": "2"}, state)}
    for name, (meta, tensors) in files.items():
        save_state(path / name, tensors, meta)
    return path


def _flat(accs: dict[str, float], rnd: int = 2, level: str = "task") -> dict:
    return {(rnd, level, g): a for g, a in accs.items()}


def test_each_group_keeps_the_run_with_the_highest_validation_accuracy_ties_to_the_first() -> None:
    a = RunScores(Path("a"), "global.safetensors", {"x/image": 0.5, "y/audio": 0.3, "z/text": 0.7}, {})
    b = RunScores(Path("b"), "global.safetensors", {"x/image": 0.4, "y/audio": 0.6, "z/text": 0.7}, {})
    c = RunScores(Path("c"), "global.safetensors", {"x/image": 0.5, "y/audio": 0.1, "z/text": 0.9}, {})
    assert choose([a, b]) == {"x/image": 0, "y/audio": 1, "z/text": 0}  # z: equal, the first named
    assert choose([b, a]) == {"x/image": 1, "y/audio": 0, "z/text": 0}
    assert choose([a, b, c]) == {"x/image": 0, "y/audio": 1, "z/text": 2}


def test_a_groups_tensors_are_those_of_its_scopes() -> None:
    state = {
        k: torch.zeros(1)
        for k in (
            "global/a.x",
            "task/digits/a.x",
            "task/digitsx/a.x",  # another task whose name starts the same
            "modality/audio/b.x",
            "modality/image/b.x",
            "task_modality/digits/audio/c.x",
            "task_modality/digits/image/c.x",
        )
    }
    assert sorted(group_state(state, "digits", "audio")) == [
        "global/a.x",
        "modality/audio/b.x",
        "task/digits/a.x",
        "task_modality/digits/audio/c.x",
    ]


def test_the_scores_are_those_of_the_state_the_runs_selection_keeps(tmp_path: Path) -> None:
    g = [f"{t}/{m}" for t, m, _ in GROUPS]
    val = _flat(dict(zip(g, [0.1, 0.2, 0.3], strict=True)), 1) | _flat(dict(zip(g, [0.9, 0.9, 0.9], strict=True)), 2)
    val |= _flat(dict(zip(g, [0.5, 0.6, 0.7], strict=True)), 2, "average")
    test = _flat(dict(zip(g, [0.15, 0.25, 0.35], strict=True)), 1) | _flat(dict.fromkeys(g, 0.8), 2)
    test |= _flat(dict(zip(g, [0.55, 0.65, 0.75], strict=True)), 2, "average")
    s = {"global/coop.ctx": torch.zeros(2)}
    files = {
        "global.safetensors": ({"round": "2", "rounds": "2"}, s),
        "best.safetensors": ({"round": "1", "val_accuracy": "0.2"}, s),  # best_val kept round 1
        "average.safetensors": ({"rounds": "1-2"}, s),
    }
    run = _folder(tmp_path / "best", val, test, selection="best_val", files=files)
    best = run_scores(run)
    assert best.state == "best.safetensors"
    assert best.val == {"digits/image": 0.1, "animals/image": 0.2, "animals/audio": 0.3}
    assert best.test == {"digits/image": 0.15, "animals/image": 0.25, "animals/audio": 0.35}
    assert run_scores(run, "last").val == dict.fromkeys(g, 0.9)
    assert run_scores(run, "average").val == {"digits/image": 0.5, "animals/image": 0.6, "animals/audio": 0.7}
    files["best.safetensors"] = ({"round": "2", "average_of_rounds": "1–2"}, s)  # best_val kept the average
    again = _folder(tmp_path / "best-average", val, test, selection="best_val", files=files)
    assert run_scores(again).test == {"digits/image": 0.55, "animals/image": 0.65, "animals/audio": 0.75}


def test_choose_writes_each_groups_tensors_from_its_kept_run(tmp_path: Path) -> None:
    same = _folder(
        tmp_path / "same",
        _flat({"digits/image": 0.8, "animals/image": 0.7, "animals/audio": 0.4}),
        _flat({"digits/image": 0.81, "animals/image": 0.71, "animals/audio": 0.41}),
    )
    shared = _folder(
        tmp_path / "shared",
        _flat({"digits/image": 0.8, "animals/image": 0.6, "animals/audio": 0.5}),
        _flat({"digits/image": 0.79, "animals/image": 0.61, "animals/audio": 0.52}),
        files={
            "global.safetensors": (
                {"round": "2", "rounds": "2"},
                {"task/animals/coop.ctx": torch.full((2,), 7.0), "modality/audio/proj.w": torch.full((3,), 8.0)},
            )
        },
    )
    out = tmp_path / "chosen"
    assert cli.main(["choose", str(same), str(shared), "--output", str(out)]) == 0
    result = json.loads((out / "choice.json").read_text())
    kept = {g: Path(r["run"]).name for g, r in result["groups"].items()}
    assert kept == {"digits/image": "same", "animals/image": "same", "animals/audio": "shared"}  # digits: a tie
    assert list(result["groups"]) == ["digits/image", "animals/image", "animals/audio"]  # the runs' order
    assert [r["clients"] for r in result["groups"].values()] == [2, 1, 1]
    assert result["groups"]["animals/audio"]["val"] == [0.4, 0.5]
    assert result["groups"]["animals/audio"]["test"] == [0.41, 0.52]
    audio = load_file(out / "animals" / "audio.safetensors")
    assert sorted(audio) == ["modality/audio/proj.w", "task/animals/coop.ctx"]
    assert audio["task/animals/coop.ctx"].tolist() == [7.0, 7.0]  # the shared run's, not the same run's 2.0
    image = load_file(out / "animals" / "image.safetensors")
    assert sorted(image) == ["global/coop.ctx", "task/animals/coop.ctx"]
    assert image["task/animals/coop.ctx"].tolist() == [2.0, 2.0]
    assert sorted(load_file(out / "digits" / "image.safetensors")) == ["global/coop.ctx", "task/digits/coop.ctx"]
    before = (out / "choice.json").read_bytes()
    with pytest.raises(ChooseError, match="already holds a choice"):  # nothing written is lost
        run_choose([str(same), str(shared)], str(out))
    assert (out / "choice.json").read_bytes() == before


def test_runs_that_cannot_be_compared_are_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    accs = _flat({"digits/image": 0.5, "animals/image": 0.5, "animals/audio": 0.5})
    a = _folder(tmp_path / "a", accs, accs)
    other_seed = _folder(tmp_path / "seed1", accs, accs, seed=1)
    no_val = _folder(tmp_path / "no-val", {}, accs)
    unfinished = _folder(tmp_path / "unfinished", accs, accs)
    (unfinished / "global.safetensors").unlink()
    out = tmp_path / "out"
    cases = [
        ([str(a)], "at least two run folders"),
        ([str(a), str(a)], "given twice"),
        ([str(a), str(tmp_path / "nothing")], "no config.yaml"),
        ([str(a), str(other_seed)], "seed 1"),
        ([str(a), str(no_val)], "no validation scores for animals/audio, animals/image, digits/image"),
        ([str(a), str(unfinished)], "has not finished"),
    ]
    for runs, message in cases:
        assert cli.main(["choose", *runs, "--output", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["choose", str(a), str(other_seed), "--output", str(a)]) == 2
    assert "is one of the runs" in capsys.readouterr().err
    assert cli.main(["choose", str(a), str(no_val), "--output", str(out), "--state", "best"]) == 2
    assert "has no best.safetensors" in capsys.readouterr().err
    assert not out.exists()


TINY = """
backbone: {model_name: mmfl-tiny}
tasks:
  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 2, shots: 4, max_test_examples: 30}
  - {name: animals, data: {class_path: mmfl.data.AnimalSilhouettes}, clients: 1, shots: 4, max_test_examples: 30}
parts:
  - class_path: mmfl.prompts.CoOp
    init_args: {n_ctx: 2, scope: SCOPE}
training: {accelerator: cpu, max_steps: 2}
federation: {rounds: 2}
evaluation: {val_fraction: 0.3, selection: best_val}
"""


def _val_at_best(run: Path, task: str, modality: str) -> float:
    """The validation accuracy of the group in the round the run's best.safetensors names (read independently)."""
    with safe_open(str(run / "best.safetensors"), "pt") as f:
        rnd = f.metadata()["round"]
    with (run / "metrics.csv").open() as f:
        (acc,) = [
            float(x["accuracy"])
            for x in csv.DictReader(f)
            if (x["round"], x["level"], x["task"], x["modality"], x["split"]) == (rnd, "task", task, modality, "val")
        ]
    return acc


def test_two_real_runs_of_one_recipe_with_different_scopes(tmp_path: Path) -> None:
    runs = []
    for scope in ("task", "global"):
        recipe = tmp_path / f"{scope}.yaml"
        recipe.write_text(TINY.replace("SCOPE", scope))
        runs.append(tmp_path / scope)
        assert cli.main(["-q", "fit", "-c", str(recipe), "--output_dir", str(runs[-1])]) == 0
    out = tmp_path / "chosen"
    assert cli.main(["-q", "choose", *map(str, runs), "--output", str(out)]) == 0
    result = json.loads((out / "choice.json").read_text())
    assert sorted(result["groups"]) == ["animals/image", "digits/image"]
    for g, r in result["groups"].items():
        task, modality = g.split("/")
        val = [_val_at_best(run, task, modality) for run in runs]
        assert r["val"] == val and r["state"] == "best.safetensors"
        assert r["run"] == str(runs[0] if val[0] >= val[1] else runs[1])
        kept = load_file(Path(r["run"]) / "best.safetensors")
        mine = load_file(out / task / f"{modality}.safetensors")
        assert len(mine) == 1 and mine.keys() == group_state(kept, task, modality).keys()
        for k in mine:
            assert torch.equal(mine[k], kept[k])
