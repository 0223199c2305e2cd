"""The audio modality: waveforms → log-mel spectrograms → the frozen vision tower, as images."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mmfl.backbone import Backbone
from mmfl.modalities.base import Modality
from mmfl.modalities.image import encode_with_vision_tower
from mmfl.prompts.base import TrainablePart


def decode_audio(value: Any, sample_rate: int) -> np.ndarray:
    """One audio example → mono float32 waveform [T] at ``sample_rate``.

    Accepts a file path, raw file bytes, a Hugging Face audio dict (``{"array", "sampling_rate"}`` or
    ``{"path", "bytes"}``), or a plain array (taken to be at ``sample_rate`` already).

    Raises:
        ValueError: the value cannot be decoded (naming the file) or has an unusable sample rate.
    """
    import librosa

    wave, rate = read_audio(value, sample_rate)
    if rate != sample_rate:
        wave = librosa.resample(wave, orig_sr=rate, target_sr=sample_rate)
    return wave.astype(np.float32)


def read_audio(value: Any, sample_rate: int) -> tuple[np.ndarray, int]:
    """One audio example → (mono float32 waveform [T], its sample rate), not resampled; see :func:`decode_audio`
    (a plain array is taken to be at ``sample_rate``)."""
    import soundfile

    rate: int | None = None
    source: Any = None
    if isinstance(value, dict):
        if value.get("array") is not None:
            wave, rate = np.asarray(value["array"], dtype=np.float32), value.get("sampling_rate")
            if rate is None:
                raise ValueError("audio dict with an 'array' but no 'sampling_rate'")
        elif value.get("bytes") is not None:
            source = value["bytes"]
        elif value.get("path") is not None:
            source = value["path"]
        else:
            raise ValueError(f"audio dict needs 'array' + 'sampling_rate', 'bytes' or 'path'; got keys {sorted(value)}")
    elif isinstance(value, str | bytes):
        source = value
    else:
        wave, rate = np.asarray(value, dtype=np.float32), sample_rate
    if source is not None:
        name = source if isinstance(source, str) else f"<{len(source)} bytes>"
        try:
            wave, rate = soundfile.read(io.BytesIO(source) if isinstance(source, bytes) else source, dtype="float32")
        except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or OSError
            raise ValueError(f"cannot decode audio {name!r}: {e}") from e
    if wave.ndim == 2:  # [T, channels] → mono
        wave = wave.mean(axis=1)
    if wave.ndim != 1:
        raise ValueError(f"audio must be a 1-d waveform (or [T, channels]); got shape {wave.shape}")
    if not 1000 <= int(rate) <= 384_000:
        raise ValueError(f"audio sample rate {rate} Hz is not plausible (expected 1 kHz – 384 kHz)")
    return wave, int(rate)


class AudioModality(Modality):
    """Sound (files, bytes, HF audio dicts or arrays) → log-mel spectrogram → the frozen vision tower.

    The spectrogram (``n_mels`` bands × frames over ``seconds`` of audio, in dB relative to the clip's
    loudest bin, −80..0 dB scaled to [0, 1]) is
    resized to the vision tower's input and normalised like an image, so every image part applies
    (pixel prompts, VPT on ViTs, input adapters). The frozen tower knows images, not sounds: pair it
    with a trainable input-side part (e.g. ``ProjectionTuning(side=input, scope=modality)``) that
    maps its features into the joint space, where the class prompts are. See docs/modalities.md for the
    measurement behind this choice.

    Args:
        sample_rate: waveforms are resampled to this rate (Hz).
        seconds: clip length: longer clips are cut (centred; randomly when ``augment`` and training),
            shorter ones zero-padded.
        n_mels: mel bands.
        augment: random crop position when training.
    """

    name = "audio"
    input_key = "audio"
    renders_image = True
    requires = ("librosa", "soundfile")
    templates: ClassVar[tuple[str, ...]] = ("the sound of {}.", "a recording of {}.", "someone saying {}.")

    def __init__(
        self, sample_rate: int = 16_000, seconds: float = 1.0, n_mels: int = 64, augment: bool = False
    ) -> None:
        if not 1000 <= sample_rate <= 384_000 or seconds <= 0 or n_mels < 1:
            raise ValueError(
                f"AudioModality: sample_rate={sample_rate} (1000–384000 Hz), seconds={seconds} (> 0) and "
                f"n_mels={n_mels} (>= 1) must all be in range"
            )
        self.sample_rate, self.seconds, self.n_mels, self.augment = sample_rate, seconds, n_mels, augment

    def log_mel(self, wave: np.ndarray, rng: np.random.Generator | None = None) -> Tensor:
        """Waveform [T] → log-mel spectrogram, 80 dB below the clip's loudest bin to it, as [0, 1]. [n_mels, frames]."""
        import librosa

        n = round(self.seconds * self.sample_rate)
        if len(wave) > n:
            start = int(rng.integers(0, len(wave) - n + 1)) if rng is not None else (len(wave) - n) // 2
            wave = wave[start : start + n]
        wave = np.pad(wave, (0, n - len(wave)))
        hop = self.sample_rate // 100  # 10 ms frames
        mel = librosa.feature.melspectrogram(
            y=wave, sr=self.sample_rate, n_fft=4 * hop, hop_length=hop, n_mels=self.n_mels
        )  # [n_mels, frames]
        db = librosa.power_to_db(mel, ref=np.max, amin=1e-10, top_db=None)  # the loudest bin is 0 dB: gain-free
        return torch.from_numpy(np.clip((db + 80.0) / 80.0, 0.0, 1.0)).float()  # [n_mels, frames]

    def transform(self, backbone: Backbone, train: bool) -> Callable[[Any], Tensor]:
        """One audio example → a normalised spectrogram image [3, H, W] for the vision tower."""
        size = backbone.image_size
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in backbone.image_mean_std)
        # seeded from torch's generator, so runs seeded with seed_all() stay reproducible
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, ()))) if (train and self.augment) else None

        def apply(value: Any) -> Tensor:
            spec = self.log_mel(decode_audio(value, self.sample_rate), rng).flip(0)  # low frequencies at the bottom
            img = F.interpolate(spec[None, None], size=size, mode="bilinear", align_corners=False)[0]  # [1, H, W]
            return (img.expand(3, -1, -1) - mean) / std  # [3, H, W]

        return apply

    def validate(self, value: Any) -> None:
        """Decode one example, without resampling (raises ValueError naming the file when it cannot be)."""
        read_audio(value, self.sample_rate)

    def encode(self, backbone: Backbone, x: Tensor, parts: Sequence[TrainablePart]) -> Tensor:
        """Spectrogram images [B, 3, H, W] → joint-space features [B, D] (with the parts' VPT tokens, if any)."""
        return encode_with_vision_tower(backbone, x, parts)

    def cache_id(self, backbone: Backbone, train: bool) -> str | None:
        """Every setting the spectrogram image depends on; None when cropping at random."""
        if train and self.augment:
            return None
        return (
            f"audio|sr={self.sample_rate}|s={self.seconds}|mels={self.n_mels}|size={backbone.image_size}|"
            f"norm={backbone.image_mean_std}"
        )
