"""Cheap checks of backbone arguments, and registration of mmfl's bundled open_clip model configs."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import open_clip

from mmfl.backbones import OFFLINE_BACKBONES, check_offline

_CONFIGS_REGISTERED = False


def register_model_configs() -> None:
    """Register mmfl's bundled open_clip model configs (idempotent)."""
    global _CONFIGS_REGISTERED
    if _CONFIGS_REGISTERED:
        return
    open_clip.add_model_config(Path(__file__).parent.parent / "model_configs")
    _CONFIGS_REGISTERED = True


def check_backbone_args(model_name: str, pretrained: str | None) -> None:
    """Raise a clear error for an unknown model name or a pretrained tag/path that cannot be found.

    Cheap (builds nothing), so recipes are checked before any long work.
    """
    register_model_configs()
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    check_offline(model_name, pretrained)  # mmfl-mini: its packages installed, its config registered, a file
    if model_name in OFFLINE_BACKBONES:
        return
    known = open_clip.list_models()
    if model_name not in known:
        close = difflib.get_close_matches(model_name, known, n=6, cutoff=0.5)
        hint = f"Close names: {', '.join(close)}. " if close else ""
        raise ValueError(
            f"backbone.model_name={model_name!r} is not an open_clip model. {hint}Use a name from "
            "open_clip.list_models(), an 'hf-hub:org/repo' id, or register a config with "
            "open_clip.add_model_config()."
        )
    if pretrained is None or pretrained == "":
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags:
        return
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not Path(pretrained).is_file():
            raise FileNotFoundError(
                f"backbone.pretrained={pretrained!r}: no such checkpoint file. Give an existing path, "
                f"a pretrained tag of {model_name!r} ({tags or 'none known'}), or null for random weights."
            )
        return
    raise ValueError(
        f"backbone.pretrained={pretrained!r} is neither a pretrained tag of {model_name!r} "
        f"({tags or 'none known'}) nor a checkpoint file path. Use null for random weights."
    )
