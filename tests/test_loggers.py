"""Recipe ``loggers``: Lightning loggers receive each round's metrics, the round as the step."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import open_clip
import pytest

from mmfl import cli
from mmfl.federated.run_loggers import round_metrics

RECIPE = (
    "backbone: {model_name: mmfl-tiny}\n"
    "tasks:\n"
    "  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 2, max_test_examples: 30}\n"
    "  - {name: animals, data: {class_path: mmfl.data.AnimalSilhouettes}, clients: 2, max_test_examples: 30}\n"
    "parts:\n  - class_path: mmfl.prompts.CoOp\n    init_args: {n_ctx: 2}\n"
    "training: {accelerator: cpu, max_steps: 1}\nfederation: {rounds: 2}\n"
    "loggers:\n"
    "  - class_path: TensorBoardLogger\n"
    "  - {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {name: csv}}\n"
)


def test_tensorboard_and_csv_loggers_hold_one_accuracy_per_round_per_task(tmp_path: Path) -> None:
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    run = tmp_path / "run"
    assert cli.main(["fit", "-c", str(tmp_path / "recipe.yaml"), "--output_dir", str(run)]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    want = {
        (r["task"], int(r["round"])): float(r["accuracy"])
        for r in rows
        if r["level"] == "task" and r["split"] == "test"
    }
    events = list((run / "lightning_logs").rglob("events.out.tfevents.*"))  # save_dir: the run folder
    assert len(events) == 1
    ea = ea_mod.EventAccumulator(str(events[0]))
    ea.Reload()
    for task in ("digits", "animals"):
        got = [(e.step, e.value) for e in ea.Scalars(f"test_acc/{task}/image")]
        assert [s for s, _ in got] == [0, 1, 2]  # one scalar per round, round 0 = zero-shot
        assert all(v == pytest.approx(want[task, s], abs=1e-6) for s, v in got)
    sent = sum(float(r["value"]) for r in rows if r["level"] == "traffic" and r["round"] == "2")
    assert ea.Scalars("bytes_sent/total")[-1].value == pytest.approx(sent)
    assert {e.step for e in ea.Scalars("client/digits/image/0/fit_loss")} == {1, 2}
    logged = list(csv.DictReader(next((run / "csv").rglob("metrics.csv")).open()))
    assert [(int(r["step"]), float(r["test_acc/animals/image"])) for r in logged] == [
        (s, pytest.approx(want["animals", s], abs=1e-6)) for s in (0, 1, 2)
    ]


def _row(rnd, level, split, task="t", client="", loss=math.nan, acc=math.nan, examples=0, value=math.nan) -> dict:
    return {"round": rnd, "level": level, "task": task, "modality": "image", "client": client, "split": split,
            "loss": loss, "accuracy": acc, "examples": examples, "value": value}  # fmt: skip


def test_round_metrics_against_hand_computed_values() -> None:
    rows = [
        _row(1, "client", "fit", client="t/image/0", loss=1.0, acc=0.5, examples=10),
        _row(1, "client", "fit", client="t/image/1", loss=4.0, acc=1.0, examples=30),
        _row(1, "client", "fit_failed", client="t/image/2"),
        _row(1, "traffic", "sent", value=800),
        _row(1, "traffic", "sent", task="u", value=200),
        _row(1, "server", "privacy", task="", value=2.5),
        _row(1, "task", "test", loss=0.7, acc=0.6),
        _row(1, "task", "test_novel", acc=0.3),  # a nan loss is left out
        _row(2, "task", "test", loss=9.0, acc=0.9),  # another round
    ]
    assert round_metrics(rows, 1) == {
        "client/t/image/0/fit_loss": 1.0,
        "client/t/image/0/fit_acc": 0.5,
        "client/t/image/1/fit_loss": 4.0,
        "client/t/image/1/fit_acc": 1.0,
        "fit_loss/t/image": (1.0 * 10 + 4.0 * 30) / 40,
        "fit_acc/t/image": (0.5 * 10 + 1.0 * 30) / 40,
        "bytes_sent/t/image": 800.0,
        "bytes_sent/u/image": 200.0,
        "bytes_sent/total": 1000.0,
        "epsilon": 2.5,
        "test_acc/t/image": 0.6,
        "test_loss/t/image": 0.7,
        "test_novel_acc/t/image": 0.3,
    }


@pytest.mark.parametrize(
    ("loggers", "message"),
    [
        ("[{class_path: NoSuchLogger}]", "no class 'NoSuchLogger'"),
        ("[{class_path: torch.nn.Linear}]", "is not a lightning.pytorch.loggers.Logger"),
        ("[{class_path: CSVLogger, init_args: {bogus: 1}}]", "loggers[0] CSVLogger"),
        ("[{class_path: CSVLogger, init_arg: {}}]", "loggers[0] must be {class_path"),
        ("[TensorBoardLogger]", 'Parser key "loggers"'),  # jsonargparse's own type check
    ],
)
def test_a_bad_logger_is_reported_before_any_model_or_output(loggers, message, tmp_path, capsys, monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    args = ["fit", "-c", str(tmp_path / "recipe.yaml"), "--output_dir", str(tmp_path / "o"), f"--loggers={loggers}"]
    try:
        code = cli.main(args)
    except SystemExit as e:  # the parser's report
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
