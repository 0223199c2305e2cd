"""Data: sources, normalisation, partitioning, few-shot, and bad-input errors."""

from __future__ import annotations

import functools
from pathlib import Path

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner
from PIL import Image

from mmfl.data import HubDataset, ImageFolder, InMemory, SklearnDigits, Task, prepare_task
from mmfl.data.bundled import DIGIT_NAMES


def test_digits_split_is_fixed_and_named() -> None:
    a, b = SklearnDigits().load(), SklearnDigits().load()
    assert len(a["train"]) + len(a["test"]) == 1797
    assert a["train"]["label"] == b["train"]["label"]
    assert a["train"].features["label"].names == DIGIT_NAMES


def test_iid_partitions_cover_the_train_split_once() -> None:
    p = prepare_task(Task("digits", SklearnDigits(), clients=3))
    sizes = [len(c.train) for c in p.clients]
    assert sum(sizes) == 1437 and max(sizes) - min(sizes) <= 1
    assert [c.cid for c in p.clients] == ["digits/image/0", "digits/image/1", "digits/image/2"]
    assert p.class_names == DIGIT_NAMES and p.input_key == "image"


def test_pathological_partitioner_gives_k_classes_per_client() -> None:
    part = functools.partial(PathologicalPartitioner, partition_by="label", num_classes_per_partition=2, seed=1)
    p = prepare_task(Task("digits", SklearnDigits(), clients=5, partitioner=part))
    for c in p.clients:
        assert len(set(c.train["label"])) <= 2


def test_dirichlet_skews_labels() -> None:
    part = functools.partial(DirichletPartitioner, partition_by="label", alpha=0.1, min_partition_size=5, seed=0)
    p = prepare_task(Task("digits", SklearnDigits(), clients=4, partitioner=part))
    shares = [np.bincount(c.train["label"], minlength=10) / len(c.train) for c in p.clients]
    assert max(s.max() for s in shares) > 0.3  # IID would give ~0.1 per class


def test_few_shot_and_local_test_split() -> None:
    p = prepare_task(Task("digits", SklearnDigits(), clients=2, shots=4, local_test_fraction=0.25))
    for c in p.clients:
        counts = np.bincount(list(c.train["label"]) + list(c.test["label"]), minlength=10)
        assert counts.max() <= 4 and counts.sum() == 40
        assert len(c.test) == 10


def test_max_test_examples_caps_the_test_split() -> None:
    assert len(prepare_task(Task("digits", SklearnDigits(), max_test_examples=50)).test) == 50


def test_image_folder_offline(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("circle", "square"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    p = prepare_task(Task("shapes", ImageFolder(str(tmp_path), test_fraction=0.2)))
    assert p.class_names == ["circle", "square"]
    assert len(p.clients[0].train) == 8 and len(p.test) == 2


def _csv(tmp_path: Path, header: str, rows: list[str]) -> str:
    path = tmp_path / "data.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def test_missing_label_column_is_named(tmp_path: Path) -> None:
    src = HubDataset(
        "csv",
        data_files=_csv(tmp_path, "text,y", ["a,0", "b,1"] * 5),
        test_split=None,
        input_column="text",
        label_column="label",
    )
    with pytest.raises(ValueError, match=r"no column\(s\) \['label'\]; it has \['text', 'y'\]"):
        prepare_task(Task("t", src))


def test_labels_without_names_need_class_names(tmp_path: Path) -> None:
    data = {"image": [np.zeros((4, 4), np.uint8)] * 6, "label": [0, 1, 0, 1, 0, 1]}
    with pytest.raises(ValueError, match="has no class names"):
        prepare_task(Task("t", InMemory(datasets.Dataset.from_dict(data), test_fraction=0.5)))
    p = prepare_task(Task("t", InMemory(data, test_fraction=0.5), class_names=["off", "on"]))
    assert p.class_names == ["off", "on"]


def test_too_few_class_names_is_an_error() -> None:
    with pytest.raises(ValueError, match="labels run from 0 to 9 but there are 2 class names"):
        prepare_task(Task("digits", SklearnDigits(), class_names=["a", "b"]))


def test_bad_task_names_and_settings() -> None:
    with pytest.raises(ValueError, match="without '/'"):
        prepare_task(Task("a/b", SklearnDigits()))
    with pytest.raises(ValueError, match="every template needs"):
        prepare_task(Task("d", SklearnDigits(), templates=["no slot"]))
    with pytest.raises(ValueError, match="clients must be >= 1"):
        prepare_task(Task("d", SklearnDigits(), clients=0))


@pytest.mark.parametrize(
    ("name", "train", "test", "first_class"),
    [
        ("digits", 1437, 360, "zero"),
        ("animals", 8000, 2000, "bear"),
        ("photos", 0, 16, "astronaut"),
        ("fashion", 60000, 10000, "T-shirt"),
    ],
)
def test_bundled_sets_load_with_names_and_split_sizes(name, train, test, first_class) -> None:
    from mmfl.data.bundled import BUNDLED

    try:
        source = BUNDLED[name]()
    except FileNotFoundError as e:  # fashion needs a Debian package
        assert "apt-get install dataset-fashion-mnist" in str(e)
        pytest.skip(str(e))
    dd = source.load()
    assert (len(dd["train"]), len(dd["test"])) == (train, test)
    assert dd["test"].features["label"].names[0] == first_class
    assert dd["test"].features["label"].num_classes == (16 if name == "photos" else 10)


def test_fashion_missing_says_how_to_install(tmp_path: Path) -> None:
    from mmfl.data import FashionMNIST

    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(root=str(tmp_path))
