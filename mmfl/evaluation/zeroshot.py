"""Zero-shot classification with hand-written prompt templates: the baseline learned prompts must beat."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import datasets

from mmfl.backbone import Backbone
from mmfl.data.bundled import BUNDLED
from mmfl.data.loader import make_loader
from mmfl.data.sources import DataSource, HubDataset, ImageFolder
from mmfl.data.task import DEFAULT_TEMPLATES, Task, load_split
from mmfl.module import ClientModule, make_trainer, quiet_lightning

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TEMPLATES", "resolve_data", "zero_shot"]


def resolve_data(spec: str, input_column: str = "image", label_column: str = "label") -> DataSource:
    """A data source from a short name: a bundled set (``digits``, ``animals``, ``photos``, ``fashion``),
    a local folder of class sub-folders, or a hub id (needs network)."""
    if spec in BUNDLED:
        return BUNDLED[spec]()
    if Path(spec).is_dir():
        return ImageFolder(spec)
    if "/" in spec and not Path(spec).exists() and not spec.startswith((".", "/")):
        return HubDataset(spec, input_column=input_column, label_column=label_column)
    raise ValueError(
        f"--data {spec!r} is neither a bundled set ({', '.join(BUNDLED)}), an existing folder, nor a hub "
        "id of the form owner/name"
    )


def zero_shot(
    backbone: Backbone,
    task: Task,
    templates: Sequence[str] | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 32,
    accelerator: str = "auto",
    loaded: tuple[datasets.Dataset, list[str]] | None = None,
) -> dict[str, float | int]:
    """Top-1 of the backbone with template-ensembled class prompts on one split.

    Args:
        backbone: the frozen backbone.
        task: what to classify (its data source, modality and class names).
        templates: prompt templates (``{}`` = class name); the task's own when None.
        split: the split to score.
        limit: score a fixed random subset of at most this many examples.
        batch_size: evaluation batch size.
        accelerator: Lightning accelerator.
        loaded: the split and class names from ``load_split(task, split, limit)`` when already loaded.

    Returns:
        ``{"top1", "chance", "n", "classes", "loss"}`` — fractions in [0, 1].
    """
    ds, class_names = loaded or load_split(task, split, limit)
    if len(ds) == 0:
        raise ValueError(f"task {task.name!r}: the {split!r} split is empty")
    modality = task.build_modality()
    module = ClientModule(
        backbone, modality, task.name, class_names, [], templates=list(templates or task.prompt_templates())
    )
    loader = make_loader(ds, modality.input_key, modality.transform(backbone, False), batch_size, shuffle=False)
    with quiet_lightning():
        out = make_trainer(accelerator=accelerator).test(module, dataloaders=loader, verbose=False)[0]
    return {
        "top1": float(out["test_acc"]),
        "chance": 1.0 / len(class_names),
        "n": len(ds),
        "classes": len(class_names),
        "loss": float(out["test_loss"]),
    }
