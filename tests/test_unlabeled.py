"""Unlabeled clients: pseudo-label choice by hand, labels never read, metrics apart, clear errors."""

from __future__ import annotations

import functools
import math

import datasets
import pytest
import torch

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.data.feature_cache import example_digest
from mmfl.data.sources import DataSource
from mmfl.data.splits import LABEL
from mmfl.federated import Federation, LocalTraining, Simulation
from mmfl.federated.pseudo_labels import PseudoLabels, pseudo_label_summary, select_pseudo_labels
from mmfl.prompts import CoOp


def test_pseudo_labels_by_hand() -> None:
    probs = torch.tensor(
        [
            [0.90, 0.05, 0.05],  # 0: class 0, 0.90
            [0.60, 0.30, 0.10],  # 1: class 0, 0.60
            [0.95, 0.03, 0.02],  # 2: class 0, 0.95
            [0.20, 0.70, 0.10],  # 3: class 1, 0.70
            [0.10, 0.40, 0.50],  # 4: class 2, 0.50
            [0.90, 0.05, 0.05],  # 5: class 0, 0.90 (ties with 0: the lower index first)
        ]
    )
    index, labels = select_pseudo_labels(probs, top_k=2, threshold=0.0)
    assert index.tolist() == [0, 2, 3, 4] and labels.tolist() == [0, 0, 1, 2]  # class 0: 0.95 (2), then 0 before 5
    index, labels = select_pseudo_labels(probs, top_k=None, threshold=0.65)
    assert index.tolist() == [0, 2, 3, 5] and labels.tolist() == [0, 0, 1, 0]
    index, _ = select_pseudo_labels(probs, top_k=1, threshold=0.99)
    assert index.tolist() == []
    s = pseudo_label_summary(probs, torch.tensor([0, 2, 3, 4]))
    assert s == {"kept": 4.0, "of": 6.0, "confidence": pytest.approx((0.9 + 0.95 + 0.7 + 0.5) / 4), "classes": 3.0}
    assert math.isnan(pseudo_label_summary(probs, torch.tensor([], dtype=torch.long))["confidence"])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="labeled_fraction must be in"):
        prepare_task(Task("d", SklearnDigits(), clients=2, labeled_fraction=1.5))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        PseudoLabels(top_k=0).check()
    with pytest.raises(ValueError, match="threshold must be in"):
        PseudoLabels(threshold=1.0).check()


class _Relabeled(DataSource):
    """The digits, with the labels of the training examples whose image is in ``changed`` shifted by one."""

    def __init__(self, changed: set[bytes]) -> None:
        super().__init__("image", "label")
        self.changed = changed

    def load(self) -> datasets.DatasetDict:
        dd = SklearnDigits().load()
        train = dd["train"]
        images = train.with_format("arrow")["image"].to_pylist()
        labels = [
            (y + 1) % 10 if example_digest(x) in self.changed else y
            for x, y in zip(images, train["label"], strict=True)
        ]
        dd["train"] = train.remove_columns(["label"]).add_column("label", labels, feature=train.features["label"])
        return dd


def _task(source: DataSource) -> Task:
    return Task("digits", source, clients=4, labeled_fraction=0.5, shots=4, max_test_examples=60)


def _sim(bb: Backbone, task, **pseudo) -> Simulation:
    training = LocalTraining(
        max_steps=3,
        batch_size=16,
        accelerator="cpu",
        feature_cache="memory",
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        pseudo_labels=PseudoLabels(**pseudo),
    )
    parts = [functools.partial(CoOp, n_ctx=2)]
    return Simulation(bb, [task], parts, training, Federation(rounds=2), seed=0)


def test_an_unlabeled_client_never_reads_the_labels_its_data_carry(tiny_backbone: Backbone) -> None:
    task = prepare_task(_task(SklearnDigits()))
    labeled = [c for c in task.clients if c.labeled]
    unlabeled = [c for c in task.clients if not c.labeled]
    assert len(labeled) == 2 and len(unlabeled) == 2
    assert all(LABEL not in c.train.column_names for c in unlabeled)  # gone before the client holds its data
    assert all(LABEL in c.train.column_names and len(c.train) <= 4 * 10 for c in labeled)  # shots: labeled only
    assert all(len(c.train) > 40 and c.classes() is None for c in unlabeled)  # their whole partition
    # the same data with every label an unlabeled client holds changed: the run must not change at all
    mine = {example_digest(x) for c in unlabeled for x in c.train.with_format("arrow")["image"].to_pylist()}
    theirs = {example_digest(x) for c in labeled for x in c.train.with_format("arrow")["image"].to_pylist()}
    changed = prepare_task(_task(_Relabeled(mine - theirs)))
    assert [len(c.train) for c in changed.clients] == [len(c.train) for c in task.clients]
    runs = []
    for t in (task, changed):
        sim = _sim(tiny_backbone, t, top_k=5, threshold=0.0)
        sim.run()
        runs.append((sim.global_state, sim.metrics.rows))
    (a, rows_a), (b, rows_b) = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["accuracy"] for r in rows_a if r["split"] == "test"] == [
        r["accuracy"] for r in rows_b if r["split"] == "test"
    ]


def test_pseudo_labels_come_from_the_merged_model_and_are_reported_apart(tiny_backbone: Backbone) -> None:
    task = prepare_task(_task(SklearnDigits()))
    sim = _sim(tiny_backbone, task, top_k=3, threshold=0.0)
    client = next(c for c in sim.clients if not c.data.labeled)
    module = client.module
    module.load_trainable_state_dict(sim.global_state)
    chosen, summary = sim.pseudo_labeled(module, client.data.train)
    # by hand: the merged model's predictions on the client's data, the 3 most confident per predicted class
    logits = torch.cat([b for b, _ in sim._trainer().predict(module, sim._loader(module, client.data.train, False))])
    probs = logits.softmax(-1)
    index, labels = select_pseudo_labels(probs, 3, 0.0)
    assert chosen[LABEL] == labels.tolist() and summary["kept"] == len(index) <= 3 * 10
    assert summary["of"] == len(client.data.train)
    sim.run()
    rows = sim.metrics.rows
    for rnd in (1, 2):
        fit = [r for r in rows if r["round"] == rnd and r["split"] == "fit"]
        unl = [r for r in rows if r["round"] == rnd and r["split"] == "fit_unlabeled"]
        pseudo = [r for r in rows if r["round"] == rnd and r["split"] == "pseudo_labels"]
        assert {r["client"] for r in fit} == {c.data.cid for c in sim.clients if c.data.labeled}
        assert (
            {r["client"] for r in unl}
            == {r["client"] for r in pseudo}
            == {c.data.cid for c in sim.clients if not c.data.labeled}
        )
        assert all(0 < r["examples"] <= 30 and 0 < r["value"] <= 1 and "classes" in r["note"] for r in pseudo)
        assert [r["examples"] for r in unl] == [r["examples"] for r in pseudo]  # weighted by what they kept


def test_no_confident_prediction_sits_the_round_out(tiny_backbone: Backbone, caplog) -> None:
    task = prepare_task(_task(SklearnDigits()))
    sim = _sim(tiny_backbone, task, top_k=3, threshold=0.999999)
    sim.run_round(1)
    failed = [r for r in sim.metrics.rows if r["split"] == "fit_failed"]
    assert len(failed) == 2 and all("NoPseudoLabels" in r["note"] and "threshold" in r["note"] for r in failed)
    assert {r["split"] for r in sim.metrics.rows if r["level"] == "client"} == {"fit", "fit_failed"}


RESUMABLE = """\
seed: 2
backbone: {model_name: mmfl-tiny}
tasks:
  - name: digits
    data: {class_path: mmfl.data.SklearnDigits}
    clients: 4
    labeled_fraction: 0.5
    shots: 4
    max_test_examples: 40
parts:
  - class_path: mmfl.prompts.CoOp
    init_args: {n_ctx: 2}
  - class_path: mmfl.prompts.BackboneProjections
    init_args: {keep: 0.5}
training:
  max_steps: 2
  batch_size: 8
  optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.05}}
  accelerator: cpu
  pseudo_labels: {top_k: 4, threshold: 0.0}
federation: {rounds: 1}
"""


def test_a_run_with_unlabeled_clients_and_backbone_projections_resumes_exactly(tmp_path) -> None:
    from mmfl import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RESUMABLE)
    assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(tmp_path / "a")]) == 0
    assert cli.main(["fit", "-c", str(recipe), "--output_dir", str(tmp_path / "ref"), "--federation.rounds=3"]) == 0
    assert cli.main(["fit", "-c", str(recipe), "--resume", str(tmp_path / "a"), "--federation.rounds=3"]) == 0
    for name in ("global.safetensors", "metrics.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    rows = (tmp_path / "a" / "metrics.csv").read_text()
    assert rows.count(",pseudo_labels,") == 2 * 3 and ",fit_failed," not in rows
