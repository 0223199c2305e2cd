"""Pictures of a run: ``mmfl fit`` draws accuracy_per_round.png from its metrics.csv; ``mmfl plot`` redraws it."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from mmfl import cli, plots

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
