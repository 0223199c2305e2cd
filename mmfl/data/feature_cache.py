"""Frozen-feature cache: when nothing trainable touches the input side of a client's encoder, each input's
encoding is computed once and reused across epochs, rounds, clients and runs.

Entries are keyed by (backbone weights, transform, example): the backbone by a digest of its frozen tensors
(a random-weight backbone built with another seed is another backbone), the transform by the modality's
:meth:`~mmfl.modalities.base.Modality.cache_id`, the example by a digest of its raw stored value (image bytes,
waveform, text). Any change to one of the three is a miss, never a stale hit. Inputs are always encoded in batches
of the cache's full batch size (the last one padded) on its device, and those two are part of the key too: an
encoding then never depends on which other inputs were missing with it, so a run gives the same figures whether
the cache was empty or full when it started. On disk, one safetensors file per
(backbone, transform) under ``$MMFL_CACHE/features`` holds the digests and the features; it is rewritten
atomically whenever entries were added.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from mmfl.backbone import Backbone
from mmfl.backbones import cache_dir
from mmfl.data.loader import make_loader
from mmfl.data.splits import ENCODED, LABEL
from mmfl.federated.checkpoint import load_state, save_state
from mmfl.modalities.base import Modality

log = logging.getLogger(__name__)


def example_digest(value: Any) -> bytes:
    """A 16-byte digest of one stored (undecoded) example: bytes, text, numbers, or nests of them."""
    h = hashlib.blake2b(digest_size=16)

    def feed(v: Any) -> None:
        if isinstance(v, bytes | bytearray | memoryview):
            h.update(b"b%d:" % len(v))
            h.update(v)
        elif isinstance(v, str):
            h.update(b"s" + v.encode() + b"\0")
        elif isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v):
                feed(str(k))
                feed(v[k])
            h.update(b"}")
        elif isinstance(v, list | tuple):
            h.update(b"[%d" % len(v))
            for x in v:
                feed(x)
            h.update(b"]")
        else:  # numbers, None, booleans
            h.update(pickle.dumps(v, protocol=4))

    feed(value)
    return h.digest()


def backbone_digest(backbone: Backbone) -> str:
    """A digest of the backbone's name and every frozen tensor (names, shapes, dtypes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(backbone.model_name.encode())
    for name, t in sorted(backbone.model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FeatureCache:
    """Encodings of inputs by a frozen encoder, in memory and (optionally) on disk.

    Args:
        backbone: the frozen backbone.
        directory: where cache files live (None: memory only).
        batch_size: batch size of the encoding passes.
        device: where to encode (default: the backbone's device).
    """

    def __init__(
        self, backbone: Backbone, directory: str | Path | None = None, batch_size: int = 64, device: str | None = None
    ) -> None:
        self.backbone = backbone
        self.directory = Path(directory) if directory is not None else None
        self.batch_size = batch_size
        self.device = device
        self._backbone_digest: str | None = None
        self._stores: dict[str, tuple[dict[bytes, int], list[Tensor]]] = {}
        self._digests: dict[str, list[bytes]] = {}  # per dataset fingerprint
        self._labels: dict[str, Tensor] = {}
        self.hits = self.misses = 0

    # ---------------------------------------------------------------- keys
    def store_key(self, modality: Modality, train: bool) -> str | None:
        """The (backbone, transform, encoding batch size, device type) key of a store, or None when the transform is
        random."""
        tid = modality.cache_id(self.backbone, train)
        if tid is None:
            return None
        if self._backbone_digest is None:
            self._backbone_digest = backbone_digest(self.backbone)
        how = f"{self._backbone_digest}|{modality.name}|{tid}|batch {self.batch_size}|{self._device().type}"
        return hashlib.blake2b(how.encode(), digest_size=16).hexdigest()

    def digests(self, ds: datasets.Dataset, input_key: str) -> list[bytes]:
        """The digest of each example of ``ds`` (memoised per dataset fingerprint)."""
        fp = f"{ds._fingerprint}|{input_key}"
        if fp not in self._digests:
            column = ds.with_format("arrow")[input_key]  # the stored values, undecoded
            self._digests[fp] = [example_digest(v) for v in column.to_pylist()]
        return self._digests[fp]

    def labels(self, ds: datasets.Dataset) -> Tensor:
        """The labels of ``ds`` [N] (memoised per dataset fingerprint)."""
        fp = f"{ds._fingerprint}|{LABEL}"
        if fp not in self._labels:
            labels = ds.with_format("arrow")[LABEL].to_numpy(zero_copy_only=False)  # may be a read-only view
            self._labels[fp] = torch.tensor(labels, dtype=torch.long)  # a copy: no warning about read-only memory
        return self._labels[fp]

    # ---------------------------------------------------------------- stores
    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.safetensors" if self.directory is not None else None

    def _store(self, key: str) -> tuple[dict[bytes, int], list[Tensor]]:
        if key not in self._stores:
            rows: dict[bytes, int] = {}
            chunks: list[Tensor] = []
            path = self._path(key)
            if path is not None and path.exists():
                try:
                    state = load_state(path)
                    d, f = state["digests"], state["features"]  # [N, 16] uint8, [N, D]
                    rows = {bytes(d[i].tolist()): i for i in range(d.shape[0])}
                    chunks = [f]
                except (ValueError, KeyError) as e:  # a damaged cache is a miss, never an error
                    log.warning("feature cache %s unreadable (%s): recomputing", path, e)
            self._stores[key] = (rows, chunks)
        return self._stores[key]

    def _save(self, key: str) -> None:
        path = self._path(key)
        if path is None:
            return
        rows, chunks = self._stores[key]
        feats = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        self._stores[key] = (rows, [feats])
        order = sorted(rows, key=rows.get)
        digests = torch.tensor([list(d) for d in order], dtype=torch.uint8)  # [N, 16]
        save_state(path, {"digests": digests, "features": feats}, {"backbone": self.backbone.model_name})

    # ---------------------------------------------------------------- lookup
    @torch.no_grad()
    def encodings(self, modality: Modality, ds: datasets.Dataset, train: bool) -> Tensor | None:
        """The frozen encodings [N, D] of ``ds``'s inputs (in ``ds`` order), computing the missing ones; None
        when the modality's transform is random (no caching possible)."""
        key = self.store_key(modality, train)
        if key is None:
            return None
        rows, chunks = self._store(key)
        digs = self.digests(ds, modality.input_key)
        missing: list[int] = []
        seen: set[bytes] = set()
        for i, d in enumerate(digs):  # each distinct input that is not stored yet, once
            if d not in rows and d not in seen:
                seen.add(d)
                missing.append(i)
        self.misses += len(missing)
        self.hits += len(digs) - len(missing)
        if missing:
            new = self._encode(modality, ds.select(missing), train)  # [M, D]
            start = sum(c.shape[0] for c in chunks)
            for j, i in enumerate(missing):
                rows[digs[i]] = start + j
            chunks.append(new)
            self._save(key)
        feats = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        self._stores[key] = (rows, [feats])
        return feats[torch.tensor([rows[d] for d in digs], dtype=torch.long)]  # [N, D]

    def _device(self) -> torch.device:
        return torch.device(self.device) if self.device else self.backbone.device

    def _encode(self, modality: Modality, ds: datasets.Dataset, train: bool) -> Tensor:
        """Encodings [M, D] of ``ds``'s inputs, every batch at the full batch size: a shorter last batch is padded
        with copies of its first input, whose encodings are dropped. An encoder's result for one input can depend on
        the batch's size (on the CPU a batch of one takes other kernels than a larger one, and a ViT's matrix products
        round small batches differently), not on the batch's other inputs, so this makes each stored encoding the
        same whichever inputs were missing with it. The global random state is left as it was (a DataLoader draws
        from it when it starts), so what comes after does not depend on whether the cache had to encode."""
        device = self._device()
        self.backbone.to(device)
        self.backbone.model.eval()
        loader = make_loader(ds, modality.input_key, modality.transform(self.backbone, train), self.batch_size, False)
        out = []
        with torch.random.fork_rng(devices=[]):
            for b in loader:
                x = b[modality.input_key].to(device)  # [B, ...], B <= batch_size
                n = x.shape[0]
                if n < self.batch_size:
                    x = torch.cat([x, x[:1].expand(self.batch_size - n, *x.shape[1:])])  # [batch_size, ...]
                out.append(modality.encode(self.backbone, x, []).float().cpu()[:n])  # [B, D]
        return torch.cat(out)  # [M, D]


CACHE_MODES = ("disk", "memory", "off")
"""The values of ``training.feature_cache``."""


def check_cache_mode(mode: object) -> None:
    """Raise a clear error unless ``mode`` is one of :data:`CACHE_MODES`."""
    if mode not in CACHE_MODES:
        modes = ", ".join(map(repr, CACHE_MODES[:-1])) + f" or {CACHE_MODES[-1]!r}"
        raise ValueError(f"training.feature_cache must be {modes}, got {mode!r}")


def make_feature_cache(backbone: Backbone, mode: str, accelerator: str, batch_size: int) -> FeatureCache | None:
    """The frozen-feature cache for ``training.feature_cache`` ``mode`` (None: ``off``): on disk under
    ``$MMFL_CACHE/features`` or in memory, encoding on CUDA when the ``accelerator`` setting would train there."""
    check_cache_mode(mode)
    if mode == "off":
        return None
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    directory = cache_dir() / "features" if mode == "disk" else None
    return FeatureCache(backbone, directory, batch_size=batch_size, device="cuda" if gpu else "cpu")


class _Indices(torch.utils.data.Dataset):
    """Hands the sampler's index lists to the collate function."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: list[int]) -> list[int]:
        return idx


def encoded_loader(
    encodings: Tensor, labels: list[int] | Tensor | None, batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader:
    """Batches ``{"encoded": [B, D], "label": [B]}`` (no ``label`` when ``labels`` is None) drawn in exactly the
    order of :func:`make_loader` with the same seed (the same sampler and generator), so cached and raw training
    see the same batches."""
    labels = torch.as_tensor(labels, dtype=torch.long) if labels is not None else None
    n = encodings.shape[0]
    if shuffle:
        sampler = RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(range(n))

    def collate(idx: list[int]) -> dict[str, Tensor]:
        i = torch.as_tensor(idx, dtype=torch.long)
        if labels is None:
            return {ENCODED: encodings[i]}
        return {ENCODED: encodings[i], LABEL: labels[i]}

    return DataLoader(
        _Indices(n),
        sampler=BatchSampler(sampler, batch_size=batch_size, drop_last=False),
        batch_size=None,
        collate_fn=collate,
    )
