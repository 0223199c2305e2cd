"""Client partitions kept as bounds until a client is sampled.

An IID partition is a contiguous shard of the task's shuffled training split (flwr-datasets' ``IidPartitioner``
cuts it with ``datasets.Dataset.shard(contiguous=True)``). Making the ``datasets.Dataset`` view of each of
10,000 shards costs about 2 ms apiece and a few kilobytes each for the whole run; a :class:`Shard` holds only the
shard's bounds, and :attr:`ClientData.train` makes the view when the client is used (a sampled client's fit), the
same view ``shard`` makes. The views last used are kept (:data:`KEEP`), so a small federation makes each once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import datasets

KEEP = 256
"""Views of shards kept for reuse (the most recently used)."""

# (id of the source, start, stop) → (the source, kept alive so that its id is not reused while cached; the view)
_views: OrderedDict[tuple[int, int, int], tuple[datasets.Dataset, datasets.Dataset]] = OrderedDict()


@dataclass(frozen=True, eq=False)
class Shard:
    """Rows ``[start, stop)`` of ``source`` (a task's shuffled training split, shared by all its shards)."""

    source: datasets.Dataset
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self) -> datasets.Dataset:
        """The shard as a ``datasets.Dataset`` (a view of ``source``'s table), made or reused."""
        key = (id(self.source), self.start, self.stop)
        kept = _views.get(key)
        if kept is None:
            kept = _views[key] = (self.source, self.source.select(range(self.start, self.stop)))
            while len(_views) > KEEP:
                _views.popitem(last=False)
        else:
            _views.move_to_end(key)
        return kept[1]


def iid_shards(source: datasets.Dataset, n: int) -> list[Shard]:
    """The ``n`` contiguous shards of ``source`` that ``source.shard(n, i, contiguous=True)`` gives, as bounds."""
    div, mod = divmod(len(source), n)
    shards = []
    for i in range(n):
        start = div * i + min(i, mod)
        shards.append(Shard(source, start, start + div + (1 if i < mod else 0)))
    return shards


class Partition:
    """A data descriptor for :class:`~mmfl.data.task.ClientData`'s ``train``: a ``datasets.Dataset``, or a
    :class:`Shard` that reads as its view."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> datasets.Dataset:
        if obj is None:  # no class-level default: the dataclass field stays required
            raise AttributeError(self.slot[1:])
        value = obj.__dict__[self.slot]
        return value.view() if isinstance(value, Shard) else value

    def __set__(self, obj: Any, value: datasets.Dataset | Shard) -> None:
        obj.__dict__[self.slot] = value


def size(obj: Any, name: str = "train") -> int:
    """The number of examples in ``obj.<name>`` without making a shard's view."""
    return len(obj.__dict__[f"_{name}"])
