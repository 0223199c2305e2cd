"""Modality registry: entry points of group ``mmfl.modalities``, loaded lazily, and register_modality()."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from mmfl.modalities.base import Modality

log = logging.getLogger(__name__)

GROUP = "mmfl.modalities"
AUTOLOAD_ENV = "MMFL_DISABLE_PLUGIN_AUTOLOAD"
"""Set to 1 to load only mmfl's own modalities and those registered with register_modality()."""


@dataclass
class _Entry:
    name: str
    source: str  # distribution name, or "register_modality"
    entry_point: EntryPoint | None = None
    cls: type[Modality] | None = None


class ModalityError(LookupError):
    """An unknown modality, or one whose plugin failed to load."""


_REGISTERED: dict[str, _Entry] = {}
_cache: dict[str, type[Modality]] = {}


def register_modality(cls: type[Modality], name: str | None = None, *, replace: bool = False) -> type[Modality]:
    """Register a :class:`Modality` subclass in this process (in-tree code and tests).

    Raises:
        ValueError: if the name is taken (by a registration or an installed plugin) and not ``replace``.
    """
    if not (isinstance(cls, type) and issubclass(cls, Modality)):
        raise TypeError(f"register_modality expects a Modality subclass, got {cls!r}")
    key = name or cls.name
    if not replace and (key in _REGISTERED or key in _entry_point_table()):
        raise ValueError(f"modality {key!r} is already registered; pass replace=True to override it")
    _REGISTERED[key] = _Entry(key, "register_modality", cls=cls)
    _cache.pop(key, None)
    return cls


def unregister_modality(name: str) -> None:
    """Remove a modality registered with :func:`register_modality`."""
    _REGISTERED.pop(name, None)
    _cache.pop(name, None)


def _own_distribution(ep: EntryPoint) -> bool:
    return ep.value.startswith("mmfl.")


def _entry_point_table() -> dict[str, _Entry]:
    """Entry points by name, without importing them. Duplicate names across distributions are an error."""
    autoload = os.environ.get(AUTOLOAD_ENV, "0") in ("", "0", "false", "False")
    table: dict[str, _Entry] = {}
    for ep in entry_points(group=GROUP):
        if not autoload and not _own_distribution(ep):
            continue
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in table and table[ep.name].entry_point.value != ep.value:
            raise ModalityError(
                f"modality {ep.name!r} is provided twice: by {table[ep.name].source} "
                f"({table[ep.name].entry_point.value}) and by {dist} ({ep.value}); uninstall one of them"
            )
        table[ep.name] = _Entry(ep.name, dist, entry_point=ep)
    return table


def available_modalities() -> dict[str, str]:
    """Every modality name mmfl can resolve, with where it comes from (distribution or registration)."""
    table = {name: e.source for name, e in _entry_point_table().items()}
    table.update({name: e.source for name, e in _REGISTERED.items()})
    return dict(sorted(table.items()))


def _load(entry: _Entry) -> type[Modality]:
    if entry.cls is not None:
        return entry.cls
    ep = entry.entry_point
    try:
        obj = ep.load()
    except Exception as e:  # a broken plugin must be named, not crash everything else
        raise ModalityError(
            f"modality {entry.name!r} from plugin {entry.source!r} ({ep.value}) failed to load: {type(e).__name__}: {e}"
        ) from e
    if not (isinstance(obj, type) and issubclass(obj, Modality)):
        raise ModalityError(
            f"modality {entry.name!r} from plugin {entry.source!r} ({ep.value}) is not a Modality subclass"
        )
    return obj


def get_modality_class(name: str) -> type[Modality]:
    """Resolve a modality name to its class (loaded on first use, then cached)."""
    if name in _cache:
        return _cache[name]
    entry = _REGISTERED.get(name) or _entry_point_table().get(name)
    if entry is None:
        avail = available_modalities()
        raise ModalityError(
            f"unknown modality {name!r}; available: {', '.join(avail) or 'none'}. "
            f"Install a plugin that provides it (entry-point group {GROUP!r}) or call register_modality()."
        )
    cls = _load(entry)
    missing = [pkg for pkg in cls.requires if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ModalityError(
            f"modality {name!r} needs the package(s) {', '.join(missing)}: pip install {' '.join(missing)}"
        )
    _cache[name] = cls
    return cls


def get_modality(name: str) -> Modality:
    """Resolve a modality name and return a default-constructed instance."""
    return get_modality_class(name)()
