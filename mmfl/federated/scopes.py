"""Scopes: which clients share a trainable tensor, encoded in its payload key.

A part's ``scope`` (or one entry of ``scopes``) is one of three forms:

``task``
    A plain scope (:data:`SCOPES`): the tensor is merged over the clients of its group.
``task+task_modality``
    Components: the parameter is the sum of one tensor per named scope. The first holds the part's initial value,
    the others start at zero, and each is merged within its own scope group, so the wide component carries what
    the clients share and a narrow one what their group needs on top (as FedPGP and PromptFolio split a prompt).
``mix(task_modality, task, own=0.8)``
    Mixing (aggregation with disaggregation, as FedCola): the tensor is held per ``task_modality`` group; the
    server merges it within each group, then gives each group a mixture of its own merge and the merge over the
    whole ``task`` (all its modalities' clients). How much of each:

    - ``own=0.8``: every group keeps 0.8 of its own merge and takes 0.2 of the task's;
    - ``others=0.1``: the other groups' examples count 0.1 as much as the group's own (FedCola's weighting): a
      group with few examples next to large ones takes most of the task's merge, a large one keeps its own;
    - ``similarity``: each group takes from each other group in proportion to how alike their updates are;
    - ``own=val``: each round the server tries the own shares :data:`~mmfl.federated.mixing.SHARES` (1, 0.75, 0.5,
      0.25, 0) for each group and keeps the one its clients' tasks score best with on their validation split
      (``evaluation.val_fraction``), so a group takes the wide merge only where it measurably helps.

    ``own=1`` and ``others=0`` are plain ``task_modality``, ``own=0`` and ``others=1`` plain ``task``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

SCOPES: tuple[str, ...] = ("global", "task", "modality", "task_modality", "local")
"""Every plain scope a trainable tensor may declare, from widest to narrowest."""

MIX_KINDS: tuple[str, ...] = ("own", "others", "similarity", "val")
"""How a mix sets its shares: a fixed own share, the others' weight, the similarity of updates, or the own share
chosen on validation data each round (written ``own=val``)."""

_WIDER: dict[str, tuple[str, ...]] = {
    "task_modality": ("task", "modality", "global"),
    "task": ("global",),
    "modality": ("global",),
}
"""For each scope, the scopes whose groups contain its groups (a mix's wide scope must be one of them)."""

_MIX = re.compile(r"^mix\(\s*(\w+)\s*,\s*(\w+)\s*,\s*([^\s,()=]+)\s*(?:=\s*([^\s,()]*)\s*)?\)$")

_FORMS = (
    "a scope (global, task, modality, task_modality, local), components (task+task_modality), or a mix "
    "(mix(task_modality, task, own=0.8), mix(task_modality, task, others=0.1), mix(task_modality, task, similarity) "
    "or mix(task_modality, task, own=val))"
)


@dataclass(frozen=True)
class Mix:
    """A mixed scope: held per ``fine`` group, each group given a mixture of its own merge and ``wide``'s.

    Attributes:
        fine: the scope whose groups hold a tensor each (e.g. ``task_modality``).
        wide: the scope over which the groups' merges are mixed (e.g. ``task``); its groups contain ``fine``'s.
        kind: ``own`` (each group keeps ``value`` of its own merge), ``others`` (the other groups' weight counts
            ``value`` as much as the group's own), ``similarity`` (shares from the similarity of updates) or ``val``
            (``own=val``: the own share chosen each round on the groups' validation data).
        value: the share or weight in [0, 1] (0 for ``similarity`` and ``val``).
    """

    fine: str
    wide: str
    kind: str
    value: float = 0.0


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
    """Parse a scope: ``task``, ``task+task_modality`` or ``mix(task_modality, task, own=0.8)`` (or ``own=val``).

    Raises:
        ValueError: the text is none of the three forms, names an unknown scope, repeats a component, or mixes
            a scope into one that does not contain it; the message lists the forms.
    """
    if not isinstance(spec, str):
        raise ValueError(f"scope {spec!r} is not a string; give {_FORMS}")
    text = spec.strip()
    m = _MIX.match(text)
    if m:
        fine, wide = m.group(1), m.group(2)
        for s in (fine, wide):
            if s not in SCOPES:
                raise ValueError(f"scope {spec!r}: unknown scope {s!r}; use one of {', '.join(SCOPES)}")
        if wide not in _WIDER.get(fine, ()):
            raise ValueError(
                f"scope {spec!r}: the groups of {fine!r} are not inside those of {wide!r}; mix a narrower scope "
                "into a wider one, e.g. mix(task_modality, task, own=0.8) or mix(task, global, own=0.5)"
            )
        kind, value_text = m.group(3), m.group(4)
        if kind not in MIX_KINDS[:3] or (kind == "similarity") != (value_text is None):
            raise ValueError(f"scope {spec!r}: the mix's last entry must be own=X, others=X, similarity or own=val")
        if kind == "own" and value_text == "val":
            return ScopeSpec((fine,), Mix(fine, wide, "val"))
        value = 0.0
        if value_text is not None:
            try:
                value = float(value_text)
            except ValueError:
                value = -1.0
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"scope {spec!r}: {kind}={value_text} must be in [0, 1]")
        return ScopeSpec((fine,), Mix(fine, wide, kind, value))
    if text.startswith("mix("):
        raise ValueError(f"scope {spec!r} is not a mix of the form {_FORMS.split('or a mix ')[1]}")
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
