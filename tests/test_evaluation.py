"""The evaluation protocol: metrics against hand-computed values, the fixed splits, selection on validation only."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch

from mmfl.data import InMemory, SklearnDigits, Task, prepare_task
from mmfl.data.splits import keep_labels, split_classes
from mmfl.evaluation.metrics import accuracy, calibration_error, flatten, harmonic_mean, mean_std, restrict
from mmfl.evaluation.protocol import Protocol, Transfer
from mmfl.evaluation.runner import summarize
from mmfl.federated import Federation
from mmfl.federated.simulation import LocalTraining, Simulation
from mmfl.prompts import CoOp


# ---------------------------------------------------------------- metrics
def test_harmonic_mean_by_hand() -> None:
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.48 / 1.4)  # 0.685714...
    assert harmonic_mean(0.5, 0.5) == pytest.approx(0.5)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(1.0, 0.0) == 0.0  # one side at zero sinks the mean
    assert math.isnan(harmonic_mean(math.nan, 0.5))


def test_expected_calibration_error_by_hand() -> None:
    # softmax probabilities (0.9, 0.1), (0.6, 0.4), (0.3, 0.7); labels 0, 1, 1
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    logits, labels = probs.log(), torch.tensor([0, 1, 1])
    # 10 bins: confidences 0.9 (right), 0.6 (wrong), 0.7 (right) fall in three bins of one example each:
    # (|1 - 0.9| + |0 - 0.6| + |1 - 0.7|) / 3 = 1/3
    assert calibration_error(logits, labels, n_bins=10) == pytest.approx(1 / 3, abs=1e-5)
    # 2 bins: all three in (0.5, 1]: accuracy 2/3, mean confidence 2.2/3 → |2/3 - 2.2/3| = 0.2/3
    assert calibration_error(logits, labels, n_bins=2) == pytest.approx(0.2 / 3, abs=1e-5)
    # perfectly confident and right: no calibration error
    assert calibration_error(torch.tensor([[50.0, 0.0], [0.0, 50.0]]), torch.tensor([0, 1])) == pytest.approx(0)


def test_accuracy_within_a_class_subset() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0],  # label 0: wrong among all classes (1 wins), right among {0, 2}
            [0.0, 0.2, 0.8],  # label 2: right either way
            [0.3, 0.6, 0.1],  # label 1: right among all; outside {0, 2}: dropped
            [0.5, 0.0, 0.7],  # label 0: wrong either way
        ]
    )
    labels = torch.tensor([0, 2, 1, 0])
    assert accuracy(logits, labels) == pytest.approx(2 / 4)
    sub_logits, sub_labels = restrict(logits, labels, [0, 2])
    assert sub_logits.shape == (3, 2) and sub_labels.tolist() == [0, 1, 0]
    assert accuracy(logits, labels, [0, 2]) == pytest.approx(2 / 3)
    assert math.isnan(accuracy(logits, labels, []))


def test_mean_std_and_summary_over_seeds() -> None:
    s = mean_std([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2) and s["n"] == 3
    assert mean_std([0.4]) == {"mean": 0.4, "std": 0.0, "n": 1}
    assert mean_std([math.nan, 0.3])["n"] == 1  # a missing value does not count
    per_seed = [{"tasks": {"a": {"top1": 0.5, "n": 10}}}, {"tasks": {"a": {"top1": 0.7, "n": 10}}}]
    summary = summarize(per_seed)
    assert summary["tasks"]["a"]["top1"]["mean"] == pytest.approx(0.6)
    assert summary["tasks"]["a"]["top1"]["std"] == pytest.approx(math.sqrt(0.02))
    assert flatten({"a": {"b": 1, "c": {"d": 2.5}}, "e": "text"}) == {"a/b": 1.0, "a/c/d": 2.5}


# ---------------------------------------------------------------- splits
def test_base_novel_rule_is_fixed_and_disjoint() -> None:
    for n in (2, 7, 10, 101):
        base, novel = split_classes(n)
        assert base == list(range(math.ceil(n / 2))) and novel == list(range(math.ceil(n / 2), n))
        assert not set(base) & set(novel) and sorted(base + novel) == list(range(n))
        assert split_classes(n) == (base, novel)  # no seed, no state
    with pytest.raises(ValueError, match="at least 2 classes"):
        split_classes(1)


def test_prepare_task_base_to_novel_trains_on_base_only() -> None:
    task = Task(name="digits", data=SklearnDigits(), clients=2, shots=4)
    full = prepare_task(task)
    b2n = prepare_task(task, base_to_novel=True)
    assert b2n.class_names == ["zero", "one", "two", "three", "four"]
    assert b2n.novel_class_names == ["five", "six", "seven", "eight", "nine"]
    for c in b2n.clients:
        assert set(c.train["label"]) <= set(range(5))
    assert set(b2n.test["label"]) == set(range(5))
    assert set(b2n.test_novel["label"]) == set(range(5))  # relabelled 0..4 in novel order
    assert len(b2n.test) + len(b2n.test_novel) == len(full.test)
    # the novel test images are exactly the full test's images of labels 5..9, in order
    novel_full = [i for i, y in enumerate(full.test["label"]) if y >= 5]
    assert [full.test["label"][i] - 5 for i in novel_full] == b2n.test_novel["label"]
    assert b2n.test_novel.features["label"].names == b2n.novel_class_names


def _text_task(**kw) -> Task:
    n = 120
    data = InMemory(
        {
            "text": [f"example {i}" for i in range(n)],
            "label": [i % 4 for i in range(n)],
            "style": [("plain", "bold", "italic")[i % 3] for i in range(n)],
        },
        ["cat", "dog", "bird", "lion"],
        input_column="text",
    )
    return Task(name="words", data=data, modality="text", **kw)


def test_validation_unseen_clients_and_held_out_domains_are_disjoint_from_training() -> None:
    task = _text_task(clients=3, domain_column="style", holdout_domains=["italic"])
    p = prepare_task(task, seed=3, val_fraction=0.2, unseen_clients=1)
    trained = [t for c in p.clients for t in c.train["text"]]
    assert len(p.clients) == 2 and len(p.unseen) == 1 and p.unseen[0].cid == "words/text/2"
    val, unseen = set(p.val["text"]), set(p.unseen[0].train["text"])
    assert val and unseen and not val & set(trained) and not unseen & set(trained) and not val & unseen
    assert all(int(t.split()[1]) % 3 != 2 for t in trained + list(val) + list(unseen))  # no italic in training
    assert "italic" in set(p.test["domain"])  # the held-out domain is tested
    assert prepare_task(task, seed=3, val_fraction=0.2, unseen_clients=1).val["text"] == p.val["text"]
    with pytest.raises(ValueError, match="leave at least one"):
        prepare_task(task, unseen_clients=3)
    with pytest.raises(ValueError, match="occur in no split"):
        prepare_task(_text_task(domain_column="style", holdout_domains=["gothic"]))
    with pytest.raises(ValueError, match="needs a domain_column"):
        prepare_task(_text_task(holdout_domains=["italic"]))


def test_keep_labels_keeps_inputs_untouched() -> None:
    ds = datasets.Dataset.from_dict({"x": list(range(6)), "label": [0, 1, 2, 3, 2, 1]})
    out = keep_labels(ds, [2, 3], offset=2)
    assert out["x"] == [2, 3, 4] and out["label"] == [0, 1, 0]


# ---------------------------------------------------------------- protocol checks
@pytest.mark.parametrize(
    ("protocol", "message"),
    [
        (Protocol(selection="best_val"), "val_fraction is 0"),
        (Protocol(selection="best"), "must be one of"),
        (Protocol(unseen_clients=2), "leaves task 'words'"),
        (Protocol(baselines=["oracle"]), "unknown"),
        (Protocol(seeds=[1, 1]), "distinct"),
        (Protocol(template="a photo"), "'{}'"),
        (Protocol(transfer=[Transfer("nope", Task(name="t", data=SklearnDigits()))]), "not a task of the recipe"),
        (Protocol(transfer=[Transfer("words", Task(name="words", data=SklearnDigits()))]), "never seen in training"),
    ],
)
def test_protocol_rejects_bad_settings(protocol: Protocol, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        protocol.check([_text_task(clients=2)])


# ---------------------------------------------------------------- selection reads validation data only
def test_selection_uses_validation_never_test(tiny_backbone, monkeypatch) -> None:
    task = prepare_task(_text_task(clients=2), val_fraction=0.2)
    parts = [lambda b, names: CoOp(b, names, n_ctx=2)]
    sim = Simulation(
        tiny_backbone,
        [task],
        parts,
        LocalTraining(max_steps=1, accelerator="cpu"),
        Federation(rounds=3),
        selection="best_val",
    )
    # Scores chosen so that validation peaks at round 1 and test at round 3: choosing on test would pick 3.
    val_by_round, test_by_round = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.2}, {0: 0.1, 1: 0.2, 2: 0.5, 3: 0.99}
    current = {"round": 0}
    states = {}

    def fake_evaluate(module, t, ds):
        table = val_by_round if ds is t.val else test_by_round
        return {"loss": 1.0, "accuracy": table[current["round"]]}

    real_round = sim.run_round

    def run_round(rnd):
        current["round"] = rnd
        merged = real_round(rnd)
        states[rnd] = {k: v.clone() for k, v in sim.global_state.items()}
        return merged

    monkeypatch.setattr(sim, "evaluate", fake_evaluate)
    monkeypatch.setattr(sim, "run_round", run_round)
    sim.run()
    assert sim.best_round == 1 and sim.best_score == pytest.approx(0.9)
    chosen, _ = sim.selected()
    assert all(torch.equal(chosen[k], states[1][k]) for k in chosen)
    assert not all(torch.equal(chosen[k], states[3][k]) for k in chosen)  # the last round differs
    splits = {r["split"] for r in sim.metrics.rows}
    assert {"val", "test", "fit"} <= splits


def test_class_specific_parts_are_refused_for_novel_classes_before_training(tiny_backbone) -> None:
    task = prepare_task(Task(name="digits", data=SklearnDigits(), clients=1, max_test_examples=20), base_to_novel=True)
    parts = [lambda b, names: CoOp(b, names, n_ctx=2, class_specific=True)]
    with pytest.raises(ValueError, match="class-specific"):
        Simulation(tiny_backbone, [task], parts, LocalTraining(max_steps=1, accelerator="cpu"), Federation(rounds=1))


def test_novel_and_validation_accuracy_are_recorded_every_n_rounds(tiny_backbone) -> None:
    task = prepare_task(
        Task(name="digits", data=SklearnDigits(), clients=1, shots=2, max_test_examples=20),
        base_to_novel=True,
        val_fraction=0.1,
    )
    sim = Simulation(
        tiny_backbone,
        [task],
        [lambda b, names: CoOp(b, names, n_ctx=2)],
        LocalTraining(max_steps=1, accelerator="cpu"),
        Federation(rounds=3, eval_every=2),
    )
    sim.run()
    rounds = {
        split: sorted({r["round"] for r in sim.metrics.rows if r["split"] == split}) for split in ("test_novel", "val")
    }
    assert rounds == {"test_novel": [0, 2, 3], "val": [0, 2, 3]}  # round 0, every 2nd, and the last
    novel = [r for r in sim.metrics.rows if r["split"] == "test_novel"]
    assert all(r["examples"] == len(task.test_novel) for r in novel)
    assert np.isfinite([r["accuracy"] for r in novel]).all()


# ---------------------------------------------------------------- scoring: domains, pooled data, personal tensors
def test_domains_are_scored_separately_and_held_out_ones_marked(tiny_backbone) -> None:
    from mmfl.evaluation.metrics import accuracy as acc
    from mmfl.evaluation.report import add_means, report_lines
    from mmfl.evaluation.runner import Scorer, predict, zero_shot_method

    task = prepare_task(_text_task(clients=2, domain_column="style", holdout_domains=["italic"]))
    scorer = Scorer([task], [], Protocol(), batch_size=16, accelerator="cpu")
    method = zero_shot_method(tiny_backbone, "a photo of a {}.")
    result = scorer.score(method)
    domains = result["tasks"]["words/text"]["domains"]
    assert set(domains) == {"plain", "bold", "italic"}
    assert sum(d["n"] for d in domains.values()) == len(task.test)
    assert [d for d, v in domains.items() if v["unseen"]] == ["italic"]
    logits, labels = predict(method(task, task.class_names), task.test, 16, "cpu")
    rows = [i for i, d in enumerate(task.test["domain"]) if d == "bold"]
    assert domains["bold"]["top1"] == pytest.approx(acc(logits[rows], labels[rows]))
    assert result["tasks"]["words/text"]["base"]["top1"] == pytest.approx(acc(logits, labels))
    for c in task.clients:  # no personal tensors: every client classifies like the task's module
        assert result["clients"][c.cid]["global"] == pytest.approx(acc(logits, labels))
        assert result["clients"][c.cid]["local"] == pytest.approx(acc(logits, labels, c.classes()))
    facts = {
        "backbone": "mmfl-tiny",
        "pretrained": None,
        "seeds": [0],
        "rounds": 1,
        "fraction": 1.0,
        "epochs": 1,
        "max_steps": -1,
        "batch_size": 32,
        "parts": [],
        "base_to_novel": False,
        "val_fraction": 0.0,
        "selection": "last",
        "template": "a photo of a {}.",
        "ece_bins": 15,
        "tasks": [],
    }
    text = "\n".join(report_lines(facts, {"zeroshot": summarize([add_means(result)])}))
    assert "## Domains" in text and "words/text italic*" in text and "words/text bold |" in text


def test_pooled_client_holds_all_trained_data() -> None:
    from mmfl.evaluation.runner import pooled

    task = prepare_task(_text_task(clients=3), unseen_clients=1)
    central = pooled(task)
    assert len(central.clients) == 1 and not central.unseen
    assert sorted(central.clients[0].train["text"]) == sorted(t for c in task.clients for t in c.train["text"])
    assert central.test is task.test and central.class_names == task.class_names


def test_personal_tensors_are_used_for_each_clients_own_score(tiny_backbone) -> None:
    from mmfl.evaluation.runner import learned_method, personal_method

    task = prepare_task(_text_task(clients=2))
    parts = [lambda b, names: CoOp(b, names, n_ctx=2, scopes={"ctx": "local"})]
    sim = Simulation(tiny_backbone, [task], parts, LocalTraining(max_steps=1, accelerator="cpu"), Federation(rounds=1))
    assert personal_method(sim, {}, {c.data.cid: {} for c in sim.clients}) is None
    key = sim.clients[0].module.trainable_keys()[0]
    local = {
        c.data.cid: {key: torch.full_like(c.module.trainable_state_dict()[key], float(i))}
        for i, c in enumerate(sim.clients)
    }
    own = personal_method(sim, {}, local)
    for c in task.clients:
        assert torch.equal(own(task, c).trainable_state_dict()[key], local[c.cid][key])
    assert not torch.equal(
        learned_method(sim, {})(task, task.class_names).trainable_state_dict()[key], local[task.clients[1].cid][key]
    )


def test_iid_partitions_of_label_sorted_data_hold_every_class() -> None:
    # stored in label order, like the generated audio sets: contiguous shards would give each client 2 classes
    names = datasets.ClassLabel(names=["cat", "dog", "bird", "lion"])

    def split(n: int) -> datasets.Dataset:
        labels = sorted(i % 4 for i in range(n))
        return datasets.Dataset.from_dict({"text": [f"x{i}" for i in range(n)], "label": labels}).cast_column(
            "label", names
        )

    data = InMemory(datasets.DatasetDict(train=split(200), test=split(20)), input_column="text")
    p = prepare_task(Task(name="words", data=data, modality="text", clients=2))
    for c in p.clients:
        assert c.classes() == [0, 1, 2, 3]
    assert sorted(t for c in p.clients for t in c.train["text"]) == sorted(split(200)["text"])
