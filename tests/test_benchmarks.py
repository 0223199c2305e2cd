"""Smoke runs of the benchmarks with tiny sizes: the settings they compare are what they claim to be."""

from __future__ import annotations

from pathlib import Path

from benchmarks.collaboration import SETTINGS, run_setting
from mmfl.backbone import Backbone

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
    out = {name: run_setting(str(recipe), scope, [], tiny_backbone) for name, scope in SETTINGS.items()}
    assert out["alone"].merged_keys == []  # everything local: nothing reaches the server
    assert out["same (task, modality)"].merged_keys == [
        "task_modality/digits/image/coop.ctx",
        "task_modality/digits/image/proj.input.bias",
        "task_modality/digits/image/proj.input.weight",
        "task_modality/moods/text/coop.ctx",
    ]
    assert out["mmfl scopes"].merged_keys == [
        "modality/image/proj.input.bias",
        "modality/image/proj.input.weight",
        "task/digits/coop.ctx",
        "task/moods/coop.ctx",
    ]
    for r in out.values():
        assert r.groups == {
            "digits/image/0": "digits/image",
            "digits/image/1": "digits/image",
            "moods/text/0": "moods/text",
        }
        assert all(0.0 <= a <= 1.0 for a in r.accuracy.values())
