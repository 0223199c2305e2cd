"""Every shell command the README and docs/ show is run here, in their order, with a tiny override, so the
documentation cannot drift from the code. A block preceded by ``<!-- not run by tests/test_docs.py: why -->`` is
left out (it needs network, a Flower deployment, or changes the environment; the reason says which test covers it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmfl import cli
from mmfl.backbones.build_mini import PROJ_FILE
from mmfl.data.wordnet import WORDNET_DIR

ROOT = Path(__file__).parent.parent
PAGES = ["README.md", *(f"docs/{p}.md" for p in ("recipes-and-parts", "reliability", "evaluation", "modalities"))]
PAGES += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md") if str(p.relative_to(ROOT)) not in PAGES)
SKIP = re.compile(r"<!-- not run by tests/test_docs\.py: (.+?) -->")
FENCE = re.compile(r"^\s*```(\w*)\s*$")
TINY = ["--backbone.model_name=mmfl-tiny", "--federation.rounds=1", "--training.max_steps=1"]


def shown_commands() -> list[tuple[str, str]]:
    """(page, command line) for every line of every bash block, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    for page in PAGES:
        lines = (ROOT / page).read_text().splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            skipped = i > 0 and SKIP.search(lines[i - 1]) is not None
            j = i + 1
            while not FENCE.match(lines[j]):
                j += 1
            if m.group(1) in ("bash", "sh") and not skipped:
                text = "\n".join(lines[i + 1 : j]).replace("\\\n", " ")
                for line in text.splitlines():
                    cmd = shlex.split(line, comments=True)
                    if cmd:
                        out.append((page, " ".join(cmd)))
            i = j + 1
    return out


def _once(commands: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each command once, where it is first shown: a second `fit --output_dir runs/qs` would find the first's run."""
    seen: set[str] = set()
    return [(p, c) for p, c in commands if not (c in seen or seen.add(c))]


COMMANDS = _once(shown_commands())

PLACEHOLDERS = {"RUN": "runs/quickstart", "NAME": "animals", "RECIPE": "recipes/quickstart.yaml"}


def inline_commands() -> list[tuple[str, str]]:
    """(page, command) for the commands quoted in the prose (`mmfl ...`) that are whole commands: a recipe, a run,
    a data set or --help given (a bare `mmfl fit` names the command, it is not one to run). Placeholders get
    values, optional ``[...]`` parts are dropped."""
    out = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", (ROOT / page).read_text(), flags=re.S)
        for m in re.finditer(r"`((?:\.venv/bin/)?mmfl [^`]+)`", text):
            cmd = " ".join(re.sub(r"\s\[[^\]]*\]", "", m.group(1)).split()).removeprefix(".venv/bin/")
            words = [PLACEHOLDERS.get(w, w) for w in cmd.split()]
            if "..." in words or not ({"-c", "--resume", "--data", "--help", "plot", "modalities"} & set(words)):
                continue
            out.append((page, " ".join(words)))
    return out


INLINE = [(p, c) for p, c in _once(inline_commands()) if f".venv/bin/{c}" not in {c2 for _, c2 in COMMANDS}]


def test_the_documentation_shows_commands_and_marks_every_block_it_leaves_out() -> None:
    assert len(COMMANDS) >= 12
    for page in PAGES:
        for reason in SKIP.findall((ROOT / page).read_text()):
            assert "test" in reason or "network" in reason, f"{page}: say which test covers it: {reason!r}"


def _argv(cmd: str) -> list[str] | None:
    """The ``mmfl`` arguments of a shown command with the tiny override (None: a command the suite itself is)."""
    words = shlex.split(cmd)
    if words[0] == "make":
        if words[1] == "test":
            return None  # this suite
        recipe = re.search(rf"^{words[1]}:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
        assert recipe, f"Makefile has no target {words[1]}"
        words = shlex.split(recipe.group(1).replace("$(BIN)/", ".venv/bin/"))
    assert words[0] in (".venv/bin/mmfl", "mmfl"), f"a shown command this test cannot run: {cmd!r}"
    args = [w.replace("$PWD/", "") for w in words[1:]]
    sub = args[0]
    if sub in ("fit", "evaluate") and "--help" not in args and "--resume" not in args and "--output_dir" not in args:
        args += ["--output_dir", f"runs/inline/{len(list(Path('runs/inline').glob('*')))}"]  # a fresh folder each
    if sub in ("fit", "evaluate") and "--help" not in args:
        if "--resume" in args:  # only the rounds may change on resume: keep them few
            args = [re.sub(r"^--federation\.rounds=\d+$", "--federation.rounds=2", a) for a in args]
        elif not any(a.endswith("config.yaml") for a in args):  # a run's own config is already tiny
            args += TINY
        if sub == "evaluate":
            args += ["--evaluation.seeds=[0]"]
    if sub in ("zeroshot", "export"):
        args += ["--limit", "20"]
    return args


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the commands run as in the repository: recipes/ and examples/ at hand, runs/ written here,
    and the folder of class sub-folders that `--data path/to/folder` stands for."""
    wd = tmp_path_factory.mktemp("docs")
    for name in ("recipes", "examples", "Makefile"):
        (wd / name).symlink_to(ROOT / name)
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (wd / "path/to/folder" / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                wd / f"path/to/folder/{cls}/{k}.png"
            )
    return wd


def _run_shown(page: str, cmd: str, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    if "--data glosses" in cmd and not Path(WORDNET_DIR, "data.noun").is_file():
        pytest.skip("WordNet (Debian wordnet-base) is not installed")
    monkeypatch.chdir(workdir)
    argv = _argv(cmd)
    if argv is None:
        pytest.skip("`make test` is this suite")
    try:
        code = cli.main(argv)
    except SystemExit as e:  # --help
        code = e.code
    err = capsys.readouterr().err
    assert code == 0, f"{page}: {cmd!r} (run as mmfl {' '.join(argv)}) exited {code}: {err[-2000:]}"


@pytest.mark.parametrize(("page", "cmd"), COMMANDS, ids=[f"{p}: {c[:60]}" for p, c in COMMANDS])
def test_a_shown_command_runs(page: str, cmd: str, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _run_shown(page, cmd, workdir, monkeypatch, capsys)


@pytest.mark.parametrize(("page", "cmd"), INLINE, ids=[f"{p}: {c[:60]}" for p, c in INLINE])
def test_a_command_quoted_in_the_prose_runs(page, cmd, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """After the shown commands (the runs they write, e.g. runs/quickstart, are what the prose refers to)."""
    _run_shown(page, cmd, workdir, monkeypatch, capsys)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_resolves() -> None:
    pages = ["README.md", *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / page).read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (ROOT / page).parent / path if path else ROOT / page
            assert file.exists(), f"{page}: link to {target!r}: no such file"
            if anchor and file.suffix == ".md":
                heads = {_anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                assert anchor in heads, f"{page}: link to {target!r}: no such heading"


# The benchmarks the prose quotes: measured runs of minutes. Each is either smoke-tested in tests/test_benchmarks.py
# (named here) or run below with a tiny override.
BENCH_TESTS = {
    "benchmarks.collaboration": "test_collaboration_scenarios_run_with_a_tiny_override",
    "benchmarks.sharing_cost": "test_sharing_cost_counts_the_bytes_of_each_setting",
    "benchmarks.robust": "test_robust_benchmark_attackers_send_what_they_claim",
    "benchmarks.run": "test_benchmark_run_smoke_writes_every_figure",
    "benchmarks.fuzz": "test_fuzz_benchmark_counts_every_input",
    "benchmarks.scale": "test_scale_benchmark_measures_each_size_in_its_own_process",
}
BENCH_TINY = {
    "benchmarks.part_sizes": [],
    "benchmarks.lite0_throughput": ["--n", "4"],
    "benchmarks.audio_encoder": ["--data", "digits", "--encoders", "vision+proj", "--shots", "1", "--rounds", "1"],
    "mmfl.backbones.build_mini": ["--out", "{tmp}/proj.safetensors"],
    "benchmarks.unlabeled": [
        *("--seeds", "0", "--guard-limit", "8", "--settings", "labeled alone", "with unlabeled", "--mix", "0"),
        *(*TINY, "--at-rounds", "0", "1", "--json", "{tmp}/u.json"),
    ],
    "benchmarks.flower_node": ["--out", "{tmp}/n", "--backbone", "mmfl-tiny", "--clients", "2", "--copies", "1"],
}


def quoted_modules() -> set[str]:
    found = set()
    for page in PAGES:
        found |= set(re.findall(r"python -m ([\w.]+)", (ROOT / page).read_text()))
    return found


def test_every_quoted_benchmark_is_smoke_tested_or_run_here() -> None:
    bench = (ROOT / "tests" / "test_benchmarks.py").read_text()
    for module in quoted_modules():
        assert module in BENCH_TINY or f"def {BENCH_TESTS[module]}(" in bench, module


OPT_IN = {  # 1-2 min each even tiny: MMFL_DOCS_BENCH=1
    "benchmarks.lite0_throughput",
    "benchmarks.audio_encoder",
    "benchmarks.flower_node",
}


@pytest.mark.parametrize("module", sorted(BENCH_TINY))
def test_a_quoted_benchmark_runs_with_a_tiny_override(module: str, tmp_path: Path) -> None:
    if module in OPT_IN and not os.environ.get("MMFL_DOCS_BENCH"):
        pytest.skip("takes 1-2 minutes even tiny (the suite's time budget); run with MMFL_DOCS_BENCH=1")
    if module == "benchmarks.audio_encoder" and not shutil.which("espeak-ng"):
        pytest.skip("spoken digits need espeak-ng (Debian)")
    args = [a.format(tmp=tmp_path) for a in BENCH_TINY[module]]
    p = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    if module == "benchmarks.unlabeled":
        out = json.loads((tmp_path / "u.json").read_text())
        assert set(out["tasks"]) == {"digits/image", "animals/image"}
        for row in out["tasks"].values():
            assert set(row) == {"val", "test"} and {"labeled alone", "with unlabeled"} <= set(row["test"])
            assert all(0 <= row["test"][k]["mean"] <= 100 for k in row["test"])
        assert out["export"]["photos/image"]["kind"] == "never seen"
        assert out["at_rounds"]["1"] == out["tasks"]  # the last round tabulated again: the same figures
        before = out["at_rounds"]["0"]  # round 0, before training: every setting scores the zero-shot model
        for t, row in out["tasks"].items():
            assert before[t]["test"]["with unlabeled"]["mean"] == pytest.approx(row["test"]["zero_shot"]["mean"])
            assert before[t]["test"]["with unlabeled"]["difference"]["mean"] == 0
        assert set(out["exports"]) == {"0.0"} and out["export"] == out["exports"]["0.0"]
        assert all(r["change"]["mean"] == 0 for r in out["export"].values())  # --mix 0: the original backbone
    if module == "benchmarks.flower_node":  # a real deployment's ClientApp and ServerApp were both measured
        out = json.loads((tmp_path / "n" / "results.json").read_text())
        assert out["node_peak_rss_mib"] > out["backbone_rss_mib"] > 0 and out["server_peak_rss_mib"] > 0
        assert out["partition_rows"] > 0 and out["lean_node_rss_mib"] >= out["stack_rss_mib"] > 0
    if module == "mmfl.backbones.build_mini":  # the committed projection is what the documented build writes
        built, committed = load_file(tmp_path / "proj.safetensors"), load_file(PROJ_FILE)
        assert built.keys() == committed.keys()
        assert all(torch.allclose(built[k], committed[k], atol=1e-5) for k in built)
