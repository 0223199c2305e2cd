"""The plugin round trip: build and pip-install the example distribution examples/mmfl-series, discover its
modality through the entry point, and run a federation that names it, in fresh processes."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mmfl-series"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin built from a copy of its source and installed into a fresh target folder."""
    tmp = tmp_path_factory.mktemp("plugin")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", site, src]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert (site / "mmfl_series").is_dir()
    return site


def _mmfl(site: Path | None, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MMFL_DISABLE_PLUGIN_AUTOLOAD", None)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "mmfl", *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


def test_installed_plugin_is_listed_with_its_distribution(plugin_site: Path, tmp_path: Path) -> None:
    out = _mmfl(plugin_site, "modalities", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
    assert rows["series"] == "mmfl-series"
    assert rows["image"] == "mmfl"
    without = _mmfl(None, "modalities", cwd=tmp_path)  # not installed there: not listed
    assert "series" not in without.stdout


RECIPE = """\
seed: 0
backbone: {model_name: mmfl-tiny}
tasks:
  - name: waves
    data: {class_path: mmfl_series.Waveforms, init_args: {per_class: 8, length: 64}}
    modality: series
    modality_args: {width: 3.0}
    clients: 2
  - name: digits
    data: {class_path: mmfl.data.SklearnDigits}
    clients: 1
    shots: 2
    max_test_examples: 20
parts:
  - {class_path: mmfl.prompts.CoOp, init_args: {n_ctx: 2, scope: task}}
  - {class_path: mmfl.prompts.PaddingPrompt, init_args: {pad: 2, scope: modality}}
training: {max_steps: 2, batch_size: 8, accelerator: cpu}
federation: {rounds: 1}
"""


def test_a_federation_runs_the_plugin_modality_by_name(plugin_site: Path, tmp_path: Path) -> None:
    recipe, out = tmp_path / "series.yaml", tmp_path / "run"
    recipe.write_text(RECIPE)
    done = _mmfl(plugin_site, "fit", "-c", str(recipe), "--output_dir", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_file(out / "global.safetensors")
    # the plugin's clients got the task prompt and, as a modality that renders images, the pixel prompt
    assert {"task/waves/coop.ctx", "modality/series/pixel.top", "modality/image/pixel.top"} <= set(state)
    assert state["modality/series/pixel.top"].abs().sum() > 0  # trained, not left at its zero init
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    fits = {r["client"] for r in rows if r["split"] == "fit"}
    assert fits == {"waves/series/0", "waves/series/1", "digits/image/0"}
    tests = [r for r in rows if r["split"] == "test" and r["modality"] == "series"]
    assert [int(r["round"]) for r in tests] == [0, 1] and all(int(r["examples"]) == 10 for r in tests)


def test_without_the_plugin_the_recipe_fails_before_training(tmp_path: Path) -> None:
    recipe, out = tmp_path / "series.yaml", tmp_path / "run"
    recipe.write_text(
        RECIPE.replace("mmfl_series.Waveforms", "mmfl.data.SklearnDigits").replace(
            ", init_args: {per_class: 8, length: 64}", ""
        )
    )
    done = _mmfl(None, "fit", "-c", str(recipe), "--output_dir", str(out), cwd=tmp_path)
    assert done.returncode != 0
    assert "unknown modality 'series'" in done.stderr and "entry-point group 'mmfl.modalities'" in done.stderr
    assert not out.exists()


def test_plot_inks_each_column_from_its_point_to_the_next(plugin_site: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(plugin_site))
    import numpy as np
    from mmfl_series import SeriesModality, plot

    # two points, 0 then 1, on a 5×2 canvas: rows of the points (top = max, 5% margins) are 3.8 and 0.2;
    # column 0 spans 0.2..3.8 widened by 1 px each side (all rows), column 1 spans 0.2±1 (rows 0, 1)
    expected = np.array([[1, 1], [1, 1], [1, 0], [1, 0], [1, 0]], dtype=np.float32)
    np.testing.assert_array_equal(plot(np.array([0.0, 1.0]), (5, 2), width=2.0), expected)
    np.testing.assert_array_equal(plot(np.array([5.0, 7.0]), (5, 2), width=2.0), expected)  # scale-free
    for bad, message in [
        ([1.0], "at least 2"),
        ([[1.0, 2.0]], "1-d"),
        ([1.0, float("nan")], "finite"),
        ("ab", "numbers"),
    ]:
        with pytest.raises(ValueError, match=message):
            SeriesModality().validate(bad)
