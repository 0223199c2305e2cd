"""Smoke runs of the benchmarks with tiny sizes: the settings they compare are what they claim to be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import unlabeled
from benchmarks.collaboration import SCENARIOS, SETTINGS, run_setting
from mmfl.backbone import Backbone
from tests.test_cli import NEEDS

RECIPE = """\
seed: 0
backbone: {model_name: mmfl-tiny}
tasks:
  - {name: digits, data: {class_path: mmfl.data.SklearnDigits}, clients: 2, shots: 2, max_test_examples: 12}
  - name: moods
    data:
      class_path: mmfl.data.InMemory
      init_args:
        data: {text: [a happy day, a sad day, so happy, so sad, happy times, sad times]}
        class_names: [joy, grief]
        input_column: text
    modality: text
    clients: 1
parts:
  - {class_path: mmfl.prompts.CoOp, init_args: {n_ctx: 2, scope: task}}
  - {class_path: mmfl.prompts.ProjectionTuning, init_args: {side: input, scope: modality, modalities: [image]}}
training: {max_steps: 1, batch_size: 4, accelerator: cpu}
federation: {rounds: 1}
"""


def test_collaboration_settings_change_only_what_is_merged(tiny_backbone: Backbone, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("data: {text:", "data: {label: [0, 1, 0, 1, 0, 1], text:"))
    held_out = ["--evaluation.val_fraction=0.3"]  # in every setting: the same training data; own val chooses on it
    out = {name: run_setting(str(recipe), name, held_out, tiny_backbone) for name in SETTINGS}
    assert out["alone"].merged_keys == []  # everything local: nothing reaches the server
    proj = ["proj.input.bias", "proj.input.weight"]
    assert out["same (task, modality)"].merged_keys == [
        "task_modality/digits/image/coop.ctx",
        *[f"task_modality/digits/image/{p}" for p in proj],
        "task_modality/moods/text/coop.ctx",
    ]
    plain = [*[f"modality/image/{p}" for p in proj], "task/digits/coop.ctx", "task/moods/coop.ctx"]
    assert out["recipe"].merged_keys == out["plain"].merged_keys == out["task"].merged_keys == plain
    assert out["components"].merged_keys == sorted(plain + out["same (task, modality)"].merged_keys)
    assert out["by modality"].merged_keys == [  # the prompt per (task, modality), the projection per modality
        "modality/image/proj.input.bias",
        "modality/image/proj.input.weight",
        "task_modality/digits/image/coop.ctx",
        "task_modality/moods/text/coop.ctx",
    ]
    for name in ("own 0.8", "others 0.1", "similarity", "own val"):  # held per (task, modality), mixed at the server
        assert out[name].merged_keys == out["same (task, modality)"].merged_keys
    assert sorted(out["own val"].shares) == ["task_modality/digits/image", "task_modality/moods/text"]
    assert all(len(v) == 1 for v in out["own val"].shares.values()) and out["own 0.8"].shares == {}
    for r in out.values():
        assert r.groups == {
            "digits/image/0": "digits/image",
            "digits/image/1": "digits/image",
            "moods/text/0": "moods/text",
        }
        assert all(0.0 <= a <= 1.0 for a in r.accuracy.values())
        assert r.val.keys() == r.accuracy.keys() and all(0.0 <= a <= 1.0 for a in r.val.values())
    # components send both tensors of a split parameter; mixing sends what task_modality does
    assert out["components"].bytes_per_client_round > out["task"].bytes_per_client_round
    assert out["own 0.8"].bytes_per_client_round == out["task"].bytes_per_client_round > 0


def test_a_choice_on_validation_keeps_per_group_the_setting_that_scores_highest_there() -> None:
    from benchmarks.collaboration import SettingResult
    from benchmarks.val_choice import choose_per_group

    groups = {"d/image/0": "d/image", "d/image/1": "d/image", "d/audio/0": "d/audio"}

    def result(test: list[float], val: list[float], keys: list[str], sent: float) -> SettingResult:
        acc, v = dict(zip(groups, test, strict=True)), dict(zip(groups, val, strict=True))
        return SettingResult(acc, groups, keys, sent, 0.5, 10.0, val=v)

    runs = {  # image: own 0.7, 0.5 -> 0.60 against wide 0.6, 0.6 -> 0.60 (a tie: the first name); audio: 0.2 < 0.4
        "own": result([0.9, 0.8, 0.3], [0.7, 0.5, 0.2], ["a", "b"], 100.0),
        "wide": result([0.1, 0.2, 0.6], [0.6, 0.6, 0.4], ["b", "c"], 50.0),
    }
    chosen, choice = choose_per_group(runs, ["own", "wide"])
    assert choice == {"d/image": "own", "d/audio": "wide"}
    assert chosen.accuracy == {"d/image/0": 0.9, "d/image/1": 0.8, "d/audio/0": 0.6}  # each group's chosen test
    assert chosen.val == {"d/image/0": 0.7, "d/image/1": 0.5, "d/audio/0": 0.4}
    assert chosen.merged_keys == ["a", "b", "c"] and chosen.bytes_per_client_round == 150.0  # both runs trained
    assert chosen.seconds == 20.0 and chosen.groups == groups
    _, choice = choose_per_group(runs, ["wide", "own"])  # the tie now goes to "wide"
    assert choice == {"d/image": "wide", "d/audio": "wide"}
    runs["own"].val = {}
    with pytest.raises(ValueError, match="no validation figure"):
        choose_per_group(runs, ["own", "wide"])
    with pytest.raises(ValueError, match="no result for"):
        choose_per_group(runs, ["wide", "task"])


def test_collaboration_settings_rewrite_the_wide_scopes(tmp_path: Path) -> None:
    from benchmarks.collaboration import configure
    from mmfl.recipe import fit_parser

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("scope: task}", "scope: task+task_modality}"))

    def scopes(setting: str, base: str | None = None) -> list[str]:
        cfg = fit_parser().parse_args(["-c", str(recipe)])
        configure(cfg, setting, base)
        return [p.init_args.scope for p in cfg.parts]

    assert scopes("recipe") == ["task+task_modality", "modality"]  # as written
    assert scopes("plain") == ["task", "modality"]  # the base: the widest component
    assert scopes("similarity") == ["mix(task_modality, task, similarity)", "mix(task_modality, modality, similarity)"]
    assert scopes("components", base="global") == ["global+task_modality", "global+task_modality"]
    assert scopes("alone", base="global") == ["local", "local"]
    assert scopes("by modality") == ["task_modality", "modality"]  # the prompt per group, the modality's part shared
    assert scopes("by modality", base="global") == ["global", "global"]


def _shrink(cfg) -> None:
    for t in cfg.tasks:
        t.shots, t.max_test_examples = 1, 6


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_collaboration_scenarios_run_with_a_tiny_override(scenario: str, tiny_backbone: Backbone) -> None:
    text = SCENARIOS[scenario].read_text()
    missing = [name for name, have in NEEDS.items() if name in text and not have]
    if missing:
        pytest.skip(f"{scenario} needs optional data for {missing}")
    tiny = ["--federation.rounds=1", "--training.max_steps=1", "--training.epochs=1"]
    r = run_setting(SCENARIOS[scenario], "components", tiny, tiny_backbone, seed=1, edit=_shrink)
    rows = {"multimodal": 5, "scarce-modality": 4, "scarce-task": 3}[scenario]
    assert len(set(r.groups.values())) == rows and all(0.0 <= a <= 1.0 for a in r.accuracy.values())
    assert any(k.startswith("task_modality/") for k in r.merged_keys)  # the (task, modality) components
    if scenario == "scarce-task":  # one generic context for all tasks, plus a residual per (task, modality)
        assert "global/coop.ctx" in r.merged_keys


def test_collaboration_json_holds_means_spreads_and_every_client(tmp_path: Path) -> None:
    import json

    from benchmarks.collaboration import main

    recipe, out = tmp_path / "r.yaml", tmp_path / "c.json"
    recipe.write_text(RECIPE.replace("data: {text:", "data: {label: [0, 1, 0, 1, 0, 1], text:"))
    args = ["-c", str(recipe), "--seeds", "0", "1", "--settings", "alone", "others 0.1", "--average-rounds", "1"]
    with pytest.raises(SystemExit):  # a choice among settings that are not all run: refused before any training
        main([*args, "--choose", "alone", "task"])
    summaries = main([*args, "--best-val", "--choose", "alone", "others 0.1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["seeds"] == [0, 1] and saved["average_rounds"] == 1 and saved["best_val"]
    assert list(saved["settings"]) == [
        *("alone", "others 0.1", "alone, averaged", "others 0.1, averaged", "alone, best_val", "others 0.1, best_val"),
        "chosen on val: alone or others 0.1",
    ]
    for seed in ("0", "1"):  # each row's figures are those of the setting it chose
        for row, name in saved["choices"]["chosen on val: alone or others 0.1"][seed].items():
            assert saved["settings"]["chosen on val: alone or others 0.1"]["rows"][row]["per_seed"][int(seed)] == (
                pytest.approx(saved["settings"][name]["rows"][row]["per_seed"][int(seed)])
            )
    for name in ("alone", "others 0.1"):  # the mean of the last round alone is the last round's state
        assert saved["settings"][f"{name}, averaged"]["per_seed"] == saved["settings"][name]["per_seed"]
    s = saved["settings"]["alone"]
    assert list(s["rows"]) == ["digits/image", "moods/text"]
    for row in s["rows"].values():
        assert len(row["per_seed"]) == 2 and row["std"] >= 0
        assert abs(row["mean"] - sum(row["per_seed"]) / 2) < 1e-9
    assert set(s["per_seed"]) == {"0", "1"} and len(s["per_seed"]["0"]) == 3  # every client's figure per seed
    assert s["rows"]["moods/text"]["per_seed"][1] == pytest.approx(s["per_seed"]["1"]["moods/text/0"])
    assert summaries["alone"].clients_mean["mean"] == pytest.approx(s["clients_mean"]["mean"])
    assert saved["merged_keys"]["alone"] == [] and saved["settings"]["others 0.1"]["bytes_per_client_round"] > 0


def test_sharing_cost_counts_the_bytes_of_each_setting(tmp_path: Path) -> None:
    from benchmarks.sharing_cost import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("data: {text:", "data: {label: [0, 1, 0, 1, 0, 1], text:"))
    settings = ["alone", "components", "others 0.1", "own val"]
    out = main(["-c", str(recipe), "--repeats", "2", "--val-fraction", "0.3", "--settings", *settings])
    ctx = 2 * 64 * 4  # CoOp: 2 context vectors × text width 64, fp32
    proj = (64 * 64 + 64) * 4  # the image clients' input projection (embed_dim 64)
    assert out["task"]["bytes_per_client_round"] == pytest.approx((2 * (ctx + proj) + ctx) / 3)
    assert out["components"]["bytes_per_client_round"] == 2 * out["task"]["bytes_per_client_round"]
    assert out["others 0.1"]["bytes_per_client_round"] == out["task"]["bytes_per_client_round"]
    assert out["own val"]["bytes_per_client_round"] == out["task"]["bytes_per_client_round"]
    assert out["alone"]["bytes_per_client_round"] == 0
    assert all(r["server_ms_per_round"] > 0 for n, r in out.items() if n != "alone")


def test_robust_benchmark_attackers_send_what_they_claim(tiny_backbone: Backbone) -> None:
    import functools

    import torch

    from benchmarks.robust import Attacked
    from mmfl.data import SklearnDigits, Task, prepare_task
    from mmfl.federated import FedAvg, Federation, LocalTraining, Median, Simulation
    from mmfl.prompts import CoOp

    task = prepare_task(Task("digits", SklearnDigits(), clients=4, shots=2, max_test_examples=12))
    training = LocalTraining(max_steps=2, batch_size=8, accelerator="cpu", optimizer=lambda p: torch.optim.SGD(p, lr=1))
    key = "task/digits/coop.ctx"

    def sim(attack: str, aggregator) -> Attacked:
        s = Attacked(
            tiny_backbone, [task], [functools.partial(CoOp, n_ctx=2)], training, Federation(1, aggregator=aggregator)
        )
        s.attack, s.malicious = attack, frozenset({s.clients[0].data.cid})
        return s

    s = sim("scaled", FedAvg())
    g = s.global_state[key].clone()
    honest, _ = Simulation.fit_client(s, s.clients[0], 1)  # the same seed and start: the same honest update
    doctored, _ = s.fit_client(s.clients[0], 1)
    assert torch.allclose(doctored.state[key], g + 10 * (honest.state[key] - g), atol=1e-6)
    assert torch.equal(
        s.fit_client(s.clients[1], 1)[0].state[key], Simulation.fit_client(s, s.clients[1], 1)[0].state[key]
    )
    honest_mean = torch.stack([Simulation.fit_client(s, c, 1)[0].state[key] for c in s.clients[1:]]).mean(0)
    off = {}
    for name, agg in {"fedavg": FedAvg(), "median": Median()}.items():
        s = sim("scaled", agg)
        s.run_round(1)
        off[name] = (s.global_state[key] - honest_mean).norm().item()
    assert off["median"] < off["fedavg"] / 2  # the median stays near the honest clients; FedAvg is dragged away
    s = sim("adaptive", FedAvg())  # the backdoor's update, at the norm of the attacker's honest one
    g = s.global_state[key].clone()
    honest, _ = Simulation.fit_client(s, s.clients[0], 1)
    doctored, _ = s.fit_client(s.clients[0], 1)
    assert torch.isclose((doctored.state[key] - g).norm(), (honest.state[key] - g).norm(), rtol=1e-4)
    assert not torch.allclose(doctored.state[key], honest.state[key], atol=1e-4)


def test_robust_benchmark_reports_means_and_spreads_over_seeds(tmp_path: Path) -> None:
    from benchmarks import robust

    args = ["--backbone", "mmfl-tiny", "--clients", "4", "--f", "1", "--rounds", "1", "--shots", "2", "--test", "12"]
    args += ["--seeds", "0", "1", "--rules", "FedAvg", "FLAME", "--attacks", "adaptive", "--out", str(tmp_path)]
    results = robust.main(args)
    assert set(results) == {"none", "adaptive"} and set(results["none"]) == {"FedAvg", "FLAME"}
    for row in results["adaptive"].values():
        accs = [r["accuracy"] for r in row["per_seed"]]
        assert len(accs) == 2 and row["accuracy"] == pytest.approx(sum(accs) / 2)
        assert row["accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    assert results["none"]["FLAME"]["drop"] == 0.0  # against itself
    assert json.loads((tmp_path / "robust.json").read_text())["results"]["adaptive"]["FLAME"]["per_seed"]


@pytest.mark.slow
def test_benchmark_run_smoke_writes_every_figure(tmp_path: Path) -> None:
    import json

    from benchmarks.run import KEYS, main

    r = main(
        [
            "--out",
            str(tmp_path),
            "--quick",
            "--backbone",
            "mmfl-tiny",
            "--accelerator",
            "cpu",
            "--no-flower",
            "--sizes",
            "1,3",
        ]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(KEYS) <= set(saved) and saved["efficiency"] == r["efficiency"]
    assert 0 < r["efficiency"] < 1.5 and r["cache_speedup"] > 0 and r["rss_100_over_1"] > 0
    # CoOp's context: n_ctx × text width float32, sent and received; the full model: every backbone tensor, twice
    assert r["bytes_per_client_round"] == 2 * 4 * 64 * 4
    bb = Backbone("mmfl-tiny")
    assert r["full_model_bytes"] == 2 * sum(t.numel() * t.element_size() for t in bb.model.state_dict().values())


def test_fuzz_judges_what_a_user_would_see(tmp_path: Path) -> None:
    import sys

    from benchmarks import fuzz

    console = fuzz.Console()
    try:

        def crash() -> int:
            raise SystemExit(2)

        def report(code: int, text: str):
            def run() -> int:
                print(text, file=sys.stderr)
                return code

            return run

        assert fuzz.judge_command(report(0, ""), console) == ("runs", "")
        assert fuzz.judge_command(report(2, "mmfl fit: error: bad"), console) == ("clean_errors", "")
        assert fuzz.judge_command(report(1, "mmfl fit: error: round 1 failed"), console) == ("clean_errors", "")
        assert fuzz.judge_command(report(2, "Traceback (most recent call last):"), console)[0] == "tracebacks"
        assert fuzz.judge_command(crash, console)[0] == "tracebacks"  # exit 2 and not a word
        assert fuzz.judge_command(report(3, "error: odd"), console)[0] == "tracebacks"
    finally:
        console.close()
    with pytest.raises(fuzz.CaseTimeout), fuzz.time_limit(0.05):
        while True:
            pass


def test_fuzz_benchmark_counts_every_input(tmp_path: Path) -> None:
    from benchmarks import fuzz

    out = tmp_path / "fuzz.json"
    mix = '{"reply": 1, "checkpoint": 1, "command": 1, "recipe": 1}'
    result = fuzz.main(["--n", "24", "--mix", mix, "--json", str(out)])
    assert result["tried"] == 24 == sum(result[o] for o in fuzz.OUTCOMES)
    assert result["tracebacks"] == 0 and result["timeouts"] == 0, result["examples"]
    assert result["clean_errors"] > 0 and result["runs"] > 0
    assert all(v["tried"] > 0 for v in result["per_kind"].values())
    assert json.loads(out.read_text())["tried"] == 24


@pytest.mark.slow
def test_scale_benchmark_measures_each_size_in_its_own_process(tmp_path: Path) -> None:
    import json

    from benchmarks import scale

    assert scale.fraction(10, 10) == 1.0 and scale.fraction(1000, 10) == 0.01 and scale.fraction(10000, 10) == 0.01
    assert scale.copies_for(10000) == 50  # 8 training examples per client of the largest size
    r = scale.main(["--out", str(tmp_path), "--parts", "coop", "--sizes", "2", "40", "--rounds", "1"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == r
    coop = r["parts"]["coop"]
    small, big = coop["runs"]["2"], coop["runs"]["40"]
    assert (small["sampled_per_round"], big["sampled_per_round"]) == (2, 10)
    assert small["train_examples"] == big["train_examples"] == 1617  # one data set for every size
    assert coop["rss_40_over_2"] == big["peak_rss_mib"] / small["peak_rss_mib"]
    assert coop["client_round_40_over_2"] == big["client_round_s"] / small["client_round_s"] > 0


def test_unlabeled_benchmark_refuses_a_round_the_runs_do_not_reach(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*args: object, **kwargs: object) -> dict:
        raise AssertionError("a federation was trained before the refusal")

    monkeypatch.setattr(unlabeled, "run", no_training)  # refused before any training: no run starts
    with pytest.raises(SystemExit) as e:
        unlabeled.main(["--at-rounds", "3", "12", "--federation.rounds=10"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "--at-rounds [12]" in err and "federation.rounds (10)" in err
    assert "round 1/" not in err  # refused before any training
    with pytest.raises(SystemExit) as e:
        unlabeled.main(["--at-rounds", "4", "5", "--federation.eval_every=2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "--at-rounds [5]" in err and "eval_every=2" in err  # round 5 of 20 is never scored
