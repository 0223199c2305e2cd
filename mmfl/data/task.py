"""Task: one label set with its data source, modality and clients; and its preparation into client data."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
from flwr_datasets.partitioner import IidPartitioner, Partitioner

from mmfl.data.decode_check import decodable
from mmfl.data.partitions import Partition, iid_shards, size
from mmfl.data.sources import DataSource
from mmfl.data.splits import DOMAIN, LABEL, drop_domains, hold_out, keep_labels, split_classes
from mmfl.federated.scopes import check_name
from mmfl.modalities import Modality, get_modality_class

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "a black and white photo of a {}.",
    "a drawing of a {}.",
)
"""The hand-written prompt ensemble used when a task names no templates of its own."""


@dataclass
class Task:
    """One task of a federation: a label set, where its data comes from, and who holds it.

    Args:
        name: task name (used in payload keys and reports).
        data: the data source (``class_path`` in a recipe).
        modality: name of the registered modality its clients hold; the data source's (``image`` unless
            it says otherwise) when None.
        modality_args: keyword arguments of that modality's constructor (e.g. ``{seconds: 2.0}`` for
            audio, ``{augment: true}`` for images); its defaults when None.
        clients: number of clients the train split is partitioned over.
        partitioner: a flwr-datasets partitioner class, built with ``clients`` as its first argument
            (e.g. ``DirichletPartitioner`` with ``partition_by: label, alpha: 0.5``); IID when None.
        shots: keep at most this many training examples per class on each client (few-shot).
        local_test_fraction: share of each client's partition held out as its local test set.
        max_test_examples: cap on the task's test split (a fixed subset), for quick runs.
        class_names: label names when the label column has none (or to rename them).
        templates: hand-written prompt templates (``{}`` = class name) for zero-shot class features;
            when None, the modality's own, else :data:`DEFAULT_TEMPLATES`.
        domain_column: a column naming each example's domain (accent, noise level, style, ...); the
            evaluation reports accuracy per domain.
        holdout_domains: domains left out of training (domain shift: they are seen only at test time).
        labeled_fraction: share of the task's training clients whose data carry labels (the first
            ``round(labeled_fraction × clients)`` of them); the others hold their partition without its label column
            and train on pseudo-labels (``training.pseudo_labels``); ``shots`` and ``local_test_fraction`` apply to the
            labeled ones only. 1: every client is labeled; 0: none is.
        skip_undecodable: leave out examples whose input cannot be read (a broken image or audio file), with a
            warning giving their count and first names; by default they are an error before training starts.
    """

    name: str
    data: DataSource
    modality: str | None = None
    modality_args: dict[str, Any] | None = None
    clients: int = 1
    partitioner: Callable[[int], Partitioner] | None = None
    shots: int | None = None
    local_test_fraction: float = 0.0
    max_test_examples: int | None = None
    class_names: list[str] | None = None
    templates: list[str] | None = None
    domain_column: str | None = None
    holdout_domains: list[str] | None = None
    labeled_fraction: float = 1.0
    skip_undecodable: bool = False

    def __post_init__(self) -> None:
        if self.modality is None:  # the data source's own modality (image unless it says otherwise)
            self.modality = getattr(self.data, "modality", "image")

    def build_modality(self) -> Modality:
        """The task's modality, constructed with ``modality_args``.

        Raises:
            ValueError: an argument the modality's constructor does not take, or a value it rejects.
        """
        cls = get_modality_class(self.modality)
        args = dict(self.modality_args or {})
        try:
            inspect.signature(cls).bind(**args)
        except TypeError as e:
            params = [n for n in inspect.signature(cls).parameters if n not in ("self", "args", "kwargs")]
            raise ValueError(
                f"task {self.name!r}: modality_args {sorted(args)} do not fit the {self.modality!r} modality "
                f"({cls.__module__}.{cls.__qualname__}): {e}; it takes {params or 'no arguments'}"
            ) from None
        try:
            return cls(**args)
        except (TypeError, ValueError) as e:
            raise ValueError(f"task {self.name!r}: modality {self.modality!r} rejects modality_args {args}: {e}") from e

    def prompt_templates(self) -> list[str]:
        """The task's templates, else its modality's, else :data:`DEFAULT_TEMPLATES`."""
        if self.templates:
            return list(self.templates)
        return list(get_modality_class(self.modality).templates or DEFAULT_TEMPLATES)


@dataclass
class ClientData:
    """The data one client holds. ``train`` may be given as a :class:`~mmfl.data.partitions.Shard` (bounds in the
    task's training split): it then reads as the shard's ``datasets.Dataset`` view, made when first used."""

    cid: str
    task: str
    modality: str
    train: datasets.Dataset = Partition()  # type: ignore[assignment]  # noqa: RUF009 (a descriptor, not a default)
    test: datasets.Dataset | None = None
    labeled: bool = True
    """False: ``train`` has no label column (it trains on pseudo-labels, :mod:`mmfl.federated.pseudo_labels`)."""

    @property
    def size(self) -> int:
        """The number of training examples (without making a shard's view)."""
        return size(self)

    def classes(self) -> list[int] | None:
        """The labels present in this client's training data (its "own" classes); None for an unlabeled client."""
        if not self.labeled:
            return None
        return sorted(set(np.asarray(self.train[LABEL]).tolist()))


@dataclass
class PreparedTask:
    """A task with its data loaded, checked, normalised and partitioned.

    With a base-to-novel split, ``class_names``, the clients' data, ``val`` and ``test`` hold the base
    classes only; ``test_novel`` holds the novel classes' test examples, labelled ``0 ..`` in the order of
    ``novel_class_names``.
    """

    task: Task
    class_names: list[str]
    input_key: str
    test: datasets.Dataset
    clients: list[ClientData]
    val: datasets.Dataset | None = None
    novel_class_names: list[str] = field(default_factory=list)
    test_novel: datasets.Dataset | None = None
    unseen: list[ClientData] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The task's name."""
        return self.task.name

    @property
    def modality(self) -> str:
        """The task's modality name."""
        return self.task.modality


def check_task(task: Task) -> None:
    """Cheap checks of a task's settings (no data loaded). Raises ValueError naming the problem."""
    check_name("task", task.name)
    check_name("modality", task.modality)
    task.build_modality()  # unknown modality → error listing the available ones; bad modality_args → error
    if task.clients < 1:
        raise ValueError(f"task {task.name!r}: clients must be >= 1, got {task.clients}")
    if task.shots is not None and task.shots < 1:
        raise ValueError(f"task {task.name!r}: shots must be >= 1 or null, got {task.shots}")
    if not 0.0 <= task.local_test_fraction < 1.0:
        raise ValueError(f"task {task.name!r}: local_test_fraction must be in [0, 1)")
    if task.templates is not None and (not task.templates or any("{}" not in t for t in task.templates)):
        raise ValueError(f"task {task.name!r}: every template needs a '{{}}' for the class name")
    if not 0.0 <= task.labeled_fraction <= 1.0:
        raise ValueError(
            f"task {task.name!r}: labeled_fraction must be in [0, 1] (the share of its clients that hold labels), "
            f"got {task.labeled_fraction}"
        )
    if task.holdout_domains and not task.domain_column:
        raise ValueError(f"task {task.name!r}: holdout_domains needs a domain_column naming each example's domain")


def _class_names(task: Task, ds: datasets.Dataset, label_column: str) -> list[str]:
    feature = ds.features[label_column]
    labels = np.asarray(ds[label_column])
    if task.class_names is not None:
        names = list(task.class_names)
    elif isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        raise ValueError(
            f"task {task.name!r}: label column {label_column!r} of {task.data.describe()} has no class names "
            "(it is not a ClassLabel). Give them in the recipe: tasks[].class_names: [name0, name1, ...]"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(
            f"task {task.name!r}: labels run from {labels.min()} to {labels.max()} but there are "
            f"{len(names)} class names; labels must be integers in [0, {len(names)})"
        )
    return names


def _normalise(task: Task, split: str, ds: datasets.Dataset, input_key: str) -> datasets.Dataset:
    src = task.data
    wanted = [src.input_column, src.label_column] + ([task.domain_column] if task.domain_column else [])
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"task {task.name!r}: the {split} split of {src.describe()} has no column(s) {missing}; it has "
            f"{ds.column_names}. Set the data source's input_column / label_column (or the task's domain_column)."
        )
    ds = ds.select_columns(wanted)
    renames = {src.input_column: input_key, src.label_column: LABEL}
    if task.domain_column:
        renames[task.domain_column] = DOMAIN
    renames = {k: v for k, v in renames.items() if k != v}
    if input_key in (LABEL, DOMAIN) and src.input_column != input_key:
        raise ValueError(f"modality input key {input_key!r} clashes with the label or domain column")
    if renames:
        ds = ds.rename_columns(renames)
    return ds


def _few_shot(ds: datasets.Dataset, shots: int, seed: int) -> datasets.Dataset:
    """At most ``shots`` examples per class, chosen by a seeded permutation."""
    labels = np.asarray(ds[LABEL])
    order = np.random.default_rng(seed).permutation(len(labels))
    taken: dict[int, int] = {}
    keep = []
    for i in order:
        c = int(labels[i])
        if taken.get(c, 0) < shots:
            taken[c] = taken.get(c, 0) + 1
            keep.append(int(i))
    return ds.select(sorted(keep))


def load_split(task: Task, split: str = "test", limit: int | None = None) -> tuple[datasets.Dataset, list[str]]:
    """One split of a task's data, checked and normalised (input under the modality's key, ``label``).

    Args:
        task: the task.
        split: ``train`` or ``test``.
        limit: keep a fixed random subset of at most this many examples.

    Returns:
        The split and the class names.
    """
    check_task(task)
    input_key = get_modality_class(task.modality).input_key
    dd = task.data.load()
    if split not in dd:
        raise ValueError(f"task {task.name!r}: {task.data.describe()} has no {split!r} split; it has {list(dd)}")
    ds = _normalise(task, split, dd[split], input_key)
    class_names = _class_names(task, dd[split], task.data.label_column)
    if limit is not None and len(ds) > limit:
        ds = ds.shuffle(seed=0).select(range(limit)).flatten_indices()
    return decodable(task, task.build_modality(), ds, input_key, f"{split} split"), class_names


def labeled_clients(task: Task, trained: int) -> int:
    """How many of a task's ``trained`` clients hold labels: ``round(labeled_fraction × trained)``."""
    return round(task.labeled_fraction * trained)


def prepare_task(
    task: Task,
    seed: int = 0,
    *,
    base_to_novel: bool = False,
    val_fraction: float = 0.0,
    unseen_clients: int = 0,
) -> PreparedTask:
    """Load, check, normalise and partition one task's data.

    Args:
        task: the task.
        seed: seeds the few-shot choice, the local test split and the validation hold-out.
        base_to_novel: train (and validate) on the base classes only (:func:`~mmfl.data.splits.split_classes`);
            the novel classes' test examples go to ``test_novel``.
        val_fraction: share of the training split held out (before partitioning) as validation data for
            checkpoint selection; at most ``max_test_examples`` of it are scored.
        unseen_clients: the last this many of the task's ``clients`` partitions are held out of training
            entirely (``PreparedTask.unseen``), to measure generalisation to clients never seen; each keeps at
            most ``max_test_examples`` of its partition.

    Raises:
        ValueError: missing columns, labels without names, an empty client partition, or settings that leave
            no data.
    """
    check_task(task)
    if not 0 <= unseen_clients < task.clients:
        raise ValueError(
            f"task {task.name!r}: {unseen_clients} unseen client(s) must leave at least one of its {task.clients} "
            "clients to train; raise `clients` or lower evaluation.unseen_clients"
        )
    input_key = get_modality_class(task.modality).input_key
    dd = task.data.load()
    for split in ("train", "test"):
        if split not in dd:
            raise ValueError(f"task {task.name!r}: {task.data.describe()} has no {split!r} split")
    modality = task.build_modality()
    train = decodable(task, modality, _normalise(task, "train", dd["train"], input_key), input_key, "train split")
    test = decodable(task, modality, _normalise(task, "test", dd["test"], input_key), input_key, "test split")
    class_names = _class_names(task, dd["train"], task.data.label_column)
    _class_names(task, dd["test"], task.data.label_column)
    if task.max_test_examples is not None and len(test) > task.max_test_examples:
        test = test.shuffle(seed=0).select(range(task.max_test_examples)).flatten_indices()
    novel_names: list[str] = []
    test_novel = None
    if base_to_novel:
        base, novel = split_classes(len(class_names))
        train, test_novel = keep_labels(train, base), keep_labels(test, novel, offset=len(base))
        test = keep_labels(test, base)
        class_names, novel_names = class_names[: len(base)], class_names[len(base) :]
    if task.holdout_domains:
        seen = set(map(str, train[DOMAIN]))
        unknown = [d for d in task.holdout_domains if str(d) not in seen | set(map(str, test[DOMAIN]))]
        if unknown:
            raise ValueError(
                f"task {task.name!r}: holdout_domains {unknown} occur in no split's column {task.domain_column!r}"
            )
        train = drop_domains(train, task.holdout_domains)
        if len(train) == 0:
            raise ValueError(f"task {task.name!r}: holding out domains {task.holdout_domains} leaves no training data")
    train, val = hold_out(train, val_fraction, seed)
    if val is not None and task.max_test_examples is not None and len(val) > task.max_test_examples:
        val = val.select(range(task.max_test_examples))  # the rest stays held out (never trained on)

    partitioner = (task.partitioner or IidPartitioner)(task.clients)
    if isinstance(partitioner, IidPartitioner):
        # IidPartitioner cuts contiguous shards (FederatedDataset shuffles first): on data stored in label order
        # (the generated audio sets) unshuffled shards would be a pathological split, not an IID one.
        train = train.shuffle(seed=seed).flatten_indices()
    partitioner.dataset = train
    clients, unseen = [], []
    n_labeled = labeled_clients(task, task.clients - unseen_clients)
    # a plain IID shard (labeled, all of it trained on) stays bounds until the client is used
    shards = iid_shards(train, task.clients) if type(partitioner) is IidPartitioner else None
    plain = task.shots is None and task.local_test_fraction == 0
    for i in range(task.clients):
        cid = f"{task.name}/{task.modality}/{i}"
        if shards is not None and plain and i < n_labeled and len(shards[i]):
            clients.append(ClientData(cid, task.name, task.modality, shards[i]))  # type: ignore[arg-type]
            continue
        part = partitioner.load_partition(i)
        if i >= task.clients - unseen_clients:  # held out: its partition is evaluation data (capped like test)
            if task.max_test_examples is not None and len(part) > task.max_test_examples:
                part = part.shuffle(seed=0).select(range(task.max_test_examples))
            unseen.append(ClientData(cid, task.name, task.modality, part.flatten_indices()))
            continue
        labeled = i < n_labeled
        if not labeled:  # the label column is gone before the client holds the data: it can never read it
            part = part.remove_columns([LABEL]).flatten_indices()
        elif task.shots is not None:  # unlabeled clients keep their whole partition: shots budget labels
            part = _few_shot(part, task.shots, seed + i)
        local_test = None
        if task.local_test_fraction > 0 and len(part) > 1 and labeled:  # an unlabeled client has no labels to test
            split = part.train_test_split(test_size=task.local_test_fraction, seed=seed + i)
            part, local_test = split["train"], split["test"]
        if len(part) == 0:
            raise ValueError(
                f"task {task.name!r}: client {i} of {task.clients} got no training examples; "
                "use fewer clients or a less skewed partitioner"
            )
        clients.append(ClientData(cid, task.name, task.modality, part, local_test, labeled))
    log.info(
        "task %s (%s, %d classes%s): %d train examples over %d clients (%s)%s%s, %d test",
        task.name,
        task.modality,
        len(class_names),
        f" base + {len(novel_names)} novel" if base_to_novel else "",
        sum(c.size for c in clients),
        len(clients),
        type(partitioner).__name__,
        f", {len(unseen)} unseen client(s)" if unseen else "",
        f", {len(clients) - n_labeled} of them unlabeled" if n_labeled < len(clients) else "",
        len(test),
    )
    return PreparedTask(task, class_names, input_key, test, clients, val, novel_names, test_novel, unseen)
