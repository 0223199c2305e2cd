"""Every example of a task must decode before training starts: an unreadable file is named up front (or left out)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import datasets

if TYPE_CHECKING:
    from mmfl.data.task import Task
    from mmfl.modalities import Modality

log = logging.getLogger(__name__)

SHOWN = 3
"""How many undecodable examples an error or warning names."""


def _undecoded(ds: datasets.Dataset, column: str) -> datasets.Dataset:
    """``ds`` with an Image/Audio ``column`` left undecoded (``{"path", "bytes"}`` dicts): decoding is the
    modality's check, so a broken file is named instead of failing inside ``datasets``."""
    feature = ds.features.get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, datasets.Audio) and feature.decode:
        return ds.cast_column(column, datasets.Audio(sampling_rate=feature.sampling_rate, decode=False))
    return ds


def _name(value: Any, index: int) -> str:
    """A file's path when the example has one, else its index."""
    path = value.get("path") if isinstance(value, dict) else None
    return str(path) if path else f"example {index}"


def decodable(task: Task, modality: Modality, ds: datasets.Dataset, column: str, where: str) -> datasets.Dataset:
    """Check every example of ``ds`` with ``modality.validate``; return ``ds`` when all pass.

    Undecodable examples are an error naming the first few files (and how to mend it), or, when the task sets
    ``skip_undecodable``, are left out with a warning giving their count and first names.

    Args:
        task: the task (its name, data source and ``skip_undecodable``).
        modality: the task's modality, whose ``validate`` decodes one raw example.
        ds: the split, inputs under ``column``.
        column: the input column.
        where: the split's name for messages (``train split``, ``test split``).

    Raises:
        ValueError: some examples do not decode and the task does not skip them.
    """
    bad: list[int] = []
    problems: list[str] = []
    index = 0
    for batch in _undecoded(ds, column).select_columns([column]).iter(batch_size=256):
        for value in batch[column]:
            try:
                modality.validate(value)
            except (ValueError, TypeError, OSError) as e:
                bad.append(index)
                name = _name(value, index)
                problems.append(str(e) if name in str(e) else f"{name}: {e}")
            index += 1
    if not bad:
        return ds
    shown = "; ".join(problems[:SHOWN]) + (f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
    source = f"task {task.name!r} ({where} of {task.data.describe()}, column {task.data.input_column!r})"
    if not task.skip_undecodable:
        raise ValueError(
            f"{source}: {len(bad)} of {len(ds)} example(s) cannot be read as {task.modality!r} inputs: {shown}. "
            "Mend or remove them, or set `skip_undecodable: true` on the task (`mmfl zeroshot --skip_undecodable`) "
            "to go on without them."
        )
    log.warning("%s: leaving out %d of %d example(s) that cannot be read: %s", source, len(bad), len(ds), shown)
    drop = set(bad)
    return ds.select([i for i in range(len(ds)) if i not in drop]).flatten_indices()
