"""One federation, several modalities: parts by modality, a task's prompt merged over its modalities (never
across tasks), modality-scoped parts merged across tasks — against hand-computed averages."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from mmfl.backbone import Backbone
from mmfl.data import InMemory, SklearnDigits, Task, prepare_task
from mmfl.federated import FedAvg, Federation, LocalTraining, Simulation, aggregate
from mmfl.prompts import CoOp, PaddingPrompt, ProjectionTuning

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _tones(n: int) -> InMemory:
    """n tones per digit class, 0.3 s at 16 kHz, pitch rising with the digit."""
    rate, t = 16000, np.arange(4800) / 16000
    audio = [
        {"array": np.sin(2 * np.pi * (200 + 150 * d + 7 * k) * t).tolist(), "sampling_rate": rate}
        for d in range(10)
        for k in range(n)
    ]
    return InMemory({"audio": audio, "label": [d for d in range(10) for _ in range(n)]}, DIGITS, input_column="audio")


def _sentences() -> InMemory:
    texts = [f"a {w} sentence number {i}" for w in ("happy", "sad") for i in range(6)]
    return InMemory({"text": texts, "label": [0] * 6 + [1] * 6}, ["joy", "grief"], input_column="text")


@pytest.fixture(scope="module")
def three_modalities() -> list:
    return [
        prepare_task(Task("digits", SklearnDigits(), clients=1, shots=2, max_test_examples=10)),
        prepare_task(Task("digits", _tones(4), modality="audio", clients=1, max_test_examples=10)),
        prepare_task(Task("moods", _sentences(), modality="text", clients=1)),
    ]


def _sim(bb: Backbone, tasks: list, parts: list) -> Simulation:
    training = LocalTraining(
        max_steps=2, batch_size=8, accelerator="cpu", optimizer=lambda p: torch.optim.SGD(p, lr=1.0)
    )
    return Simulation(bb, tasks, parts, training, Federation(rounds=1))


def test_scoped_merging_across_modalities(tiny_backbone: Backbone, three_modalities: list) -> None:
    parts = [
        functools.partial(CoOp, n_ctx=2, scope="task"),
        functools.partial(ProjectionTuning, side="input", scope="modality", modalities=["audio"]),
    ]
    sim = _sim(tiny_backbone, three_modalities, parts)
    assert [sorted(c.module.parts) for c in sim.clients] == [["coop"], ["coop", "proj"], ["coop"]]
    image, audio, text = (sim.fit_client(c, 1)[0] for c in sim.clients)
    assert sorted(audio.state) == [
        "modality/audio/proj.input.bias",
        "modality/audio/proj.input.weight",
        "task/digits/coop.ctx",
    ]
    merged = aggregate([image, audio, text], FedAvg())
    key = "task/digits/coop.ctx"  # written and spoken digits share the task's prompt, weighted by examples
    n_i, n_a = image.num_examples, audio.num_examples
    assert (n_i, n_a) == (20, 30)  # 2 shots × 10 digits; 4 tones × 10 digits less one per class held out
    expected = (n_i * image.state[key].double() + n_a * audio.state[key].double()) / (n_i + n_a)
    assert torch.allclose(merged[key].double(), expected, atol=1e-6)
    assert not torch.allclose(image.state[key], audio.state[key])  # both clients really moved it
    assert torch.equal(merged["task/moods/coop.ctx"], text.state["task/moods/coop.ctx"])  # never across tasks
    assert torch.equal(merged["modality/audio/proj.input.weight"], audio.state["modality/audio/proj.input.weight"])


def test_a_part_no_client_can_use_is_an_error(tiny_backbone: Backbone, three_modalities: list) -> None:
    text_only = [three_modalities[2]]
    with pytest.raises(
        ValueError, match=r"part\(s\) \['pixel'\] work with none of the federation's modalities \(\['text'\]\)"
    ):
        _sim(tiny_backbone, text_only, [functools.partial(CoOp, n_ctx=2), PaddingPrompt])
    with pytest.raises(ValueError, match=r"PaddingPrompt: modalities=\['text'\]; it works with \['image', 'audio'\]"):
        PaddingPrompt(tiny_backbone, DIGITS, modalities=["text"])


def test_a_task_has_one_label_set_over_its_modalities(tiny_backbone: Backbone, three_modalities: list) -> None:
    other = prepare_task(Task("digits", _sentences(), modality="text", clients=1))
    with pytest.raises(ValueError, match=r"task 'digits' has different class names on its 'text' clients"):
        _sim(tiny_backbone, [three_modalities[0], other], [functools.partial(CoOp, n_ctx=2)])
