"""Trainable-state files: safetensors, written atomically (temp file + rename), read with clear errors."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor


def canonical_bytes(data: bytes) -> bytes:
    """The same safetensors file with its header's ``__metadata__`` map in sorted key order.

    safetensors keeps the metadata in a hash map whose order changes from process to process, so the same tensors
    and metadata would give files with different checksums; the tensors' entries and the data are left as written
    (their order is already fixed). The header stays padded with spaces to a multiple of 8 bytes, as the format
    asks, and the data offsets are relative to its end, so they do not change.
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def save_state(path: str | Path, state: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to ``path`` as safetensors; a reader never sees a half-written file, and the same tensors
    and metadata always give the same bytes (:func:`canonical_bytes`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = canonical_bytes(save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors state file.

    Raises:
        FileNotFoundError: no such file. ValueError: the file is not a readable safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trainable-state file at {str(path)!r}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a valid safetensors file (truncated or corrupt?): {e}") from e
