"""``mmfl evaluate -c RECIPE [--checkpoint FILE] --output_dir DIR``: the protocol end to end, then the report."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from mmfl.backbone import Backbone
from mmfl.data.task import Task, check_task
from mmfl.evaluation.protocol import Protocol
from mmfl.evaluation.report import add_means, plot_methods, plot_rounds, write_report
from mmfl.evaluation.runner import run_seed, summarize
from mmfl.federated.checkpoint import load_state
from mmfl.federated.settings import Federation, seed_all
from mmfl.knowledge import KnowledgeGuidance

log = logging.getLogger(__name__)

OUTPUTS = ("report.md", "metrics.json", "accuracy_per_round.png", "base_novel.png")


def add_evaluate_arguments(p: ArgumentParser) -> ArgumentParser:
    """The arguments ``mmfl evaluate`` adds to a recipe's."""
    p.add_argument(
        "--checkpoint",
        type=str | None,
        default=None,
        help="a trained run's global.safetensors (or best.safetensors) for the recipe's seed; its local/ folder "
        "gives the clients' local tensors. Other seeds, and all seeds without it, are trained",
    )
    return p


def check_checkpoint(path: str | None, seed: int, seeds: list[int]) -> Path | None:
    """Read the checkpoint now (a bad file fails before any training), and check its seed is evaluated."""
    if path is None:
        return None
    load_state(path)  # FileNotFoundError / ValueError naming the file
    if seed not in seeds:
        raise ValueError(
            f"--checkpoint holds the run of seed {seed} (the recipe's --seed), which is not among evaluation.seeds "
            f"{seeds}; pass the --seed it was trained with"
        )
    return Path(path)


def training_twins(cfg: Namespace) -> dict[str, str]:
    """The variants that train exactly as the recipe's own method or an earlier variant: the same parts, knowledge
    terms, optimizer and server training, differing only in what changes scoring, not training
    (``knowledge.unseen_blend``). Variant name → that method's name (``federated`` for the recipe's own), in the
    recipe's order: ``mmfl evaluate`` scores such a variant with that method's trained state."""

    def signature(settings: dict[str, object]) -> str:
        plain = Namespace(**settings).as_dict()  # nested Namespaces (also inside lists) become dicts: a fresh copy
        if isinstance(plain["knowledge"], dict):
            plain["knowledge"].pop("unseen_blend", None)  # scoring only
        return json.dumps(plain, sort_keys=True, default=str)

    recipe = {
        "parts": cfg.parts,
        "knowledge": cfg.training.knowledge,
        "optimizer": cfg.training.optimizer,
        "virtual_features": cfg.federation.virtual_features,
    }
    seen = {signature(recipe): "federated"}
    twins: dict[str, str] = {}
    for v in (cfg.evaluation.variants if cfg.evaluation else None) or []:
        sig = signature({f: r if v.get(f) is None else v.get(f) for f, r in recipe.items()})
        if sig in seen:
            twins[v.name] = seen[sig]
        else:
            seen[sig] = v.name
    return twins


def run_evaluate(cfg: Namespace, init: Namespace, tasks: list[Task], federation: Federation, out: Path) -> dict:
    """Run the protocol for every seed, then write ``metrics.json``, ``report.md`` and the plots to ``out``.

    Args:
        cfg: the parsed recipe (``evaluate`` arguments included).
        init: the instantiated recipe.
        tasks: the recipe's checked tasks.
        federation: its federation settings (a centralised recipe: one round).
        out: the output folder (checked not to hold an earlier report).

    Returns:
        The summary: ``{method: mean ± std tree}``.
    """
    protocol: Protocol = init.evaluation or Protocol()
    protocol.check(tasks)
    for tr in protocol.transfer:
        check_task(tr.task)
    seeds = list(protocol.seeds or [cfg.seed])
    checkpoint = check_checkpoint(cfg.checkpoint, cfg.seed, seeds)
    seed_all(cfg.seed)  # random-weight backbones come out as in `mmfl fit`
    backbone = Backbone(**cfg.backbone.as_dict())
    out.mkdir(parents=True, exist_ok=True)
    for f in OUTPUTS:
        (out / f).unlink(missing_ok=True)
    per_seed: dict[int, dict] = {}
    curves = []
    twins = training_twins(cfg)
    for s in seeds:
        ckpt = checkpoint if s == cfg.seed else None
        results, facts = run_seed(
            backbone, tasks, init.parts, init.training, federation, protocol, s, out, checkpoint=ckpt, twins=twins
        )
        per_seed[s] = {"facts": facts, "methods": {m: add_means(r) for m, r in results.items()}}
        csv_file = (ckpt.parent if ckpt is not None else out / f"seed_{s}" / "federated") / "metrics.csv"
        if csv_file.is_file():
            curves.append(csv_file)
    methods = list(next(iter(per_seed.values()))["methods"])
    summary = {m: summarize([per_seed[s]["methods"][m] for s in seeds]) for m in methods}
    first = per_seed[seeds[0]]["facts"]
    facts = {
        "backbone": cfg.backbone.model_name,
        "pretrained": cfg.backbone.pretrained,
        "seeds": seeds,
        "rounds": federation.rounds,
        "fraction": federation.fraction,
        "epochs": init.training.epochs,
        "max_steps": init.training.max_steps,
        "batch_size": init.training.batch_size,
        "parts": [p.class_path.rsplit(".", 1)[-1] for p in cfg.parts] if cfg.parts else [],
        "base_to_novel": protocol.base_to_novel,
        "val_fraction": protocol.val_fraction,
        "selection": protocol.selection,
        "average_rounds": protocol.average_rounds,
        "template": protocol.template,
        "ece_bins": protocol.ece_bins,
        "baselines": protocol.baselines,
        "variants": {v.name: describe_variant(v) for v in (cfg.evaluation.variants if cfg.evaluation else [])},
        "tasks": first["tasks"],
        "runs": {
            f"seed {s}": ", ".join(f"{k} {v}" for k, v in per_seed[s]["facts"].items() if k not in ("seed", "tasks"))
            for s in seeds
        },
    }
    write_report(out, facts, per_seed, summary)
    plot_rounds(out, curves)
    plot_methods(out, summary, protocol.base_to_novel)
    log.info("wrote %s", ", ".join(str(out / f) for f in OUTPUTS))
    return summary


def describe_variant(v: Namespace) -> str:
    """What a variant (as the parsed recipe holds it) changes, in one line for the report."""
    out = []
    if v.parts is not None:
        out.append("parts " + ", ".join(_call(p) for p in v.parts))
    if v.knowledge is not None:
        default = vars(KnowledgeGuidance())
        w = {k: x for k, x in v.knowledge.as_dict().items() if x != default.get(k)}
        out.append(
            "knowledge "
            + (", ".join(f"{k} {x:g}" if isinstance(x, float) else f"{k} {x}" for k, x in w.items()) or "off")
        )
    if v.optimizer is not None:
        out.append("optimizer " + _call(v.optimizer))
    if v.virtual_features is not None:
        vf = v.virtual_features
        spread = "" if vf.covariance == "class" else f", covariance {vf.covariance}"
        if vf.covariance not in ("class", "isotropic"):
            spread += f" (prior {vf.prior:g})"
        out.append(f"server training on virtual features ({vf.samples} per class, {vf.epochs} epochs a round{spread})")
    return "; ".join(out)


def _call(entry: Namespace) -> str:
    """``Name(arg=value, ...)`` of a class_path entry, with the arguments that differ from the class's defaults."""
    args = entry.get("init_args")
    try:
        module, _, name = entry.class_path.rpartition(".")
        params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        params = {}
    given = {
        k: x
        for k, x in (args.as_dict() if isinstance(args, Namespace) else {}).items()
        if k not in params or params[k].default != x
    }
    return f"{entry.class_path.rsplit('.', 1)[-1]}({', '.join(f'{k}={x}' for k, x in given.items())})"
