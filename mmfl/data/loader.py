"""DataLoaders over HF datasets that fetch whole batches at once and apply a modality's transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from mmfl.data.task import LABEL


class BatchCollate:
    """Turn a fetched batch (dict of lists) into ``{input_key: Tensor [B, ...], "label": Tensor [B]}`` (no ``label``
    for data without a label column: an unlabeled client's)."""

    def __init__(self, input_key: str, transform: Callable[[Any], Tensor]) -> None:
        self.input_key, self.transform = input_key, transform

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, Tensor]:
        inputs = torch.stack([self.transform(v) for v in batch[self.input_key]])  # [B, ...]
        if LABEL not in batch:
            return {self.input_key: inputs}
        return {self.input_key: inputs, LABEL: torch.as_tensor(batch[LABEL], dtype=torch.long)}


def make_loader(
    ds: datasets.Dataset,
    input_key: str,
    transform: Callable[[Any], Tensor],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader whose sampler yields index lists, so the dataset is read a batch at a time.

    Shuffling uses its own generator seeded with ``seed``, so the order depends on nothing else.
    """
    if shuffle:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(ds)
    return DataLoader(
        ds,
        sampler=BatchSampler(sampler, batch_size=batch_size, drop_last=False),
        batch_size=None,
        collate_fn=BatchCollate(input_key, transform),
        num_workers=num_workers,
    )
