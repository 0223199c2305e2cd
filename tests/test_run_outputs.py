"""What a run leaves for a person: accuracy_per_round.png drawn from metrics.csv (``mmfl plot`` redraws it), the
bytes its clients sent, and the summary table it ends with."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from safetensors.torch import load_file

from mmfl import cli, plots
from mmfl.federated.summary import human_bytes, human_duration, run_summary

RECIPE = (
    "backbone: {model_name: mmfl-tiny}\n"
    "tasks:\n  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 2, max_test_examples: 30}\n"
    "parts:\n  - class_path: mmfl.prompts.CoOp\n    init_args: {n_ctx: 2}\n"
    "training: {accelerator: cpu, max_steps: 1}\nfederation: {rounds: 2}\n"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("plot")
    (tmp / "recipe.yaml").write_text(RECIPE)
    assert cli.main(["fit", "-c", str(tmp / "recipe.yaml"), "--output_dir", str(tmp / "run")]) == 0
    return tmp / "run"


def test_fit_draws_the_accuracy_of_every_round_from_metrics_csv(run: Path) -> None:
    png = run / plots.PNG
    h, w, _ = mpimg.imread(png).shape
    assert (w, h) == (700, 400)
    curves = plots.read_curves([run / "metrics.csv"])
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r["level"] == "task" and r["split"] == "test"]
    assert curves.keys() == {("digits/image", "test")}
    assert {k: v[0] for k, v in curves["digits/image", "test"].items()} == {
        int(r["round"]): float(r["accuracy"]) for r in rows
    }
    assert sorted(curves["digits/image", "test"]) == [0, 1, 2]  # round 0 = zero-shot


def test_plot_redraws_from_the_csv_and_follows_its_changes(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "metrics.csv").write_bytes((run / "metrics.csv").read_bytes())
    assert cli.main(["plot", str(copy)]) == 0
    assert (copy / plots.PNG).read_bytes() == (run / plots.PNG).read_bytes()  # same data, same picture
    rows = list(csv.DictReader((copy / "metrics.csv").open()))
    for r in rows:
        if r["level"] == "task":
            r["accuracy"] = "0.5"
    with (copy / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert cli.main(["plot", str(copy)]) == 0
    assert (copy / plots.PNG).read_bytes() != (run / plots.PNG).read_bytes()


def test_plot_of_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "is not a run folder of `mmfl fit`: it has no metrics.csv" in capsys.readouterr().err
    (tmp_path / "metrics.csv").write_text("round,level,task,modality,client,split,loss,accuracy,examples,value,note\n")
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "holds no test accuracy yet" in capsys.readouterr().err
    assert not (tmp_path / plots.PNG).exists()


def test_traffic_rows_count_the_bytes_of_every_reply(run: Path) -> None:
    state = load_file(run / "global.safetensors")
    per_client = sum(v.numel() * v.element_size() for v in state.values())  # what a digits client sends
    traffic = [r for r in csv.DictReader((run / "metrics.csv").open()) if r["level"] == "traffic"]
    assert [(r["round"], r["task"], r["split"], r["examples"]) for r in traffic] == [
        ("1", "digits", "sent", "2"),
        ("2", "digits", "sent", "2"),
    ]
    assert all(float(r["value"]) == 2 * per_client for r in traffic)


def _row(rnd, level, task, split, acc=float("nan"), value=float("nan")) -> dict:
    return {"round": rnd, "level": level, "task": task, "modality": "image", "split": split, "accuracy": acc,
            "value": value}  # fmt: skip


def test_summary_table_against_hand_written_rows() -> None:
    rows = [
        _row(0, "task", "digits", "test", 0.1),
        _row(0, "task", "digits", "test_novel", 0.2),
        _row(1, "client", "digits", "fit", 0.9),  # a client's row: not in the table
        _row(1, "traffic", "digits", "sent", value=1500),
        _row(1, "task", "digits", "test", 0.5),
        _row(1, "task", "digits", "test_novel", 0.25),
        _row(2, "traffic", "digits", "sent", value=998_500),
        _row(2, "task", "digits", "test", 0.4),
        _row(2, "task", "digits", "test_novel", 0.3),
    ]
    lines = run_summary(rows, best_round=1, seconds=75).splitlines()
    assert lines[0].split() == ["task/modality", "zero-shot", "final", "best", "round", "bytes", "sent"]
    assert lines[2].split() == ["digits/image", "10.0%", "40.0%", "(round", "2)", "1", "(50.0%)", "1.0", "MB"]
    assert lines[3].split() == ["digits/image", "novel", "20.0%", "30.0%", "(round", "2)", "1", "(25.0%)"]
    assert lines[4] == "sent by all clients: 1.0 MB; wall time 1 min 15 s"
    assert "validation" in lines[5]
    no_val = run_summary(rows[:5], best_round=None, seconds=2.25).splitlines()
    assert no_val[2].split()[-3:] == ["—", "1.5", "kB"] and no_val[-1].endswith("wall time 2.2 s")
    assert [human_bytes(n) for n in (999, 1000, 2.5e9, 7e12)] == ["999 B", "1.0 kB", "2.5 GB", "7000.0 GB"]
    assert [human_duration(s) for s in (12.4, 59.4, 59.6, 119.7, 3725)] == [
        "12 s", "59 s", "1 min 0 s", "2 min 0 s", "1 h 2 min"
    ]  # fmt: skip
    assert human_duration(2.25, decimals=1) == "2.2 s"


def test_summary_shows_the_averaged_state_and_when_validation_kept_it() -> None:
    rows = [
        _row(0, "task", "digits", "test", 0.1),
        _row(1, "task", "digits", "test", 0.5),
        _row(2, "task", "digits", "test", 0.4),
        _row(2, "average", "digits", "test", 0.45),  # the mean of rounds 1–2's states
        _row(2, "average", "digits", "val", 0.9),  # a validation row: not in the table
    ]
    lines = run_summary(rows, best_round=2, seconds=1, best_average="1–2").splitlines()
    assert lines[0].split() == ["task/modality", "zero-shot", "final", "averaged", "best", "round", "bytes", "sent"]
    assert lines[2].split() == [
        "digits/image",
        "10.0%",
        "40.0%",
        "(round",
        "2)",
        "45.0%",
        "avg",
        "1–2",
        "(45.0%)",
        "0",
        "B",
    ]
    assert lines[-1].startswith("averaged: the mean of the last rounds' states")
    kept_a_round = run_summary(rows, best_round=1, seconds=1).splitlines()
    assert kept_a_round[2].split()[5:8] == ["45.0%", "1", "(50.0%)"]
