"""``mmfl zeroshot``: zero-shot top-1 of a backbone on a data set with hand-written prompt templates."""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from mmfl.backbone import Backbone, check_backbone_args
from mmfl.data.bundled import BUNDLED
from mmfl.data.task import Task, check_task, load_split
from mmfl.evaluation.zeroshot import resolve_data, zero_shot
from mmfl.export import checkpoint_model_name
from mmfl.recipe import Parser


def zeroshot_parser() -> ArgumentParser:
    """Arguments of ``mmfl zeroshot``."""
    p = Parser(description="Zero-shot top-1 with hand-written prompt templates.", allow_abbrev=False)
    p.add_argument(
        "--backbone",
        type=str | None,
        default=None,
        help="open_clip model name (default: the one an `mmfl export` checkpoint names, else mmfl-mini)",
    )
    p.add_argument("--pretrained", type=str | None, default=None, help="pretrained tag or checkpoint path")
    p.add_argument(
        "--data",
        type=str,
        required=True,
        help=f"a bundled set ({', '.join(BUNDLED)}), a folder of class sub-folders, or a hub id",
    )
    p.add_argument(
        "--modality", type=str | None, default=None, help="the data's modality (default: the data set's own)"
    )
    p.add_argument("--split", type=str, default="test")
    p.add_argument("--limit", type=int | None, default=None, help="score a fixed subset of this many examples")
    p.add_argument(
        "--templates",
        type=list[str] | None,
        default=None,
        help="prompt templates with {} for the class name (default: the modality's own ensemble)",
    )
    p.add_argument("--input_column", type=str, default="image", help="input column of a hub data set")
    p.add_argument("--label_column", type=str, default="label", help="label column of a hub data set")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--accelerator", type=str, default="auto")
    p.add_argument(
        "--skip_undecodable", action=ActionYesNo, default=False, help="leave out examples that cannot be read"
    )
    p.add_argument("--json", action=ActionYesNo, default=False, help="print one JSON object instead of a sentence")
    return p


def run_zeroshot(cfg: Namespace) -> dict:
    """Check the arguments, build the backbone and score; :func:`zeroshot_report` words the result for stdout."""
    if cfg.backbone is None:
        cfg.backbone = checkpoint_model_name(cfg.pretrained) or "mmfl-mini"
    check_backbone_args(cfg.backbone, cfg.pretrained)
    source = resolve_data(cfg.data, cfg.input_column, cfg.label_column)
    name = Path(cfg.data).name or cfg.data
    task = Task(name=name, data=source, modality=cfg.modality, skip_undecodable=cfg.skip_undecodable)
    if cfg.templates is not None:
        task.templates = list(cfg.templates)
    check_task(task)
    loaded = load_split(task, cfg.split, cfg.limit)  # data first: a missing or unreadable set fails in seconds
    backbone = Backbone(cfg.backbone, pretrained=cfg.pretrained)
    result = zero_shot(
        backbone,
        task,
        split=cfg.split,
        limit=cfg.limit,
        batch_size=cfg.batch_size,
        accelerator=cfg.accelerator,
        loaded=loaded,
    )
    result = {
        "backbone": cfg.backbone,
        "data": cfg.data,
        "split": cfg.split,
        **result,
        "templates": task.prompt_templates(),
    }
    return result


def zeroshot_report(cfg: Namespace, result: dict) -> str:
    """What ``mmfl zeroshot`` prints: one JSON object (``--json``) or a sentence."""
    if cfg.json:
        return json.dumps(result)
    return (
        f"{cfg.backbone} zero-shot on {cfg.data} ({cfg.split}, n={result['n']}, "
        f"{result['classes']} classes): top-1 {100 * result['top1']:.1f}% (chance {100 * result['chance']:.1f}%, "
        f"{result['top1'] / result['chance']:.1f}x chance)"
    )
