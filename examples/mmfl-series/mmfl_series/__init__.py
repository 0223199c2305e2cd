"""mmfl-series: sensor time series as an mmfl modality (an example plugin distribution).

Registered in this distribution's ``pyproject.toml`` under the entry-point group ``mmfl.modalities``::

    [project.entry-points."mmfl.modalities"]
    series = "mmfl_series:SeriesModality"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
from torch import Tensor

from mmfl.backbone import Backbone
from mmfl.data import DataSource
from mmfl.modalities import Modality
from mmfl.modalities.image import encode_with_vision_tower
from mmfl.prompts import TrainablePart

__all__ = ["WAVE_NAMES", "SeriesModality", "Waveforms", "plot"]

WAVE_NAMES = ["sine wave", "square wave", "triangle wave", "sawtooth wave", "random noise"]


def plot(series: np.ndarray, size: tuple[int, int], width: float = 2.0) -> np.ndarray:
    """A series [T] drawn as a line plot: ink (1) on paper (0), min to max filling the height. Returns [H, W].

    The series is linearly resampled to W points; each column is inked from its point to the next one's
    height (so steep edges stay connected), ``width`` pixels thick.
    """
    h, w = size
    v = np.interp(np.linspace(0.0, 1.0, w), np.linspace(0.0, 1.0, len(series)), series)  # [W]
    lo, hi = float(v.min()), float(v.max())
    v = (v - lo) / (hi - lo) if hi > lo else np.full_like(v, 0.5)
    y = (1.0 - v) * 0.9 * (h - 1) + 0.05 * (h - 1)  # [W] row of each point, top = maximum, 5% margins
    nxt = np.append(y[1:], y[-1])  # [W]
    top, bottom = np.minimum(y, nxt) - width / 2, np.maximum(y, nxt) + width / 2  # [W]
    rows = np.arange(h, dtype=float)[:, None]  # [H, 1]
    return ((rows >= top[None]) & (rows <= bottom[None])).astype(np.float32)  # [H, W]


def _as_series(value: Any) -> np.ndarray:
    try:
        series = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"a series must be a sequence of numbers; got {type(value).__name__}: {e}") from None
    if series.ndim != 1 or len(series) < 2:
        raise ValueError(f"a series must be 1-d with at least 2 values; got shape {series.shape}")
    if not np.isfinite(series).all():
        raise ValueError("a series must hold finite numbers (found NaN or inf)")
    return series


class SeriesModality(Modality):
    """1-d sensor series (lists or arrays of numbers) → a line-plot image → the backbone's frozen vision tower.

    Args:
        width: line thickness in pixels.
    """

    name = "series"
    input_key = "series"
    renders_image = True
    templates: ClassVar[tuple[str, ...]] = ("a plot of a {}.", "a signal shaped like a {}.", "a {}.")

    def __init__(self, width: float = 2.0) -> None:
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.width = width

    def transform(self, backbone: Backbone, train: bool) -> Callable[[Any], Tensor]:
        """One series → a normalised plot image [3, H, W]."""
        size = backbone.image_size
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in backbone.image_mean_std)

        def apply(value: Any) -> Tensor:
            paper = 1.0 - torch.from_numpy(plot(_as_series(value), size, self.width))  # [H, W], black on white
            return (paper.expand(3, -1, -1) - mean) / std  # [3, H, W]

        return apply

    def validate(self, value: Any) -> None:
        """A series must be 1-d, numeric and finite."""
        _as_series(value)

    def encode(self, backbone: Backbone, x: Tensor, parts: Sequence[TrainablePart]) -> Tensor:
        """Plot images [B, 3, H, W] → joint-space features [B, D]."""
        return encode_with_vision_tower(backbone, x, parts)


class Waveforms(DataSource):
    """Synthetic sensor series of five shapes (``WAVE_NAMES``), with random frequency (1.5–6 cycles), phase,
    amplitude, offset and additive noise: a seeded, offline series-classification task.

    Args:
        per_class: series per class in each split is ``per_class`` (train) and ``per_class // 4`` (test).
        length: samples per series.
        seed: seeds the train split (the test split uses ``seed + 1``).
    """

    modality = "series"

    def __init__(self, per_class: int = 80, length: int = 256, seed: int = 0) -> None:
        super().__init__("series", "label")
        if per_class < 4 or length < 8:
            raise ValueError("Waveforms needs per_class >= 4 and length >= 8")
        self.per_class, self.length, self.seed = per_class, length, seed

    def _make(self, n: int, seed: int) -> datasets.Dataset:
        rng = np.random.default_rng(seed)
        t = np.linspace(0.0, 1.0, self.length)  # [T]
        series, labels = [], []
        for label in range(len(WAVE_NAMES)):
            for _ in range(n):
                phase = rng.uniform(0.0, 1.0) + rng.uniform(1.5, 6.0) * t  # [T] in cycles
                frac = phase % 1.0
                shape = [
                    np.sin(2 * np.pi * phase),
                    np.where(frac < 0.5, 1.0, -1.0),
                    4.0 * np.abs(frac - 0.5) - 1.0,
                    2.0 * frac - 1.0,
                    rng.normal(0.0, 1.0, self.length),
                ][label]
                noise = rng.normal(0.0, rng.uniform(0.0, 0.15), self.length)
                series.append((rng.uniform(0.5, 2.0) * (shape + noise) + rng.uniform(-1, 1)).astype(np.float32))
                labels.append(label)
        features = datasets.Features(
            {"series": datasets.Sequence(datasets.Value("float32")), "label": datasets.ClassLabel(names=WAVE_NAMES)}
        )
        return datasets.Dataset.from_dict({"series": series, "label": labels}, features=features)

    def load(self) -> datasets.DatasetDict:
        """Train and test splits, drawn with different seeds."""
        return datasets.DatasetDict(
            train=self._make(self.per_class, self.seed), test=self._make(max(1, self.per_class // 4), self.seed + 1)
        )
