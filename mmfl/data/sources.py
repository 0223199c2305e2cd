"""Data sources: where a task's labelled examples come from, as Hugging Face ``datasets``."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import datasets
import datasets.exceptions

from mmfl.hub import Unavailable, fetching, held_back

log = logging.getLogger(__name__)


class DataSource(ABC):
    """A labelled data set with a train and a test split.

    ``load()`` returns a ``datasets.DatasetDict`` with splits ``train`` and ``test``; examples hold
    the input in ``input_column`` and an integer label in ``label_column``.

    Args:
        input_column: column holding the inputs (images, sentences, waveforms, ...).
        label_column: column holding integer labels (ideally a ``ClassLabel`` with names).
    """

    def __init__(self, input_column: str = "image", label_column: str = "label") -> None:
        self.input_column = input_column
        self.label_column = label_column

    @abstractmethod
    def load(self) -> datasets.DatasetDict:
        """Load both splits (``train`` and ``test``)."""

    def describe(self) -> str:
        """A short human-readable name for logs and errors."""
        return type(self).__name__


def _split(ds: datasets.Dataset, test_fraction: float, seed: int, label_column: str) -> datasets.DatasetDict:
    """A fixed train/test split, stratified when labels are a ClassLabel.

    A stratified split holds out at least one example per class; when the data are too few for that,
    the split is not stratified.
    """
    feature = ds.features.get(label_column)
    n_test = math.ceil(test_fraction * len(ds))
    stratify = None
    if isinstance(feature, datasets.ClassLabel) and len(ds) >= 2 * feature.num_classes:
        stratify, n_test = label_column, max(n_test, feature.num_classes)
    parts = ds.train_test_split(test_size=n_test, seed=seed, stratify_by_column=stratify)
    return datasets.DatasetDict(train=parts["train"], test=parts["test"])


class HubDataset(DataSource):
    """Any data set ``datasets.load_dataset`` can open: a hub id (needs network), or a builder such as
    ``imagefolder``/``csv``/``json`` with ``data_dir``/``data_files``.

    Args:
        path: hub id (``"uoft-cs/cifar10"``) or builder name (``"imagefolder"``).
        name: configuration name.
        train_split: split used for training.
        test_split: split used for testing; when None, ``test_fraction`` of the train split is held out.
        test_fraction: held-out share when there is no test split.
        seed: seed of that held-out split.
        input_column: input column.
        label_column: label column.
        data_dir: local folder for builders such as ``imagefolder``.
        data_files: local files for builders such as ``csv``.
        revision: hub revision (pin it for reproducible runs).
        load_kwargs: further keyword arguments for ``datasets.load_dataset``.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        train_split: str = "train",
        test_split: str | None = "test",
        test_fraction: float = 0.2,
        seed: int = 0,
        input_column: str = "image",
        label_column: str = "label",
        data_dir: str | None = None,
        data_files: str | list[str] | dict[str, Any] | None = None,
        revision: str | None = None,
        load_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(input_column, label_column)
        self.path, self.name, self.revision = path, name, revision
        self.train_split, self.test_split = train_split, test_split
        self.test_fraction, self.seed = test_fraction, seed
        self.data_dir, self.data_files = data_dir, data_files
        self.load_kwargs = dict(load_kwargs or {})
        if data_dir is not None and not Path(data_dir).is_dir():
            raise FileNotFoundError(f"data_dir {data_dir!r} does not exist or is not a folder")

    def describe(self) -> str:
        """The path (and data_dir or data_files) of the data set."""
        where = self.data_dir or (self.data_files if isinstance(self.data_files, str | list) else None)
        return f"{self.path}" + (f" ({where})" if where else "")

    def load(self) -> datasets.DatasetDict:
        """Open the data set and return its train and test splits."""
        local = (
            "use a local copy: `class_path: mmfl.data.ImageFolder` with `data_dir`, or `mmfl.data.HubDataset` with "
            "path csv/json/parquet/audiofolder and `data_files` or `data_dir`"
        )
        try:
            with fetching(f"data set {self.describe()!r}", local), held_back("datasets.packaged_modules") as notes:
                dd = datasets.load_dataset(
                    self.path,
                    self.name,
                    data_dir=self.data_dir,
                    data_files=self.data_files,
                    revision=self.revision,
                    **self.load_kwargs,
                )
        except datasets.exceptions.DatasetGenerationError as e:  # a local or fetched file that cannot be parsed
            cause = e.__cause__ or e
            mend = (
                "save the file(s) as UTF-8, or pass `load_kwargs: {encoding: <their encoding>}`"
                if isinstance(cause, UnicodeDecodeError)
                else "mend or remove the file(s), or check the builder's options (load_kwargs)"
            )
            where = next((n for n in notes if "Failed to read file" in n), "")  # the builder names the file
            where = where.split(" with error")[0].replace("Failed to read file", "file") + ": " if where else ""
            raise Unavailable(
                f"data set {self.describe()!r}: cannot read its files: {where}{type(cause).__name__}: {cause}; {mend}"
            ) from e
        if self.train_split not in dd:
            raise KeyError(f"{self.describe()}: no split {self.train_split!r}; it has {list(dd)}")
        if self.test_split is not None and self.test_split in dd:
            return datasets.DatasetDict(train=dd[self.train_split], test=dd[self.test_split])
        if self.test_split is not None and self.test_split != "test":
            raise KeyError(f"{self.describe()}: no split {self.test_split!r}; it has {list(dd)}")
        return _split(dd[self.train_split], self.test_fraction, self.seed, self.label_column)


class ImageFolder(HubDataset):
    """A local folder of images, one sub-folder per class (``root/<class>/<file>``), or with
    ``train/`` and ``test/`` sub-folders that each hold class folders.

    Args:
        data_dir: the folder.
        test_fraction: held-out share when the folder has no ``test/`` split.
        seed: seed of that split.
    """

    def __init__(self, data_dir: str, test_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__(
            "imagefolder",
            data_dir=data_dir,
            test_fraction=test_fraction,
            seed=seed,
            input_column="image",
            label_column="label",
        )


class InMemory(DataSource):
    """Data already in memory: a ``datasets.Dataset`` (split here) or a ``DatasetDict``.

    Args:
        data: the data set, or a dict of columns for ``datasets.Dataset.from_dict``.
        class_names: names of the integer labels (makes the label column a ``ClassLabel``).
        test_fraction: held-out share when ``data`` is not already split.
        seed: seed of that split.
        input_column: input column.
        label_column: label column.
    """

    def __init__(
        self,
        data: datasets.Dataset | datasets.DatasetDict | dict[str, list[Any]],
        class_names: list[str] | None = None,
        test_fraction: float = 0.2,
        seed: int = 0,
        input_column: str = "image",
        label_column: str = "label",
    ) -> None:
        super().__init__(input_column, label_column)
        if isinstance(data, dict) and not isinstance(data, datasets.DatasetDict):  # a DatasetDict is a dict too
            data = datasets.Dataset.from_dict(data)
        self.data, self.class_names = data, class_names
        self.test_fraction, self.seed = test_fraction, seed

    def load(self) -> datasets.DatasetDict:
        """The held data, split into train and test."""
        data = self.data
        if self.class_names is not None:
            data = data.cast_column(self.label_column, datasets.ClassLabel(names=list(self.class_names)))
        if isinstance(data, datasets.DatasetDict):
            return data
        return _split(data, self.test_fraction, self.seed, self.label_column)
