"""Scopes: which clients share a trainable tensor, encoded in its payload key.

A part's ``scope`` (or one entry of ``scopes``) is one of three forms:

``task``
    A plain scope (:data:`SCOPES`): the tensor is merged over the clients of its group.
``task+task_modality``
    Components: the parameter is the sum of one tensor per named scope. The first holds the part's initial value,
    the others start at zero, and each is merged within its own scope group, so the wide component carries what
    the clients share and a narrow one what their group needs on top (as FedPGP and PromptFolio split a prompt).
``mix(task_modality, task, 0.8)``
    Mixing (aggregation with disaggregation, as FedCola): the tensor is held per ``task_modality`` group; the
    server merges it within each group, then gives each group ``0.8`` of its own merge plus ``0.2`` of the merge
    over the whole ``task`` (all its modalities' clients). ``1`` is plain ``task_modality``, ``0`` plain ``task``.
    ``mix(task_modality, task, similarity)`` sets the shares every round from how alike the groups' updates are.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

SCOPES: tuple[str, ...] = ("global", "task", "modality", "task_modality", "local")
"""Every plain scope a trainable tensor may declare, from widest to narrowest."""

SIMILARITY = "similarity"
"""The ``own`` of a mix whose shares follow the similarity of the groups' updates."""

_WIDER: dict[str, tuple[str, ...]] = {
    "task_modality": ("task", "modality", "global"),
    "task": ("global",),
    "modality": ("global",),
}
"""For each scope, the scopes whose groups contain its groups (a mix's wide scope must be one of them)."""

_MIX = re.compile(r"^mix\(\s*(\w+)\s*,\s*(\w+)\s*,\s*([^\s,()]+)\s*\)$")

_FORMS = (
    "a scope (global, task, modality, task_modality, local), components (task+task_modality), or a mix "
    "(mix(task_modality, task, 0.8); the last value in [0, 1] or 'similarity')"
)


@dataclass(frozen=True)
class Mix:
    """A mixed scope: held per ``fine`` group, each group given ``own`` of its merge and the rest from ``wide``'s.

    Attributes:
        fine: the scope whose groups hold a tensor each (e.g. ``task_modality``).
        wide: the scope over which the groups' merges are mixed (e.g. ``task``); its groups contain ``fine``'s.
        own: each group's share of its own merge in [0, 1], or None: set from the similarity of updates.
    """

    fine: str
    wide: str
    own: float | None


@dataclass(frozen=True)
class ScopeSpec:
    """A parsed scope: its components (one for a plain scope) or a mix (then ``components == (mix.fine,)``)."""

    components: tuple[str, ...]
    mix: Mix | None = None

    @property
    def plain(self) -> bool:
        """Whether this is one plain scope."""
        return len(self.components) == 1 and self.mix is None


@functools.cache
def parse_scope(spec: str) -> ScopeSpec:
    """Parse a scope: ``task``, ``task+task_modality`` or ``mix(task_modality, task, 0.8)``.

    Raises:
        ValueError: the text is none of the three forms, names an unknown scope, repeats a component, or mixes
            a scope into one that does not contain it; the message lists the forms.
    """
    if not isinstance(spec, str):
        raise ValueError(f"scope {spec!r} is not a string; give {_FORMS}")
    text = spec.strip()
    m = _MIX.match(text)
    if m:
        fine, wide, own_text = m.groups()
        for s in (fine, wide):
            if s not in SCOPES:
                raise ValueError(f"scope {spec!r}: unknown scope {s!r}; use one of {', '.join(SCOPES)}")
        if wide not in _WIDER.get(fine, ()):
            raise ValueError(
                f"scope {spec!r}: the groups of {fine!r} are not inside those of {wide!r}; mix a narrower scope "
                "into a wider one, e.g. mix(task_modality, task, 0.8) or mix(task, global, 0.5)"
            )
        own: float | None
        if own_text == SIMILARITY:
            own = None
        else:
            try:
                own = float(own_text)
            except ValueError:
                own = -1.0
            if not 0.0 <= own <= 1.0:
                raise ValueError(f"scope {spec!r}: the own share {own_text!r} must be in [0, 1] or {SIMILARITY!r}")
        return ScopeSpec((fine,), Mix(fine, wide, own))
    parts = tuple(p.strip() for p in text.split("+"))
    bad = [p for p in parts if p not in SCOPES]
    if bad:
        hint = " (a mix cannot be a component)" if any(p.startswith("mix(") for p in parts) else ""
        raise ValueError(f"unknown scope {spec!r}{hint}; give {_FORMS}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"scope {spec!r} repeats a component; each scope may appear once")
    return ScopeSpec(parts)


def check_scope(scope: str) -> str:
    """Return ``scope`` if it parses (see :func:`parse_scope`), else raise a ValueError naming the valid forms."""
    parse_scope(scope)
    return scope


def check_name(kind: str, name: str) -> str:
    """Task and modality names become parts of payload keys: no '/' and not empty."""
    if not name or "/" in name or name != name.strip():
        raise ValueError(f"{kind} name {name!r} must be non-empty, without '/' or surrounding spaces")
    return name


def scope_prefix(scope: str, task: str, modality: str) -> str:
    """The group prefix of a tensor of the plain ``scope`` held by a client of (task, modality).

    >>> scope_prefix("task", "digits", "image")
    'task/digits'
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
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
    """Full payload key of a tensor of the plain ``scope``, e.g. ``task/digits/coop.ctx``."""
    return f"{scope_prefix(scope, task, modality)}/{name}"


def is_local(key: str) -> bool:
    """Whether a qualified key names a tensor that never leaves its client."""
    return key.startswith("local/")
