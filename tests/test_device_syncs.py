"""No per-step device syncs: a training step never reads a tensor's value back to the host (``.item()``,
``int(t)``, ``bool(t)``), which on a GPU would stall the host until the device has caught up. Counted on the CPU
through PyTorch's dispatcher (every such read goes through ``aten._local_scalar_dense``)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.federated import Federation, LocalTraining, Simulation
from mmfl.modalities import get_modality
from mmfl.module import ClientModule, quiet_lightning
from mmfl.prompts import (
    ClipAdapter,
    CoOp,
    MaPLe,
    PaddingPrompt,
    ProjectionTuning,
    PromptFolio,
    TextInputPrompt,
    VisualPromptTokens,
)

NAMES = ["cat", "dog", "bird"]


class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


PARTS: dict[str, Callable[[Backbone], list]] = {
    "coop": lambda bb: [CoOp(bb, NAMES, n_ctx=2)],
    "coop-middle": lambda bb: [CoOp(bb, NAMES, n_ctx=2, class_token_position="middle")],
    "cocoop": lambda bb: [CoOp(bb, NAMES, n_ctx=2, conditional=True)],
    "promptfolio": lambda bb: [PromptFolio(bb, NAMES, n_ctx=2)],
    "maple": lambda bb: [MaPLe(bb, NAMES, depth=2)],
    "vpt-deep+coop": lambda bb: [VisualPromptTokens(bb, NAMES, n_tokens=2, deep=True), CoOp(bb, NAMES, n_ctx=2)],
    "pixel+adapters": lambda bb: [PaddingPrompt(bb, NAMES, pad=4), ClipAdapter(bb, NAMES), ProjectionTuning(bb, NAMES)],
}


@pytest.mark.parametrize("parts", list(PARTS))
def test_a_training_step_reads_nothing_back(tiny_backbone: Backbone, parts: str) -> None:
    """Forward and backward of an image client with each kind of part: the text tower's cut to the longest class
    prompt uses the length the part computed once (its class prompts are fixed), not the device's token ids."""
    m = ClientModule(tiny_backbone, get_modality("image"), "pets", NAMES, PARTS[parts](tiny_backbone))
    x = torch.randn(4, 3, *tiny_backbone.image_size)
    y = torch.tensor([0, 1, 2, 0])
    with HostReads() as reads:
        F.cross_entropy(m(x), y).backward()
    assert reads.count == 0


def test_the_counter_sees_a_data_dependent_read(tiny_backbone: Backbone) -> None:
    """The control: a text client's inputs vary per batch, so cutting the tower to the batch's longest text reads
    its lengths (once per step); that read is counted."""
    m = ClientModule(tiny_backbone, get_modality("text"), "t", NAMES, [TextInputPrompt(tiny_backbone, NAMES, 2)])
    tokens = tiny_backbone.tokenize(["a cat", "the dog sea lion", "x", "one two"])
    with HostReads() as reads:
        F.cross_entropy(m(tokens), torch.tensor([0, 1, 2, 0])).backward()
    assert reads.count == 1


def test_a_client_fit_reads_back_per_client_not_per_step(tiny_backbone: Backbone) -> None:
    """A whole simulated client fit (Lightning's loop, the metrics, the epoch's loss; cached encodings, SGD, whose
    step reads nothing back): the reads do not grow with the number of steps."""
    task = prepare_task(Task("digits", SklearnDigits(), clients=1, shots=8, max_test_examples=20))
    counts = []
    for steps in (2, 5):
        training = LocalTraining(
            max_steps=steps,
            epochs=10,
            batch_size=8,
            accelerator="cpu",
            feature_cache="memory",
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        )
        sim = Simulation(
            tiny_backbone, [task], [functools.partial(CoOp, n_ctx=2)], training, Federation(rounds=1), seed=0
        )
        with quiet_lightning():
            sim.fit_client(sim.clients[0], 1)  # fills the cache
            with HostReads() as reads:
                sim.fit_client(sim.clients[0], 2)
        counts.append(reads.count)
    assert counts[0] == counts[1], counts
    assert counts[0] > 0  # the per-client reads (e.g. the epoch's loss and accuracy) are seen
