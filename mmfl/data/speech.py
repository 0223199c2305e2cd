"""Offline audio data: words spoken by espeak-ng's voices, and Asterisk's recorded digits (Debian packages)."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np

from mmfl.backbones import cache_dir
from mmfl.data.bundled import ANIMAL_NAMES, DIGIT_NAMES
from mmfl.data.sources import DataSource

log = logging.getLogger(__name__)

ASTERISK_DIR = "/usr/share/asterisk/sounds"
# espeak-ng's own English voices (no MBROLA) and voice variants: 5 accents × 8 speakers
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp")
VARIANTS = ("m1", "m3", "m5", "m7", "f1", "f2", "f4", "klatt")


class SpokenWords(DataSource):
    """Each class name spoken by many synthetic voices (espeak-ng: accents × speaker variants × speed ×
    pitch), as WAV files in mmfl's cache (made once, then reused). An audio task: ``modality: audio``.

    Install espeak-ng with ``sudo apt-get install espeak-ng`` (optional: nothing else needs it). The
    split is by voice, so no test voice is heard in training.

    Args:
        words: the class names, spoken as written (``digits`` and ``animals`` are shorthands).
        accents: espeak-ng English voices.
        variants: speaker variants (``+m1``, ``+f2``, ...).
        speeds: words per minute.
        pitches: pitch values 0–99.
        test_fraction: share of the (accent, variant) voices held out for testing.
        seed: seed of that voice split.
    """

    modality = "audio"

    def __init__(
        self,
        words: str | Sequence[str] = "digits",
        accents: Sequence[str] = ACCENTS,
        variants: Sequence[str] = VARIANTS,
        speeds: Sequence[int] = (130, 175),
        pitches: Sequence[int] = (35, 65),
        test_fraction: float = 0.25,
        seed: int = 0,
    ) -> None:
        super().__init__("audio", "label")
        presets = {"digits": DIGIT_NAMES, "animals": ANIMAL_NAMES}
        self.words = list(presets[words]) if isinstance(words, str) and words in presets else list(words)
        if isinstance(words, str) and words not in presets:
            raise ValueError(f"SpokenWords: words={words!r}; give a list of words, or one of {sorted(presets)}")
        self.voices = [f"{a}+{v}" for a in accents for v in variants]
        self.speeds, self.pitches = list(speeds), list(pitches)
        self.test_fraction, self.seed = test_fraction, seed
        self._espeak = shutil.which("espeak-ng")
        if self._espeak is None:
            raise FileNotFoundError("SpokenWords needs espeak-ng: install it with `sudo apt-get install espeak-ng`")
        if len(self.voices) < 2:
            raise ValueError("SpokenWords needs at least 2 voices (one to train on, one to test on)")

    def describe(self) -> str:
        """Name and size, for logs and errors."""
        return f"SpokenWords({len(self.words)} words × {len(self.voices)} voices)"

    def _folder(self) -> Path:
        spec = json.dumps([self.words, self.voices, self.speeds, self.pitches])
        return cache_dir() / "speech" / hashlib.sha256(spec.encode()).hexdigest()[:16]

    def synthesize(self) -> list[tuple[str, int, str]]:
        """Make (once) and list the clips: (path, label, voice)."""
        folder = self._folder()
        clips = []
        todo = []
        for (label, word), voice, speed, pitch in itertools.product(
            enumerate(self.words), self.voices, self.speeds, self.pitches
        ):
            path = folder / f"{label}_{voice.replace('+', '_')}_{speed}_{pitch}.wav"
            clips.append((str(path), label, voice))
            if not path.is_file():
                todo.append((path, word, voice, speed, pitch))
        if todo:
            log.info("synthesising %d spoken words with espeak-ng into %s", len(todo), folder)
            folder.mkdir(parents=True, exist_ok=True)
            for path, word, voice, speed, pitch in todo:
                fd, tmp = tempfile.mkstemp(suffix=".wav", dir=folder)
                os.close(fd)
                cmd = [self._espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp, word]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0 or os.path.getsize(tmp) == 0:
                    Path(tmp).unlink(missing_ok=True)
                    raise RuntimeError(f"espeak-ng failed for voice {voice!r}, word {word!r}: {done.stderr.strip()}")
                os.replace(tmp, path)
        return clips

    def load(self) -> datasets.DatasetDict:
        """Train and test splits, disjoint in voices: columns ``audio`` (WAV path), ``label`` and ``accent`` (the
        espeak-ng voice's accent: a domain, for ``Task.domain_column``)."""
        clips = self.synthesize()
        rng = np.random.default_rng(self.seed)
        voices = list(rng.permutation(self.voices))
        n_test = max(1, round(self.test_fraction * len(voices)))
        test_voices = set(voices[:n_test])
        features = datasets.Features(
            {
                "audio": datasets.Value("string"),
                "label": datasets.ClassLabel(names=self.words),
                "accent": datasets.Value("string"),
            }
        )
        out = {}
        for split, keep in (("train", lambda v: v not in test_voices), ("test", lambda v: v in test_voices)):
            rows = [(p, y, v.split("+")[0]) for p, y, v in clips if keep(v)]
            out[split] = datasets.Dataset.from_dict(
                {"audio": [r[0] for r in rows], "label": [r[1] for r in rows], "accent": [r[2] for r in rows]},
                features=features,
            )
        return datasets.DatasetDict(out)


class AsteriskDigits(DataSource):
    """The digits zero–nine recorded by real speakers for Asterisk (Debian ``asterisk-core-sounds-*-wav``,
    CC-BY-SA-3.0; 8 kHz): one recording per digit per installed voice — a small real-speech test set
    for models trained on synthetic speech. Its train split is empty.

    Install with ``sudo apt-get install asterisk-core-sounds-en-wav``.

    Args:
        root: Asterisk's sounds folder.
    """

    modality = "audio"

    def __init__(self, root: str = ASTERISK_DIR) -> None:
        super().__init__("audio", "label")
        self.root = root
        # one file per recording: language folders such as en/ are links to a voice folder
        self.files = sorted({f.resolve() for f in Path(root).glob("*/digits/[0-9].wav")})
        if not self.files:
            raise FileNotFoundError(
                f"no Asterisk digit recordings under {root!r}: install them with "
                "`sudo apt-get install asterisk-core-sounds-en-wav`"
            )

    def load(self) -> datasets.DatasetDict:
        """An empty train split and every recorded digit as the test split."""
        features = datasets.Features(
            {"audio": datasets.Value("string"), "label": datasets.ClassLabel(names=DIGIT_NAMES)}
        )
        test = datasets.Dataset.from_dict(
            {"audio": [str(f) for f in self.files], "label": [int(f.stem) for f in self.files]}, features=features
        )
        train = datasets.Dataset.from_dict({"audio": [], "label": []}, features=features)
        return datasets.DatasetDict(train=train, test=test)
