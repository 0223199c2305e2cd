"""``federation.virtual_features``: class statistics against hand computations, virtual features, the server's virtual
clients in a round, exact resume, and the refusals."""

from __future__ import annotations

import collections
import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from flwr_datasets.partitioner import PathologicalPartitioner

from mmfl import cli
from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.evaluation.command import describe_variant
from mmfl.evaluation.protocol import Protocol, Variant
from mmfl.evaluation.runner import variant_settings
from mmfl.federated import FedAvg, Federation, LocalTraining, Simulation
from mmfl.federated.class_statistics import ClassStatistics, draw, pooled_covariances, summarize
from mmfl.federated.node import read_recipe
from mmfl.federated.privacy import DifferentialPrivacy
from mmfl.federated.virtual_features import VirtualFeatures
from mmfl.module import quiet_lightning
from mmfl.progress import NoProgress
from mmfl.prompts import CoOp, PaddingPrompt

# _skewed() leaves classes 6-9 to no client on purpose (a class nobody holds gets no virtual features)
pytestmark = pytest.mark.filterwarnings("ignore:Classes.*will NOT be used:UserWarning")


def test_class_statistics_are_the_hand_computed_sums_means_and_covariances() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [2.0, 4.0]])  # [N=4, D=2]
    y = torch.tensor([0, 0, 1, 0])
    s = ClassStatistics(num_classes=3, dim=2)
    s.add(x, y)
    assert s.count.tolist() == [3, 1, 0]
    assert s.sum.tolist() == [[6.0, 4.0], [0.0, 2.0], [0.0, 0.0]]
    assert s.outer[0].tolist() == [[1 + 9 + 4, 8.0], [8.0, 16.0]]  # Σ xxᵀ over (1,0), (3,0), (2,4)
    g = s.gaussians()
    assert sorted(g) == [0, 1]  # class 2 has no example: no Gaussian
    mu, factor = g[0]
    assert mu.tolist() == [2.0, 4 / 3]
    # unbiased covariance of (1,0), (3,0), (2,4): var x = 1, var y = 16/3, cov = ((−1)(−4/3) + (1)(−4/3) + 0) / 2 = 0
    cov = factor @ factor.T
    torch.testing.assert_close(cov, torch.tensor([[1.0, 0.0], [0.0, 16 / 3]], dtype=torch.float64))
    mu1, factor1 = g[1]
    assert mu1.tolist() == [0.0, 2.0] and factor1.shape == (2, 0)  # one example: its feature, no spread


def test_statistics_add_up_over_clients_and_a_rank_deficient_covariance_keeps_its_rank() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(12, 5), torch.tensor([0, 1] * 6)
    whole, a, b = ClassStatistics(2, 5), ClassStatistics(2, 5), ClassStatistics(2, 5)
    whole.add(x, y)
    a.add(x[:7], y[:7])
    b.add(x[7:], y[7:])
    torch.testing.assert_close(a.sum + b.sum, whole.sum)
    torch.testing.assert_close(a.outer + b.outer, whole.outer)
    assert (a.count + b.count).tolist() == whole.count.tolist()
    g = whole.gaussians()
    for c in (0, 1):  # 6 examples in 5 dimensions: rank 5; the factor reproduces the unbiased covariance
        xs = x[y == c].double()
        torch.testing.assert_close(g[c][1] @ g[c][1].T, torch.cov(xs.T))
    few = ClassStatistics(1, 5)
    few.add(x[:3], torch.zeros(3, dtype=torch.long))  # 3 examples: a covariance of rank 2
    assert few.gaussians()[0][1].shape == (5, 2)


def test_a_client_sends_each_classs_second_moments_as_a_factor_of_their_rank() -> None:
    # class 0 = (1,0,0), (3,0,0), (2,4,0): Σxxᵀ = [[14,8,0],[8,16,0],[0,0,0]], rank 2 (nothing along the third axis)
    x = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 4.0, 0.0]])
    y = torch.tensor([0, 0, 1, 0])
    sent = summarize(x, y)
    assert sorted(sent) == [0, 1] and sent[0].count == 3 and sent[0].total.tolist() == [6.0, 4.0, 0.0]
    f = sent[0].factor
    assert f.shape == (3, 2)  # rank 2 of 3 examples
    torch.testing.assert_close(f @ f.T, torch.tensor([[14.0, 8.0, 0.0], [8.0, 16.0, 0.0], [0.0, 0.0, 0.0]]).double())
    # the factor is Σxxᵀ's eigenvectors times √eigenvalues (so FᵀF is diagonal), each signed by its largest entry
    ftf = f.T @ f
    torch.testing.assert_close(ftf, torch.diag(torch.diagonal(ftf)))
    assert (f.gather(0, f.abs().argmax(0, keepdim=True)) > 0).all()
    assert sent[0].nbytes() == 8 * (1 + 3 + 3 * 2)  # the factor: 6 numbers, as many as the upper triangle here
    assert sent[1].factor.shape == (3, 1) and sent[1].nbytes() == 8 * (1 + 3 + 3)
    assert summarize(x, y, full=False)[0].factor is None and summarize(x, y, full=False)[0].nbytes() == 8 * (1 + 3 + 1)
    # added up over clients, the factors give the same statistics as the examples themselves
    torch.manual_seed(0)
    feats, labels = torch.randn(30, 4), torch.randint(0, 3, (30,))
    direct, sums = ClassStatistics(3, 4), ClassStatistics(3, 4)
    direct.add(feats, labels)
    for part in (slice(0, 11), slice(11, 30)):
        for c, summary in summarize(feats[part], labels[part]).items():
            sums.add_summary(c, summary)
    assert sums.count.tolist() == direct.count.tolist()
    torch.testing.assert_close(sums.sum, direct.sum)
    torch.testing.assert_close(sums.outer, direct.outer)
    torch.testing.assert_close(sums.sqnorm, direct.sqnorm)
    nine = torch.randn(9, 4)  # more examples than dimensions: rank 4 of D = 4, the triangle is smaller
    many, few = summarize(nine, torch.zeros(9, dtype=torch.long))[0], summarize(nine[:3], torch.zeros(3).long())[0]
    assert many.factor.shape == (4, 4) and many.nbytes() == 8 * (1 + 4 + 10)
    torch.testing.assert_close(many.factor @ many.factor.T, nine.double().T @ nine.double())
    assert few.factor.shape == (4, 3)  # fewer: the examples' Gram matrix gives the same kind of factor
    for f in (many.factor, few.factor):  # Σxxᵀ's eigenvectors × √eigenvalues, signed by the largest entry
        ftf = f.T @ f
        torch.testing.assert_close(ftf, torch.diag(torch.diagonal(ftf)))
        assert (f.gather(0, f.abs().argmax(0, keepdim=True)) > 0).all()


def test_a_pooled_covariance_is_the_groups_within_class_scatter_over_their_degrees_of_freedom() -> None:
    # group (a, image): class 0 = (0,0), (2,0) → scatter [[2,0],[0,0]], 1 dof; class 1 = (5,5) alone → 0 dof
    a = ClassStatistics(2, 2)
    a.add(torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]), torch.tensor([0, 0, 1]))
    # group (b, audio): class 0 = (1,1), (1,3), (1,5) → mean (1,3), scatter [[0,0],[0,8]], 2 dof
    b = ClassStatistics(1, 2)
    b.add(torch.tensor([[1.0, 1.0], [1.0, 3.0], [1.0, 5.0]]), torch.tensor([0, 0, 0]))
    w, dof = a.within()
    assert w.tolist() == [[2.0, 0.0], [0.0, 0.0]] and dof == 1
    stats = {("a", "image"): a, ("b", "audio"): b}
    both = torch.tensor([[2.0, 0.0], [0.0, 8.0]], dtype=torch.float64) / 3  # (W_a + W_b) / (1 + 2)
    for scope in ("global", "task", "modality", "task_modality"):
        pools = pooled_covariances(stats, scope)
        if scope == "global":
            assert torch.equal(pools[("a", "image")], both) and torch.equal(pools[("b", "audio")], both)
        else:  # different tasks and modalities: each group pools its own classes only
            assert pools[("a", "image")].tolist() == [[2.0, 0.0], [0.0, 0.0]]
            assert pools[("b", "audio")].tolist() == [[0.0, 0.0], [0.0, 4.0]]
    lone = ClassStatistics(1, 2)
    lone.add(torch.tensor([[1.0, 1.0]]), torch.tensor([0]))
    assert pooled_covariances({("c", "text"): lone}, "global") == {}  # no degree of freedom: nothing to pool
    wide = ClassStatistics(1, 3)
    wide.add(torch.ones(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"differ in width \(a/image: 2, c/text: 3\)"):
        pooled_covariances({("a", "image"): a, ("c", "text"): wide}, "global")


def test_a_class_covariance_shrinks_toward_the_pool_by_its_prior() -> None:
    a = ClassStatistics(2, 2)
    a.add(torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]), torch.tensor([0, 0, 1]))
    pooled = torch.tensor([[1.0, 0.5], [0.5, 3.0]], dtype=torch.float64)
    g = a.gaussians(pooled, prior=2.0)
    # class 0: (S + 2 P) / (n − 1 + 2) = ([[2,0],[0,0]] + [[2,1],[1,6]]) / 3; full rank now (it was a line)
    want = torch.tensor([[4.0, 1.0], [1.0, 6.0]], dtype=torch.float64) / 3
    assert g[0][0].tolist() == [1.0, 0.0] and g[0][1].shape == (2, 2)
    torch.testing.assert_close(g[0][1] @ g[0][1].T, want)
    torch.testing.assert_close(g[1][1] @ g[1][1].T, pooled)  # a class seen once takes the pool's shape exactly
    assert g[1][0].tolist() == [5.0, 5.0]
    assert a.gaussians()[0][1].shape == (2, 1) and a.gaussians()[1][1].shape == (2, 0)  # without a pool: as before


def test_virtual_features_follow_each_classs_gaussian() -> None:
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    factor = torch.tensor([[2.0], [1.0]], dtype=torch.float64)  # covariance [[4, 2], [2, 1]]: a line through μ
    point = torch.tensor([5.0, 5.0], dtype=torch.float64)
    x, y = draw({3: (mu, factor), 7: (point, point.new_zeros(2, 0))}, 4000, torch.Generator().manual_seed(0))
    assert x.shape == (8000, 2) and x.dtype == torch.float32
    assert y[:4000].eq(3).all() and y[4000:].eq(7).all()
    assert (x[4000:] == torch.tensor([5.0, 5.0])).all()  # no spread: the one feature
    a = x[:4000].double()
    torch.testing.assert_close(a.mean(0), mu, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(a.T), factor @ factor.T, atol=0.2, rtol=0)
    torch.testing.assert_close(a[:, 0] - 2 * a[:, 1], torch.full((4000,), 5.0, dtype=torch.float64))  # on the line


def _skewed(clients: int = 5) -> Task:
    part = functools.partial(
        PathologicalPartitioner,
        partition_by="label",
        num_classes_per_partition=2,
        class_assignment_mode="deterministic",
    )
    return Task("digits", SklearnDigits(), clients=clients, shots=4, max_test_examples=30, partitioner=part)


def _sim(bb: Backbone, virtual: VirtualFeatures | None, rounds: int = 2, out: Path | None = None) -> Simulation:
    training = LocalTraining(max_steps=2, batch_size=8, accelerator="cpu")
    fed = Federation(rounds=rounds, virtual_features=virtual)
    parts = [functools.partial(CoOp, n_ctx=2)]
    return Simulation(bb, [prepare_task(_skewed())], parts, training, fed, seed=0, output_dir=out)


def test_the_servers_virtual_client_trains_the_merge_on_every_classs_virtual_features(tiny_backbone: Backbone) -> None:
    plain, cal = (
        _sim(tiny_backbone, None, rounds=1),
        _sim(tiny_backbone, VirtualFeatures(samples=6, epochs=2), rounds=1),
    )
    labels = set()
    for c in cal.clients:  # client i holds classes i and i + 1: together classes 0-5 of the 10
        held = set(c.data.train["label"])
        assert len(held) <= 2
        labels |= held
    assert labels == set(range(6))
    plain.run()
    cal.run()
    key = "task/digits/coop.ctx"
    assert not torch.allclose(plain.global_state[key], cal.global_state[key])  # the server trained after the merge
    rows = [r for r in cal.metrics.rows if r["split"] == "virtual_features"]
    assert len(rows) == 1 and int(rows[0]["examples"]) == 6 * 6 and rows[0]["level"] == "server"
    assert rows[0]["note"] == "6 classes x 6 virtual features"  # a class no client holds has no virtual features
    sent = [r for r in cal.metrics.rows if r["level"] == "traffic" and r["split"] == "statistics"]
    d = tiny_backbone.embed_dim
    # per class a client holds: the count, Σx and Σxxᵀ's factor, whose rank is the class's examples there (< D / 2)
    per_class = [n for c in cal.clients for n in collections.Counter(c.data.train["label"]).values()]
    assert max(per_class) < d // 2
    assert len(sent) == 1 and int(sent[0]["examples"]) == 5
    assert float(sent[0]["value"]) == sum(8 * (1 + d + d * n) for n in per_class)
    # the Gaussians are those of the clients' frozen features, pooled
    gauss = cal.class_gaussians(1)["digits/image"]
    assert sorted(gauss) == list(range(6))
    module = cal._virtual["digits/image"][1]
    feats = torch.cat([cal.features.encodings(module.modality, c.data.train, train=False) for c in cal.clients])
    labels_all = torch.cat([torch.as_tensor(c.data.train["label"]) for c in cal.clients])
    for k in range(6):
        torch.testing.assert_close(gauss[k][0], feats[labels_all == k].double().mean(0))


class _StopAfter(NoProgress):
    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def round_end(self, rnd: int) -> None:
        if rnd == self.rnd:
            raise KeyboardInterrupt


def test_a_run_with_virtual_features_resumes_to_the_same_tensors(tiny_backbone: Backbone, tmp_path: Path) -> None:
    whole = _sim(tiny_backbone, VirtualFeatures(samples=4), rounds=3, out=tmp_path / "whole")
    whole.run()
    stopped = _sim(tiny_backbone, VirtualFeatures(samples=4), rounds=3, out=tmp_path / "stopped")
    stopped.progress = _StopAfter(1)
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    resumed = _sim(tiny_backbone, VirtualFeatures(samples=4), rounds=3, out=tmp_path / "stopped")
    assert resumed.resume(tmp_path / "stopped") == 1
    resumed.run()
    for k, v in whole.global_state.items():
        torch.testing.assert_close(resumed.global_state[k], v, atol=1e-6, rtol=0)
    sent = [r for r in resumed.metrics.rows if r["split"] == "statistics"]
    assert len(sent) == 1 and int(sent[0]["round"]) == 1  # sent once, in round 1, though gathered again on resuming


def test_virtual_features_refuse_what_it_cannot_serve(tiny_backbone: Backbone, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="samples and epochs must be >= 1"):
        Federation(virtual_features=VirtualFeatures(samples=0)).check()
    with pytest.raises(
        ValueError, match=r"covariance must be one of class, isotropic, task_modality, task, modality, global, got"
    ):
        Federation(virtual_features=VirtualFeatures(covariance="local")).check()
    with pytest.raises(ValueError, match=r"prior must be a finite number > 0, got 0"):
        Federation(virtual_features=VirtualFeatures(covariance="global", prior=0)).check()
    dp = DifferentialPrivacy(noise_multiplier=1.0, clip_norm=0.1)
    with pytest.raises(ValueError, match=r"cannot be combined with federation\.dp"):
        Federation(aggregator=FedAvg(weighted=False), dp=dp, virtual_features=VirtualFeatures()).check()
    training = LocalTraining(max_steps=1, accelerator="cpu")
    task = prepare_task(_skewed())
    with pytest.raises(ValueError, match=r"part\(s\) \['pixel'\] act before or inside the encoder"):
        Simulation(
            tiny_backbone, [task], [CoOp, PaddingPrompt], training, Federation(virtual_features=VirtualFeatures())
        )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "backbone: {model_name: mmfl-tiny}\n"
        "tasks:\n  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 2, shots: 2}\n"
        "parts:\n  - class_path: mmfl.prompts.CoOp\n"
        "federation: {rounds: 1, virtual_features: {samples: 10}}\n"
    )
    args = ["flower-app", "-c", str(recipe), "--app_dir", str(tmp_path / "app"), "--output_dir", str(tmp_path / "o")]
    assert cli.main(args) == 2
    assert "federation.virtual_features runs on mmfl's in-process engine only" in capsys.readouterr().err
    assert not (tmp_path / "app").exists()
    with pytest.raises(ValueError, match="in-process engine only"):  # an app's run config that sets it anyway
        read_recipe(
            {"recipe-yaml": recipe.read_text().replace(", virtual_features: {samples: 10}", ""), "overrides": ""}
        )
        read_recipe({"recipe-yaml": recipe.read_text(), "overrides": ""})


def test_an_evaluation_variant_may_change_only_the_virtual_features() -> None:
    with pytest.raises(ValueError, match=r"variants\.0 \(cal\): federation\.virtual_features\.samples and epochs"):
        Protocol(variants=[Variant(name="cal", virtual_features=VirtualFeatures(epochs=0))]).check_variants()
    v = Variant(name="cal", virtual_features=VirtualFeatures(samples=7))
    Protocol(variants=[v]).check_variants()  # a change of its own: not "changes nothing"
    training, fed = LocalTraining(epochs=2), Federation(rounds=4)
    parts, got_training, got_fed = variant_settings(v, [CoOp], training, fed)
    assert parts == [CoOp] and got_training == training
    assert (
        got_fed.virtual_features == VirtualFeatures(samples=7) and got_fed.rounds == 4 and fed.virtual_features is None
    )
    # the report names the variant's spread when it is not each class's own covariance
    assert describe_variant(v) == "server training on virtual features (7 per class, 5 epochs a round)"
    iso = Variant(name="iso", virtual_features=VirtualFeatures(covariance="isotropic"))
    assert describe_variant(iso).endswith("(100 per class, 5 epochs a round, covariance isotropic)")
    pool = Variant(name="pool", virtual_features=VirtualFeatures(covariance="global", prior=4))
    assert describe_variant(pool).endswith("5 epochs a round, covariance global (prior 4))")


def test_a_key_several_groups_hold_takes_their_virtual_clients_mean_weighted_by_virtual_examples(
    tiny_backbone: Backbone,
) -> None:
    iid = Task("digits", SklearnDigits(), clients=2, shots=4, max_test_examples=30)  # all 10 classes
    tasks = [prepare_task(iid), prepare_task(dataclasses.replace(_skewed(), name="skewed"))]  # classes 0-5 only
    parts = [functools.partial(CoOp, n_ctx=2, scope="global")]  # one context for both tasks
    fed = Federation(rounds=1, virtual_features=VirtualFeatures(samples=3, epochs=1))
    sim = Simulation(tiny_backbone, tasks, parts, LocalTraining(max_steps=1, accelerator="cpu"), fed, seed=0)
    with quiet_lightning():  # as a run calls them
        a, na = sim.virtual_client("digits/image", 1)
        b, nb = sim.virtual_client("skewed/image", 1)
        again, _ = sim.virtual_client("digits/image", 1)
        out = sim.virtual_round(1)
    assert (na, nb) == (10 * 3, 6 * 3) and list(a) == list(b) == ["global/coop.ctx"]
    assert not torch.allclose(a["global/coop.ctx"], b["global/coop.ctx"])
    assert torch.equal(again["global/coop.ctx"], a["global/coop.ctx"])  # from the global tensors, same draws
    want = (a["global/coop.ctx"].double() * 30 + b["global/coop.ctx"].double() * 18) / 48
    torch.testing.assert_close(out["global/coop.ctx"], want.float())
    assert torch.equal(sim.global_state["global/coop.ctx"], out["global/coop.ctx"])


def test_a_group_whose_tensors_are_all_local_has_no_virtual_client(tiny_backbone: Backbone) -> None:
    fed = Federation(rounds=1, virtual_features=VirtualFeatures(samples=3, epochs=1))
    parts = [functools.partial(CoOp, n_ctx=2, scope="local")]
    sim = Simulation(tiny_backbone, [prepare_task(_skewed())], parts, LocalTraining(max_steps=1), fed, seed=0)
    assert sim._virtual == {}
    sim.run()
    assert not [
        r for r in sim.metrics.rows if r["split"] in ("virtual_features", "statistics")
    ]  # nothing sent or trained


def test_a_run_pools_the_class_covariances_over_the_groups_of_its_scope(tiny_backbone: Backbone) -> None:
    iid = Task("digits", SklearnDigits(), clients=2, shots=4, max_test_examples=30)
    scarce = Task("few", SklearnDigits(), clients=1, shots=2, max_test_examples=30)
    tasks = [prepare_task(iid), prepare_task(scarce)]
    training = LocalTraining(max_steps=1, accelerator="cpu")
    parts = [functools.partial(CoOp, n_ctx=2)]
    gaussians, stats = {}, {}
    for covariance in ("class", "global", "task_modality"):
        fed = Federation(rounds=1, virtual_features=VirtualFeatures(samples=3, covariance=covariance, prior=4.0))
        sim = Simulation(tiny_backbone, tasks, parts, training, fed, seed=0)
        gaussians[covariance] = sim.class_gaussians(1)
    for task in tasks:  # the statistics by hand, from every client's frozen features
        module = sim._virtual[f"{task.name}/image"][1]
        s = ClassStatistics(10, tiny_backbone.embed_dim)
        for c in sim.clients:
            if c.task is task:
                s.add(
                    sim.features.encodings(module.modality, c.data.train, train=False),
                    torch.as_tensor(c.data.train["label"]),
                )
        stats[task.name] = s
    (wd, dd), (wf, df) = stats["digits"].within(), stats["few"].within()
    assert (dd, df) == (2 * 4 * 10 - 10, 2 * 10 - 10)
    for name, pool in (("global", (wd + wf) / (dd + df)), ("task_modality", wf / df)):
        want = stats["few"].gaussians(pool, 4.0)
        got = gaussians[name]["few/image"]
        for c in range(10):
            torch.testing.assert_close(got[c][0], want[c][0])
            torch.testing.assert_close(got[c][1] @ got[c][1].T, want[c][1] @ want[c][1].T)
    own = gaussians["class"]["few/image"][0][1]
    assert own.shape[1] == 1  # two examples: a line; pooled, the class spreads in the pool's directions
    assert gaussians["global"]["few/image"][0][1].shape[1] > 1


def test_an_isotropic_class_is_a_ball_of_its_own_variance_averaged_over_dimensions() -> None:
    # class 0: (1,0), (3,0), (2,4) → μ (2, 4/3); tr S = Σ‖x‖² − n‖μ‖², by hand from the
    # deviations (−1, −4/3), (1, −4/3), (0, 8/3): squared norms 25/9, 25/9, 64/9 → tr S = 114/9; v = tr S / (2 · 2)
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [2.0, 4.0]])
    y = torch.tensor([0, 0, 1, 0])
    s = ClassStatistics(num_classes=3, dim=2, full=False)
    s.add(x, y)
    assert s.outer is None and s.sqnorm.tolist() == [1 + 9 + 4 + 16, 4.0, 0.0]
    g = s.isotropic()
    assert sorted(g) == [0, 1]
    assert g[0][0].tolist() == [2.0, 4 / 3] and g[0][1].dim() == 0
    assert g[0][1].item() ** 2 == pytest.approx(114 / 9 / 4)
    assert g[1][1].item() == 0.0  # one example: no spread
    # the average of the full covariance's diagonal (var x = 1, var y = 16/3) is the same number
    assert s.variance(0) == pytest.approx((1 + 16 / 3) / 2)
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    draws, labels = draw({4: (mu, mu.new_tensor(2.0))}, 6000, torch.Generator().manual_seed(0))
    assert draws.shape == (6000, 3) and labels.eq(4).all()
    torch.testing.assert_close(draws.double().mean(0), mu, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(draws.double().T), 4.0 * torch.eye(3, dtype=torch.float64), atol=0.25, rtol=0)


def test_an_isotropic_run_sends_only_counts_sums_and_squared_norms(tiny_backbone: Backbone) -> None:
    sim = _sim(tiny_backbone, VirtualFeatures(samples=5, epochs=1, covariance="isotropic"), rounds=1)
    sim.run()
    sent = [r for r in sim.metrics.rows if r["level"] == "traffic" and r["split"] == "statistics"]
    d = tiny_backbone.embed_dim
    held = sum(len(set(c.data.train["label"])) for c in sim.clients)
    assert len(sent) == 1 and float(sent[0]["value"]) == held * 8 * (d + 2)  # count, Σx, Σ‖x‖² per class
    module = sim._virtual["digits/image"][1]
    feats = torch.cat([sim.features.encodings(module.modality, c.data.train, train=False) for c in sim.clients])
    labels = torch.cat([torch.as_tensor(c.data.train["label"]) for c in sim.clients])
    gauss = sim.class_gaussians(1)["digits/image"]
    assert sorted(gauss) == list(range(6))
    for k in range(6):
        xs = feats[labels == k].double()  # [n_k, D]
        torch.testing.assert_close(gauss[k][0], xs.mean(0))
        torch.testing.assert_close(gauss[k][1] ** 2, torch.var(xs, dim=0).mean())  # unbiased, averaged over D
    rows = [r for r in sim.metrics.rows if r["split"] == "virtual_features"]
    assert len(rows) == 1 and int(rows[0]["examples"]) == 6 * 5
