"""Unlabeled clients: pseudo-label choice by hand, labels never read, metrics apart, clear errors."""

from __future__ import annotations

import functools
import math

import datasets
import pytest
import torch
import torch.nn.functional as F

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.data.feature_cache import example_digest
from mmfl.data.sources import DataSource
from mmfl.data.splits import ENCODED, LABEL
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


def test_random_pick_draws_among_the_confident_ones() -> None:
    """``pick="random"``: per predicted class, ``top_k`` of the predictions above the threshold, drawn with one
    ``torch.randperm`` per class (in class order) from the global generator — not the most confident ones."""
    probs = torch.tensor([[0.90, 0.05, 0.05], [0.60, 0.30, 0.10], [0.95, 0.03, 0.02], [0.20, 0.70, 0.10],
                          [0.10, 0.40, 0.50], [0.90, 0.05, 0.05]])  # fmt: skip
    # class 0: examples 0, 1, 2, 5 (0.90, 0.60, 0.95, 0.90); class 1: 3; class 2: 4
    torch.manual_seed(3)
    index, labels = select_pseudo_labels(probs, top_k=2, threshold=0.0, pick="random")
    torch.manual_seed(3)
    drawn = torch.tensor([0, 1, 2, 5])[torch.randperm(4)[:2]]  # class 0's draw; classes 1 and 2 keep their one
    assert index.tolist() == sorted([*drawn.tolist(), 3, 4])
    assert labels.tolist() == [{3: 1, 4: 2}.get(i, 0) for i in index.tolist()]
    # over seeds every confident example of class 0 is drawn, the least confident one (1, 0.60) included
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        seen |= set(select_pseudo_labels(probs, top_k=1, threshold=0.0, pick="random")[0].tolist())
    assert seen == {0, 1, 2, 3, 4, 5}
    # the threshold still decides who may be drawn; with room for all, the same set as the most confident pick
    # (and without a cap nothing is drawn: the global random stream is left as it was)
    torch.manual_seed(5)
    index, labels = select_pseudo_labels(probs, top_k=None, threshold=0.65, pick="random")
    assert index.tolist() == [0, 2, 3, 5] and labels.tolist() == [0, 0, 1, 0]
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))
    with pytest.raises(ValueError, match="pick must be 'most_confident' or 'random'"):
        select_pseudo_labels(probs, top_k=1, threshold=0.0, pick="top")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="labeled_fraction must be in"):
        prepare_task(Task("d", SklearnDigits(), clients=2, labeled_fraction=1.5))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        PseudoLabels(top_k=0).check()
    with pytest.raises(ValueError, match="threshold must be in"):
        PseudoLabels(threshold=1.0).check()
    with pytest.raises(ValueError, match="mixup must be >= 0"):
        PseudoLabels(mixup=-0.5).check()
    with pytest.raises(ValueError, match="start_round must be >= 1"):
        PseudoLabels(start_round=0).check()
    with pytest.raises(ValueError, match="pick must be 'most_confident' or 'random', got 'top'"):
        PseudoLabels(pick="top").check()


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


def _sim(bb: Backbone, task, per_client: bool = False, **pseudo) -> Simulation:
    training = LocalTraining(
        max_steps=3,
        batch_size=16,
        accelerator="cpu",
        feature_cache="memory",
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        pseudo_labels=PseudoLabels(**pseudo),
    )
    parts = [functools.partial(CoOp, n_ctx=2)]
    return Simulation(bb, [task], parts, training, Federation(rounds=2), seed=0, per_client_modules=per_client)


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


def test_mixup_mixes_each_feature_with_another_and_their_labels_alike(tiny_backbone: Backbone) -> None:
    sim = _sim(tiny_backbone, prepare_task(_task(SklearnDigits())), top_k=3, threshold=0.0, mixup=0.75)
    module = sim.clients[0].module
    torch.manual_seed(1)
    f = torch.randn(6, tiny_backbone.embed_dim)  # cached encodings of 6 inputs
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    batch = {ENCODED: f, LABEL: y}
    module.train()
    module.on_train_epoch_start()
    module.mixup = 0.75
    torch.manual_seed(7)
    loss = module._step(batch, module.train_acc, "train")
    # by hand: the same draws, λ folded to >= 0.5; features mixed, then the two labels' losses mixed alike
    torch.manual_seed(7)
    lam = torch.distributions.Beta(0.75, 0.75).sample((6,))
    lam = torch.maximum(lam, 1 - lam)
    perm = torch.randperm(6)
    assert (lam >= 0.5).all() and (lam < 1).all() and not torch.equal(perm, torch.arange(6))
    fn = F.normalize(f, dim=-1)
    mixed = F.normalize(lam[:, None] * fn + (1 - lam[:, None]) * fn[perm], dim=-1)
    with torch.no_grad():
        f_t = module.class_text_features()  # [C, D]
    scale = tiny_backbone.logit_scale.exp()
    logits = scale * mixed @ f_t.t()
    ce, ce_perm = (F.cross_entropy(logits, t, reduction="none") for t in (y, y[perm]))
    assert torch.allclose(loss, (lam * ce + (1 - lam) * ce_perm).mean(), atol=1e-5)
    # off: the plain cross-entropy; evaluation never mixes
    module.mixup = 0.0
    plain = module._step(batch, module.train_acc, "train")
    assert torch.allclose(plain, F.cross_entropy(scale * fn @ f_t.t(), y), atol=1e-5)
    assert not torch.allclose(plain, loss, atol=1e-3)
    module.mixup = 0.75
    module.eval()
    with torch.no_grad():
        assert torch.allclose(module(None, f), scale * fn @ f_t.t(), atol=1e-5)


def test_mixup_is_for_unlabeled_clients_only(tiny_backbone: Backbone) -> None:
    task = prepare_task(_task(SklearnDigits()))
    sim = _sim(tiny_backbone, task, per_client=True, top_k=3, threshold=0.0, mixup=0.75)  # each keeps its setting
    sim.run_round(1)
    assert [c.module.mixup for c in sim.clients] == [0.0 if c.data.labeled else 0.75 for c in sim.clients]
    assert sorted(c.module.mixup for c in sim.clients) == [0.0, 0.0, 0.75, 0.75]


def test_unlabeled_clients_wait_for_start_round(tiny_backbone: Backbone) -> None:
    sim = _sim(tiny_backbone, prepare_task(_task(SklearnDigits())), top_k=3, threshold=0.0, start_round=2)
    labeled = [i for i, c in enumerate(sim.clients) if c.data.labeled]
    assert sim.sample(1) == labeled and sim.sample(2) == [0, 1, 2, 3]  # left out of the draw, not failed
    sim.run()
    splits = {(r["round"], r["split"]) for r in sim.metrics.rows if r["level"] == "client"}
    assert splits == {(1, "fit"), (2, "fit"), (2, "fit_unlabeled"), (2, "pseudo_labels")}
    # a draw of unlabeled clients only, before start_round: the round trains nobody and changes nothing
    sim = _sim(tiny_backbone, prepare_task(_task(SklearnDigits())), top_k=3, threshold=0.0, start_round=40)
    sim.federation.fraction = 0.25  # one client a round
    rnd = next(r for r in range(1, 40) if not sim.sample(r))
    before = {k: v.clone() for k, v in sim.global_state.items()}
    assert sim.run_round(rnd) == {} and all(torch.equal(before[k], sim.global_state[k]) for k in before)
    # nobody labeled: the rounds before start_round would train nothing
    with pytest.raises(ValueError, match="start_round is 3 but no client holds labels"):
        task = Task("digits", SklearnDigits(), clients=2, labeled_fraction=0.0, max_test_examples=20)
        _sim(tiny_backbone, prepare_task(task), start_round=3)


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
  pseudo_labels: {top_k: 4, threshold: 0.0, pick: random}  # the random draw must resume exactly too
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
