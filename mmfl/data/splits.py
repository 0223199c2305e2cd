"""The evaluation protocol's fixed splits: base/novel classes, a validation hold-out, held-out domains."""

from __future__ import annotations

import math

import datasets
import numpy as np

LABEL = "label"
ENCODED = "encoded"
"""The batch key of cached frozen encodings [B, D] that stand in for the raw inputs."""
DOMAIN = "domain"


def split_classes(n_classes: int) -> tuple[list[int], list[int]]:
    """The fixed base-to-novel rule: the first ``ceil(C / 2)`` labels are base, the rest novel.

    This is the rule of CoOp/CoCoOp's benchmark, so mmfl's numbers mean the same thing. It depends on
    the label order only, never on a seed.

    Returns:
        ``(base, novel)`` label lists, disjoint, together ``range(n_classes)``.
    """
    if n_classes < 2:
        raise ValueError(f"a base-to-novel split needs at least 2 classes, got {n_classes}")
    m = math.ceil(n_classes / 2)
    return list(range(m)), list(range(m, n_classes))


def keep_labels(ds: datasets.Dataset, labels: list[int], offset: int = 0) -> datasets.Dataset:
    """The examples whose label is in ``labels``, relabelled ``label - offset``.

    ``labels`` must be the contiguous range ``offset .. offset + len(labels) - 1`` (as :func:`split_classes`
    gives), so relabelling is a shift and the ClassLabel feature becomes the kept names.
    """
    if labels != list(range(offset, offset + len(labels))):
        raise ValueError("keep_labels needs a contiguous label range starting at offset")
    y = np.asarray(ds[LABEL])
    idx = np.flatnonzero((y >= offset) & (y < offset + len(labels)))
    out = ds.select(idx.tolist()).flatten_indices()
    feature = ds.features[LABEL]
    names = feature.names[offset : offset + len(labels)] if isinstance(feature, datasets.ClassLabel) else None
    new = datasets.ClassLabel(names=names) if names else feature
    # a new label column; the other columns (images, audio) are not rewritten
    return out.remove_columns(LABEL).add_column(LABEL, (y[idx] - offset).tolist(), feature=new)


def hold_out(ds: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Split off a seeded ``fraction`` of ``ds`` (at least one example) as validation data.

    Returns:
        ``(rest, held_out)``; ``held_out`` is None when ``fraction`` is 0.
    """
    if fraction <= 0:
        return ds, None
    n = max(1, math.ceil(fraction * len(ds)))
    if n >= len(ds):
        raise ValueError(f"a validation share of {fraction} leaves no training data out of {len(ds)} examples")
    order = np.random.default_rng([seed, 7919]).permutation(len(ds))
    return ds.select(np.sort(order[n:]).tolist()), ds.select(np.sort(order[:n]).tolist())


def drop_domains(ds: datasets.Dataset, domains: list[str]) -> datasets.Dataset:
    """The examples whose ``domain`` is not in ``domains``."""
    keep = set(map(str, domains))
    d = ds[DOMAIN]
    return ds.select([i for i, v in enumerate(d) if str(v) not in keep])
