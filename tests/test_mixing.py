"""Mixed scopes at the server: the scope grammar, mixing against hand-computed values (2 tasks × 2 modalities),
its two ends equal to the plain scopes with every rule, similarity shares, absent groups, DP noise before mixing."""

from __future__ import annotations

import pytest
import torch

from mmfl.federated import FedAvg, FedAvgM, Median, Update, aggregate
from mmfl.federated.mixing import MixRule, choose_share, similarities
from mmfl.federated.scopes import Mix, ScopeSpec, parse_scope

GROUPS = [("a", "img"), ("a", "aud"), ("b", "img"), ("b", "aud")]


def fine(task: str, mod: str) -> str:
    return f"task_modality/{task}/{mod}/p"


def table(value: float, kind: str = "own") -> dict[str, MixRule]:
    return {fine(t, m): MixRule(f"task/{t}/p", kind, value) for t, m in GROUPS}


# a/img: two clients ([1] ×1 example, [3] ×3); a/aud: [10] ×4; b/img: [0] ×2; b/aud: [6] ×2
CLIENTS = [
    ("a", "img", 1.0, 1),
    ("a", "img", 3.0, 3),
    ("a", "aud", 10.0, 4),
    ("b", "img", 0.0, 2),
    ("b", "aud", 6.0, 2),
]


def updates(prefix: str = "tm", values: list[float] | None = None) -> list[Update]:
    out = []
    for i, (t, m, v, n) in enumerate(CLIENTS):
        v = values[i] if values is not None else v
        key = fine(t, m) if prefix == "tm" else f"task/{t}/p"
        out.append(Update(f"c{i}", {key: torch.tensor([v, 2 * v])}, n))
    return out


def test_scope_grammar() -> None:
    assert parse_scope("task") == ScopeSpec(("task",))
    assert parse_scope("task+task_modality") == ScopeSpec(("task", "task_modality"))
    assert parse_scope(" global + task + local ").components == ("global", "task", "local")
    mixed = ScopeSpec(("task_modality",), Mix("task_modality", "task", "own", 0.8))
    assert parse_scope("mix(task_modality, task, own=0.8)") == mixed
    assert parse_scope("mix(task,global,others = 0.1)").mix == Mix("task", "global", "others", 0.1)
    assert parse_scope("mix(task,global,similarity)").mix == Mix("task", "global", "similarity")
    assert parse_scope("mix(task_modality, modality, own=val)") == ScopeSpec(
        ("task_modality",), Mix("task_modality", "modality", "val")
    )
    assert parse_scope("task").plain and not parse_scope("task+local").plain
    for bad, message in [
        ("tasks", "unknown scope 'tasks'"),
        ("task+task", "repeats a component"),
        ("mix(task, task_modality, own=0.5)", "are not inside those of 'task_modality'"),
        ("mix(task_modality, modality, own=1.5)", r"own=1.5 must be in \[0, 1\]"),
        ("mix(task_modality, task, others=half)", r"others=half must be in \[0, 1\]"),
        ("mix(task_modality, task, 0.5)", "must be own=X, others=X, similarity or own=val"),
        ("mix(task_modality, task, similarity=1)", "must be own=X, others=X, similarity or own=val"),
        ("mix(task_modality, task, val)", "must be own=X, others=X, similarity or own=val"),
        ("mix(task_modality, task, others=val)", r"others=val must be in \[0, 1\]"),
        ("task+mix(task_modality, task, own=0.5)", "a mix cannot be a component"),
        ("mix(local, task, own=0.5)", "are not inside"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_scope(bad)


def test_mixing_by_hand() -> None:
    cur = {k: torch.zeros(2) for k in table(0.75)}
    out = aggregate(updates(), FedAvg(), cur, table(0.75))
    # task a over all its copies: (1·1 + 3·3 + 4·10) / 8 = 6.25; a/img's own merge (1 + 9) / 4 = 2.5
    # a/img: 0.75·2.5 + 0.25·6.25 = 3.4375; a/aud: 0.75·10 + 0.25·6.25 = 9.0625
    # task b: (2·0 + 2·6) / 4 = 3; b/img: 0.75·0 + 0.25·3 = 0.75; b/aud: 0.75·6 + 0.25·3 = 5.25
    expected = {("a", "img"): 3.4375, ("a", "aud"): 9.0625, ("b", "img"): 0.75, ("b", "aud"): 5.25}
    for (t, m), v in expected.items():
        assert torch.equal(out[fine(t, m)], torch.tensor([v, 2 * v])), (t, m)
    # the median: a/img median(1, 3) = 2, a/aud 10, task a median(1, 3, 10) = 3 → 0.5·2 + 0.5·3, 0.5·10 + 0.5·3
    med = aggregate(updates(), Median(), cur, table(0.5))
    assert torch.equal(med[fine("a", "img")], torch.tensor([2.5, 5.0]))
    assert torch.equal(med[fine("a", "aud")], torch.tensor([6.5, 13.0]))


def test_others_weight_by_hand() -> None:
    """others=s: (W_g m_g + s · W_o m_o) / (W_g + s · W_o), W the example counts (weighted FedAvg)."""
    cur = {k: torch.zeros(2) for k in table(0.5, "others")}
    out = aggregate(updates(), FedAvg(), cur, table(0.5, "others"))
    # a/img: W 4, m 2.5; a/aud: W 4, m 10 → a/img (4·2.5 + 0.5·4·10) / (4 + 2) = 5, a/aud (40 + 0.5·10) / 6 = 7.5
    assert torch.equal(out[fine("a", "img")], torch.tensor([5.0, 10.0]))
    assert torch.equal(out[fine("a", "aud")], torch.tensor([7.5, 15.0]))
    # unweighted: W is the number of copies (a/img 2, a/aud 1); a/img m 2, a/aud m 10
    # a/img (2·2 + 0.5·1·10) / (2 + 0.5) = 3.6; a/aud (1·10 + 0.5·2·2) / (1 + 0.5·2) = 6
    out = aggregate(updates(), FedAvg(weighted=False), cur, table(0.5, "others"))
    assert torch.allclose(out[fine("a", "img")], torch.tensor([3.6, 7.2]))
    assert torch.allclose(out[fine("a", "aud")], torch.tensor([6.0, 12.0]))


ENDS = [("own", 1.0, "fine"), ("own", 0.0, "wide"), ("others", 0.0, "fine"), ("others", 1.0, "wide")]


@pytest.mark.parametrize("kind, value, end", ENDS)
@pytest.mark.parametrize("make", [FedAvg, lambda: FedAvg(weighted=False), Median, lambda: FedAvgM(momentum=0.5)])
def test_the_two_ends_are_the_plain_scopes_exactly(make, kind: str, value: float, end: str) -> None:
    """own=1 and others=0 are task_modality merging, own=0 and others=1 task merging, with every rule, over two
    rounds (FedAvgM's momentum buffers included)."""
    mixed_rule, plain_rule = make(), make()
    rules = table(value, kind)
    cur = {k: torch.zeros(2) for k in rules}
    plain_cur = {k: torch.zeros(2) for k in rules} if end == "fine" else {f"task/{t}/p": torch.zeros(2) for t in "ab"}
    for rnd, values in enumerate([[1.0, 3.0, 10.0, 0.0, 6.0], [-2.0, 5.0, 1.5, 7.0, 0.25]]):
        out = aggregate(updates("tm", values), mixed_rule, cur, rules)
        cur.update(out)
        plain = aggregate(updates("tm" if end == "fine" else "task", values), plain_rule, plain_cur)
        plain_cur.update(plain)
        for t, m in GROUPS:
            ref = plain[fine(t, m)] if end == "fine" else plain[f"task/{t}/p"]
            assert torch.equal(out[fine(t, m)], ref), (rnd, t, m)


def test_similarity_shares_between_agreeing_updates_only() -> None:
    s = similarities(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [3.0, 0.0]]).double())
    assert torch.equal(s.diagonal(), torch.ones(4).double())
    assert s[0, 1] == 0 and s[0, 2] == 0 and s[0, 3] == 1  # orthogonal, opposite, parallel
    rules = table(0.0, "similarity")
    cur = {k: torch.zeros(2) for k in rules}
    ups = [
        Update("a-img", {fine("a", "img"): torch.tensor([1.0, 0.0])}, 1),
        Update("a-aud", {fine("a", "aud"): torch.tensor([0.0, 1.0])}, 1),  # orthogonal to a/img: kept apart
        Update("b-img", {fine("b", "img"): torch.tensor([2.0, 0.0])}, 1),
        Update("b-aud", {fine("b", "aud"): torch.tensor([4.0, 0.0])}, 3),  # parallel to b/img: merged as task b
    ]
    out = aggregate(ups, FedAvg(), cur, rules)
    assert torch.equal(out[fine("a", "img")], torch.tensor([1.0, 0.0]))
    assert torch.equal(out[fine("a", "aud")], torch.tensor([0.0, 1.0]))
    assert torch.equal(out[fine("b", "img")], torch.tensor([3.5, 0.0]))  # (1·2 + 3·4) / 4
    assert torch.equal(out[fine("b", "aud")], torch.tensor([3.5, 0.0]))


def test_groups_that_did_not_reply() -> None:
    cur = {k: torch.full((2,), 8.0) for k in table(0.5)}
    ups = [u for u in updates() if fine("b", "aud") not in u.state]
    out = aggregate(ups, FedAvg(), cur, table(0.5))
    # task b's merge is b/img's alone (0); b/aud keeps half its current 8: 0.5·8 + 0.5·0 = 4; b/img 0.5·0 + 0.5·0
    assert torch.equal(out[fine("b", "aud")], torch.tensor([4.0, 4.0]))
    assert torch.equal(out[fine("b", "img")], torch.tensor([0.0, 0.0]))
    assert fine("b", "aud") not in aggregate(ups, FedAvg(), cur, table(1.0))  # own 1: as task_modality, untouched
    # others=0.25: an absent group takes 0.25 of the task's merge: 0.75·8 + 0.25·0
    assert torch.equal(aggregate(ups, FedAvg(), cur, table(0.25, "others"))[fine("b", "aud")], torch.tensor([6.0, 6.0]))
    assert fine("b", "aud") not in aggregate(ups, FedAvg(), cur, table(0.0, "others"))


def test_the_release_acts_on_the_group_merges_before_mixing_and_the_server_step() -> None:
    seen = {}

    def release(merges: dict, counts: dict) -> dict:
        seen.update(counts)
        return {k: v + 1.0 for k, v in merges.items()}  # e.g. DP noise

    cur = {k: torch.zeros(2) for k in table(0.5)}
    out = aggregate(updates(), FedAvg(weighted=False), cur, table(0.5), release)
    assert seen == {fine("a", "img"): 2, fine("a", "aud"): 1, fine("b", "img"): 1, fine("b", "aud"): 1}
    # released merges: a/img (1 + 3) / 2 + 1 = 3, a/aud 11; the task merge from them, by copies: (2·3 + 11) / 3
    wide = (2 * 3.0 + 11.0) / 3
    assert torch.allclose(out[fine("a", "img")], torch.tensor([0.5 * 3 + 0.5 * wide, 0.5 * 5 + 0.5 * (2 * 5 + 21) / 3]))
    with pytest.raises(ValueError, match="needs a mean rule"):
        aggregate(updates(), Median(), cur, table(0.5), release)


def test_shares_chosen_on_validation_by_hand() -> None:
    """own=val: the chooser gets each replying group's own merge and its wide merge, and the round's other new
    tensors; the result is share · own + (1 − share) · wide per group; a group that did not reply keeps its tensor."""
    rules = table(0.0, "val")
    cur = {k: torch.full((2,), 8.0) for k in rules}
    seen: dict = {}

    def choose(groups: dict, others: dict) -> dict:
        seen.update(groups=groups, others=others)
        return {"task_modality/a/img": 0.25, "task_modality/a/aud": 1.0, "task_modality/b/img": 0.0}

    ups = [u for u in updates() if fine("b", "aud") not in u.state]
    out = aggregate(ups, FedAvg(), cur, rules, choose=choose)
    assert sorted(seen["groups"]) == ["task_modality/a/aud", "task_modality/a/img", "task_modality/b/img"]
    (key, own, wide), *_ = seen["groups"]["task_modality/a/img"]
    assert key == fine("a", "img") and own.tolist() == [2.5, 5.0] and wide.tolist() == [6.25, 12.5]
    # what the chooser sees of the others: every replying group at its own merge (a share of 1 so far)
    assert seen["others"][fine("a", "aud")].tolist() == [10.0, 20.0] and fine("b", "aud") not in seen["others"]
    # a/img 0.25·2.5 + 0.75·6.25 = 5.3125; a/aud keeps its own 10; b/img takes task b's merge (b/img's alone): 0
    assert torch.equal(out[fine("a", "img")], torch.tensor([5.3125, 10.625]))
    assert torch.equal(out[fine("a", "aud")], torch.tensor([10.0, 20.0]))
    assert torch.equal(out[fine("b", "img")], torch.tensor([0.0, 0.0]))
    assert fine("b", "aud") not in out  # did not reply: keeps its tensor
    with pytest.raises(ValueError, match=r"own=val.*validation data"):
        aggregate(ups, FedAvg(), cur, rules)


def _right(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_a_share_is_left_only_for_a_gain_beyond_one_standard_error() -> None:
    # shares 1, .75, .5, .25, 0 on 4 validation examples: .5 and .25 score best (4/4; the tie goes to .5)
    correct = {
        1.0: _right(1, 1, 0, 0),
        0.75: _right(1, 1, 1, 0),
        0.5: _right(1, 1, 1, 1),
        0.25: _right(1, 1, 1, 1),
        0.0: _right(0, 0, 0, 0),
    }
    # share 1: differences (0, 0, 1, 1), std √(1/3), SE √(1/3)/2 = .289: 0.5 < 1 − .289, too far below
    # share .75: differences (0, 0, 0, 1), std .5, SE .25: 0.75 ≥ 1 − .25 (exactly at the bound counts) → kept
    assert choose_share(correct) == 0.75
    # a clear gain: 100 examples, own merge 50 right, the wide merge all 100 (SE of the differences ≈ .05)
    half = torch.arange(100) % 2 == 0
    assert choose_share({1.0: half, 0.75: half, 0.5: half, 0.25: half, 0.0: torch.ones(100, dtype=torch.bool)}) == 0.0
    # the same predictions everywhere: the own merge; one example (no standard error): the best, .75 (ties .5)
    same = {a: _right(1, 0, 1) for a in (1.0, 0.75, 0.5, 0.25, 0.0)}
    assert choose_share(same) == 1.0
    assert choose_share({1.0: _right(0), 0.75: _right(1), 0.5: _right(1), 0.25: _right(0), 0.0: _right(0)}) == 0.75
