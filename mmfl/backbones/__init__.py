"""Offline backbones: CLIP-style open_clip models assembled from pretrained towers that ship in packages."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

OFFLINE_BACKBONES: tuple[str, ...] = ("mmfl-mini",)
"""Model names mmfl builds from installed packages (no network); their weights need no ``pretrained``."""


def cache_dir() -> Path:
    """mmfl's cache folder: ``$MMFL_CACHE``, else ``$XDG_CACHE_HOME/mmfl``, else ``~/.cache/mmfl``."""
    if os.environ.get("MMFL_CACHE"):
        return Path(os.environ["MMFL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mmfl"


def resolve_offline(model_name: str, pretrained: str | None) -> tuple[str, dict[str, Any]] | None:
    """For an offline backbone: register its config, build its checkpoint if missing, and return
    ``(checkpoint path, extra open_clip arguments)``. None for any other model name."""
    if model_name not in OFFLINE_BACKBONES:
        return None
    from mmfl.backbones import mini

    check_offline(model_name, pretrained)
    if pretrained not in (None, "", mini.TAG):  # a checkpoint file of this model, e.g. written by `mmfl export`
        return str(pretrained), dict(mini.PREPROCESS)
    return str(mini.checkpoint()), dict(mini.PREPROCESS)


def check_offline(model_name: str, pretrained: str | None = None) -> None:
    """Cheap check that an offline backbone's packages are installed (registers its config), and that
    ``pretrained`` is empty, its tag, or an existing checkpoint file."""
    if model_name in OFFLINE_BACKBONES:
        from mmfl.backbones import mini

        mini.register()
        if pretrained not in (None, "", mini.TAG) and not Path(pretrained).is_file():
            raise ValueError(
                f"backbone {model_name!r} is built offline from installed packages; leave pretrained empty "
                f"(or {mini.TAG!r}) or give an existing checkpoint file of it (e.g. from `mmfl export`), "
                f"got {pretrained!r}"
            )
