"""Data sets that ship inside installed packages, usable with no network."""

from __future__ import annotations

import gzip
import logging
import pickle
from importlib.metadata import PackageNotFoundError, distribution

import datasets
import numpy as np

from mmfl.data.sources import DataSource, _split

log = logging.getLogger(__name__)

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ANIMAL_NAMES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def _image_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> datasets.Dataset:
    """uint8 grey images [N, H, W] + labels [N] → a Dataset with an Image and a ClassLabel column."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)


class SklearnDigits(DataSource):
    """scikit-learn's 1,797 handwritten digits (8×8, 10 classes, BSD-3), with a fixed stratified split.

    Args:
        test_fraction: held-out share.
        seed: seed of the split (fixed: the split never changes with the run's seed).
    """

    def __init__(self, test_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__("image", "label")
        self.test_fraction, self.seed = test_fraction, seed

    def load(self) -> datasets.DatasetDict:
        """Both splits of the digits."""
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)  # [N, 8, 8]
        return _split(_image_dataset(images, d.target, DIGIT_NAMES), self.test_fraction, self.seed, "label")


class AnimalSilhouettes(DataSource):
    """10,000 animal silhouettes (28×28, 10 classes, MIT) from the ``animal-mnist`` package.

    Install it without its declared dependencies (its loader imports TensorFlow, which mmfl does not
    need): ``pip install --no-deps animal-mnist==0.4``.

    Args:
        test_fraction: held-out share.
        seed: seed of the split.
    """

    def __init__(self, test_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__("image", "label")
        self.test_fraction, self.seed = test_fraction, seed
        try:
            self._dist = distribution("animal_mnist")
        except PackageNotFoundError:
            raise ModuleNotFoundError(
                "AnimalSilhouettes needs the animal-mnist package: pip install --no-deps animal-mnist==0.4"
            ) from None

    def _array(self, filename: str) -> np.ndarray:
        path = self._dist.locate_file(f"animal_mnist/data/Animal_MNIST/{filename}")
        with gzip.open(path, "rb") as fh:
            return np.asarray(pickle.load(fh))

    def load(self) -> datasets.DatasetDict:
        """Both splits of the silhouettes."""
        images = self._array("animal_data_version_3.gz").astype(np.uint8)  # [10000, 28, 28]
        labels = self._array("animal_label_version_3.gz").astype(np.int64)  # [10000]
        return _split(_image_dataset(images, labels, ANIMAL_NAMES), self.test_fraction, self.seed, "label")
