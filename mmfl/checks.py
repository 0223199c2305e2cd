"""Recipe checks that the argument parser does not make: ``null`` where a value is required."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any


def _allows_none(tp: Any) -> bool:
    if tp is Any or tp is None or tp is type(None):
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_allows_none(a) for a in typing.get_args(tp))
    return False


def check_required(obj: Any, where: str) -> None:
    """Raise a ValueError naming the first field of ``obj`` (a dataclass, recursively through dataclasses and
    lists) that is ``None`` although its type does not allow it."""
    if isinstance(obj, list | tuple):
        for i, x in enumerate(obj):
            check_required(x, f"{where}.{i}")
        return
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and not _allows_none(hints.get(f.name, Any)):
            raise ValueError(f"{where}.{f.name} is null; give it a value (or drop the key for its default)")
        check_required(value, f"{where}.{f.name}")


def check_required_args(func: Callable, values: dict[str, Any], where: str) -> None:
    """Like :func:`check_required` for the keyword arguments ``values`` of ``func``."""
    hints = typing.get_type_hints(func)
    for name in inspect.signature(func).parameters:
        if name in values and values[name] is None and not _allows_none(hints.get(name, Any)):
            raise ValueError(f"{where}.{name} is null; give it a value (or drop the key for its default)")
