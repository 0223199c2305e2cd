"""How should sound enter the joint space? The frozen vision tower on spectrogram images vs a small encoder
trained from scratch — same data, shots, optimizer and steps, side by side in one run.

``python -m benchmarks.audio_encoder [--rounds 20] [--shots 16] [--data digits animals]`` prints one table of
test top-1 per (data, encoder). One client (centralised), so only the encoder differs. Data: espeak-ng spoken
digits (split by voice) and the ten ovos animal recordings (split by pitch/speed/noise variant).

Encoders compared (each classified against the task's class text features, learned with class-specific CoOp):
    vision+proj:  log-mel image → frozen vision tower → trainable linear map (ProjectionTuning, identity init);
    vision+pad:   the same, plus a trainable pixel padding prompt on the spectrogram image;
    mel-cnn:      log-mel → a 3-block CNN trained from scratch → linear map into the joint space (mmfl's
                  ``MelEncoder`` below, registered in-process as modality ``audio-mel``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mmfl.backbone import Backbone
from mmfl.data import AnimalSounds, SpokenWords, Task, prepare_task
from mmfl.federated import Federation, LocalTraining, Simulation
from mmfl.modalities import Modality, register_modality
from mmfl.modalities.audio import AudioModality, decode_audio
from mmfl.prompts import CoOp, PaddingPrompt, ProjectionTuning, TrainablePart

log = logging.getLogger(__name__)


class MelEncoder(TrainablePart):
    """A small log-mel CNN trained from scratch: [B, 1, n_mels, frames] → [B, D]. Conv blocks of 16, 32, 64
    channels (3×3, GroupNorm, ReLU, 2×2 max-pool), global average pool, linear map to the joint space."""

    modalities = ("audio-mel",)

    def __init__(self, backbone: Backbone, class_names: list[str], name: str = "mel", scope: str = "modality") -> None:
        super().__init__(backbone, class_names, name=name, scope=scope)
        layers: list[nn.Module] = []
        for c_in, c_out in ((1, 16), (16, 32), (32, 64)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(64, backbone.embed_dim)

    def encode_mel(self, x: Tensor) -> Tensor:
        """Log-mel spectrograms [B, 1, n_mels, frames] → joint-space features [B, D]."""
        return self.proj(self.net(x))


class MelModality(Modality):
    """Audio as a log-mel spectrogram [1, n_mels, frames] for a trainable :class:`MelEncoder` (no backbone tower)."""

    name = "audio-mel"
    input_key = "audio"
    requires = ("librosa", "soundfile")
    templates = AudioModality.templates

    def __init__(self) -> None:
        self.audio = AudioModality()

    def transform(self, backbone: Backbone, train: bool) -> Callable[[Any], Tensor]:
        """One audio example → log-mel [1, n_mels, frames]."""
        return lambda v: self.audio.log_mel(decode_audio(v, self.audio.sample_rate))[None]

    def validate(self, value: Any) -> None:
        """Decode one example."""
        decode_audio(value, self.audio.sample_rate)

    def encode(self, backbone: Backbone, x: Tensor, parts: Sequence[TrainablePart]) -> Tensor:
        """Log-mels [B, 1, n_mels, frames] → [B, D] through the client's MelEncoder."""
        (enc,) = [p for p in parts if isinstance(p, MelEncoder)]
        return enc.encode_mel(x)


def data_source(name: str):
    """The audio data set behind a benchmark name."""
    return SpokenWords(words="digits") if name == "digits" else AnimalSounds()


ENCODERS = {
    "vision+proj": ("audio", [functools.partial(ProjectionTuning, side="input")]),
    "vision+pad": (
        "audio",
        [functools.partial(ProjectionTuning, side="input"), functools.partial(PaddingPrompt, pad=8)],
    ),
    "mel-cnn": ("audio-mel", [MelEncoder]),
}


def run_one(bb: Backbone, data: str, encoder: str, shots: int, rounds: int, lr: float) -> dict[str, float]:
    """Train one client for ``rounds`` epochs; zero-shot (round 0) and final test top-1, and seconds per epoch."""
    modality, parts = ENCODERS[encoder]
    task = prepare_task(Task(data, data_source(data), modality=modality, clients=1, shots=shots), seed=0)
    coop = functools.partial(CoOp, ctx_init="a photo of a", class_specific=True)
    training = LocalTraining(
        batch_size=32, accelerator="cpu", optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0)
    )
    sim = Simulation(bb, [task], [coop, *parts], training, Federation(rounds=rounds, eval_every=rounds), seed=0)
    t0 = time.perf_counter()
    sim.run()
    seconds = time.perf_counter() - t0
    acc = {int(r["round"]): float(r["accuracy"]) for r in sim.metrics.rows if r["split"] == "test"}
    params = sum(p.numel() for p in sim.clients[0].module.parts.parameters())
    return {"start": acc[0], "final": acc[rounds], "params": params, "s_per_epoch": seconds / rounds}


def main(argv: list[str] | None = None) -> None:
    """Run every (data, encoder) pair and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["digits", "animals"], choices=["digits", "animals"])
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=20, help="epochs of the one client")
    ap.add_argument("--lr", type=float, default=0.003)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    register_modality(MelModality, replace=True)
    bb = Backbone("mmfl-mini")
    rows = []
    for data in args.data:
        for enc in args.encoders:
            r = run_one(bb, data, enc, args.shots, args.rounds, args.lr)
            rows.append((data, enc, r))
            log.warning(
                "%s %s: %.1f%% -> %.1f%% (%d params, %.1f s/epoch)",
                data,
                enc,
                100 * r["start"],
                100 * r["final"],
                r["params"],
                r["s_per_epoch"],
            )
    header = f"| data | encoder | trainable params | start top-1 | after {args.rounds} epochs | s / epoch |"
    lines = [header, "|---|---|---|---|---|---|"]
    for data, enc, r in rows:
        lines.append(
            f"| {data} | {enc} | {r['params']:,} | {100 * r['start']:.1f}% | {100 * r['final']:.1f}% "
            f"| {r['s_per_epoch']:.1f} |"
        )
    print("\n".join(lines))  # the benchmark's output


if __name__ == "__main__":
    main()
