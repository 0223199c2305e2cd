"""Scopes: which clients share a trainable tensor, encoded in its payload key."""

from __future__ import annotations

SCOPES: tuple[str, ...] = ("global", "task", "modality", "task_modality", "local")
"""Every scope a trainable tensor may declare, from widest to narrowest."""


def check_scope(scope: str) -> str:
    """Return ``scope`` if known, else raise a ValueError listing the valid scopes."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    return scope


def check_name(kind: str, name: str) -> str:
    """Task and modality names become parts of payload keys: no '/' and not empty."""
    if not name or "/" in name or name != name.strip():
        raise ValueError(f"{kind} name {name!r} must be non-empty, without '/' or surrounding spaces")
    return name


def scope_prefix(scope: str, task: str, modality: str) -> str:
    """The group prefix of a tensor of ``scope`` held by a client of (task, modality).

    >>> scope_prefix("task", "digits", "image")
    'task/digits'
    """
    check_scope(scope)
    if scope == "global":
        return "global"
    if scope == "task":
        return f"task/{task}"
    if scope == "modality":
        return f"modality/{modality}"
    if scope == "task_modality":
        return f"task_modality/{task}/{modality}"
    return "local"


def qualify(scope: str, task: str, modality: str, name: str) -> str:
    """Full payload key, e.g. ``task/digits/coop.ctx``."""
    return f"{scope_prefix(scope, task, modality)}/{name}"


def is_local(key: str) -> bool:
    """Whether a qualified key names a tensor that never leaves its client."""
    return key.startswith("local/")
