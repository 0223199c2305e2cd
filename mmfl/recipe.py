"""Recipes: the parser of ``mmfl fit`` (its keys mirror the constructors they configure), the cheap checks run
before any data is loaded or model built, and the checks of ``--resume``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn

import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from mmfl.backbone import Backbone, check_backbone_args
from mmfl.checks import check_required, check_required_args
from mmfl.data.feature_cache import check_cache_mode
from mmfl.data.task import Task, check_task
from mmfl.evaluation.protocol import Protocol
from mmfl.federated.scopes import parse_scope
from mmfl.federated.settings import Federation, LocalTraining
from mmfl.federated.simulation import PartFactory
from mmfl.module import make_trainer, quiet_lightning

log = logging.getLogger("mmfl")


class Parser(ArgumentParser):
    """jsonargparse's parser, with a command-line mistake reported in two lines — the error and where the accepted
    options are listed — instead of the whole usage first (a recipe has ~30 lines of it)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print ``<prog>: error: <message>`` and the ``--help`` hint, then exit 2 (as argparse does)."""
        if not self.exit_on_error:  # jsonargparse probes with errors turned into exceptions: keep its behaviour
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {message}\nRun `{prog} --help` for the accepted options.\n")
        self.exit(2)


def fit_parser() -> ArgumentParser:
    """The parser of a recipe: its keys mirror the constructors they configure."""
    p = Parser(description="Run a federation (or a centralised run) from a YAML recipe.", allow_abbrev=False)
    p.add_argument("-c", "--config", action=ActionConfigFile, help="the recipe (YAML)")
    p.add_argument("--seed", type=int, default=0, help="seeds initial tensors, sampling, data order, training")
    p.add_argument(
        "--output_dir",
        type=str | None,
        default=None,
        help="where config.yaml, metrics.csv and global.safetensors go (default runs/<recipe>)",
    )
    p.add_argument("--overwrite", type=bool, default=False, help="replace the outputs of an earlier run there")
    p.add_argument(
        "--resume",
        type=str | None,
        default=None,
        help="a run folder: continue it after its last complete round (the recipe must be the one it ran; "
        "only federation.rounds may change, to extend it). `mmfl fit --resume RUN` alone reuses RUN/config.yaml",
    )
    p.add_class_arguments(Backbone, "backbone", instantiate=False)
    p.add_argument("--tasks", type=list[Task], required=True, help="the tasks and their clients")
    p.add_argument(
        "--parts",
        type=list[PartFactory],
        default=[],
        help="trainable parts each client owns (class_path + init_args)",
    )
    p.add_class_arguments(LocalTraining, "training")
    p.add_argument(
        "--loggers",
        type=list[dict] | None,
        default=None,
        help="Lightning loggers for each round's metrics, the round as the step: [{class_path: TensorBoardLogger}, "
        "{class_path: CSVLogger}, ...] (save_dir defaults to the run folder; mmfl fit only)",
    )
    p.add_argument(
        "--federation",
        type=Federation | None,
        default=None,
        help="round settings; omit for a centralised run (one client per task, one round)",
    )
    p.add_argument(
        "--evaluation",
        type=Protocol | None,
        default=None,
        help="the evaluation protocol: base-to-novel split, validation hold-out and checkpoint selection, unseen "
        "clients, transfer targets, seeds, baselines (see mmfl.evaluation.Protocol)",
    )
    return p


def check_recipe(parser: ArgumentParser, cfg: Namespace) -> tuple[Namespace, list[Task], Federation]:
    """Instantiate a recipe and check everything cheap (no data loaded, no model built).

    Returns:
        The instantiated recipe, its tasks, and its federation (one round for a centralised recipe).
    """
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {cfg.seed!r}")
    if not isinstance(cfg.backbone, Namespace):
        raise ValueError(
            f"backbone is {cfg.backbone!r}; give backbone: {{model_name: ...}} (or drop the key for mmfl-mini)"
        )
    check_required_args(Backbone.__init__, dict(cfg.backbone.as_dict()), "backbone")
    try:
        init = parser.instantiate(cfg)
    except (TypeError, AttributeError) as e:  # e.g. init_args: null
        raise ValueError(f"the recipe cannot be built: {e}") from None
    for key in ("tasks", "training", "federation", "evaluation"):
        check_required(init.get(key), key)
    check_cache_mode(init.training.feature_cache)
    init.training.check()
    if not isinstance(init.parts, list):
        raise ValueError("parts must be a list of class_path entries (or [] for none)")
    check_part_scopes(cfg)
    try:  # Lightning's own check of the accelerator and precision, now rather than after the first write
        with quiet_lightning():
            make_trainer(1, -1, init.training.accelerator, init.training.precision)
    except Exception as e:
        raise ValueError(
            f"training.accelerator {init.training.accelerator!r} / training.precision {init.training.precision!r}: {e}"
        ) from None
    tasks: list[Task] = init.tasks
    if not tasks:
        raise ValueError("the recipe has no tasks: give at least one under `tasks:`")
    names = [(t.name, t.modality) for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks repeat a (name, modality) pair: {names}")
    for t in tasks:
        check_task(t)
    check_backbone_args(cfg.backbone.model_name, cfg.backbone.pretrained)
    if init.evaluation is not None:
        init.evaluation.check(tasks)
    federation = init.federation
    if federation is not None:
        federation.check()
    if federation is None:
        for t in tasks:
            if t.clients != 1:
                log.info(
                    "no federation section: task %s is held by one client (clients=%d ignored)",
                    t.name,
                    t.clients,
                )
                t.clients, t.partitioner = 1, None
        federation = Federation(rounds=1)
    return init, tasks, federation


def check_part_scopes(cfg: Namespace) -> None:
    """Raise a clear error for a part whose ``scope`` or ``scopes`` entry is not a scope (plain, components or mix),
    naming the part, before any data is loaded (the recipe's parts and its evaluation variants'); and for a mix that
    chooses its shares on validation data (``own=val``) when the recipe holds none out."""
    on_val = _check_scopes_of(cfg.get("parts") or [], "parts")
    evaluation = cfg.get("evaluation")
    for i, v in enumerate((evaluation.get("variants") if isinstance(evaluation, Namespace) else None) or []):
        if isinstance(v, Namespace) and isinstance(v.get("parts"), list):
            on_val += _check_scopes_of(v.parts, f"evaluation.variants.{i}.parts")
    val_fraction = evaluation.get("val_fraction") if isinstance(evaluation, Namespace) else None
    if on_val and not val_fraction:
        raise ValueError(
            f"{on_val[0]} chooses its shares on validation data, but the recipe holds none out: set "
            "evaluation.val_fraction (e.g. 0.2 of each task's training data), or give a fixed share (own=0.8)"
        )


def _check_scopes_of(parts: list, where_parts: str) -> list[str]:
    """Check the scopes of ``parts``; return where an ``own=val`` mix is declared."""
    on_val = []
    for i, part in enumerate(parts):
        args = part.get("init_args") if isinstance(part, Namespace) else None
        if args is None:
            continue
        entries = [("scope", args.get("scope"))] + [
            (f"scopes.{k}", v) for k, v in dict(args.get("scopes") or {}).items()
        ]
        for where, value in entries:
            if value is None:
                continue
            try:
                spec = parse_scope(value)
            except ValueError as e:
                raise ValueError(f"{where_parts}.{i} ({part.get('class_path')}) {where}: {e}") from None
            if spec.mix is not None and spec.mix.kind == "val":
                on_val.append(f"{where_parts}.{i} ({part.get('class_path')}) {where} {value!r}")
    return on_val


RUN_ONLY_KEYS = ("config", "output_dir", "overwrite", "resume", "__path__")


def recipe_differences(parser: ArgumentParser, a: Namespace, b: Namespace) -> list[str]:
    """The keys (dotted) whose values differ between two recipes, ignoring where a run writes and
    ``federation.rounds`` (a resumed run may be extended)."""

    def flat(cfg: Namespace) -> dict[str, object]:
        d = yaml.safe_load(parser.dump(cfg, skip_none=False, skip_validation=True))
        for k in RUN_ONLY_KEYS:
            d.pop(k, None)
        if isinstance(d.get("federation"), dict):
            d["federation"].pop("rounds", None)
        out: dict[str, object] = {}

        def walk(prefix: str, v: object) -> None:
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), x)
            else:
                out[prefix] = v

        walk("", d)
        return out

    fa, fb = flat(a), flat(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def check_resume(parser: ArgumentParser, cfg: Namespace) -> Path:
    """The run folder of ``--resume``, after checking that it holds a run of this very recipe."""
    out = Path(cfg.resume)
    if cfg.output_dir and Path(cfg.output_dir).resolve() != out.resolve():
        raise ValueError(f"--resume {str(out)!r} and --output_dir {cfg.output_dir!r} differ; give only --resume")
    saved = out / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(
            f"--resume {str(out)!r}: no run there (no config.yaml); start it with mmfl fit -c RECIPE --output_dir"
        )
    try:
        before = parser.parse_path(str(saved))
    except (ArgumentError, ValueError, TypeError) as e:
        raise ValueError(f"--resume: cannot read {str(saved)!r}: {e}") from None
    diff = recipe_differences(parser, before, cfg)
    if diff:
        raise ValueError(
            f"--resume {str(out)!r}: the recipe differs from the one the run started with in {', '.join(diff)}; "
            "resume with the same recipe (only federation.rounds may change), or start a new run"
        )
    return out


def resume_argv(argv: list[str]) -> list[str]:
    """``mmfl fit --resume RUN`` without ``-c``: read the recipe from ``RUN/config.yaml``, writing to ``RUN``
    wherever it is now (the output folder recorded there is where the run was: a moved or copied run resumes in
    its new place)."""
    if not argv or argv[0] != "fit" or any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        return argv
    for i, a in enumerate(argv):
        run = (
            argv[i + 1]
            if a == "--resume" and i + 1 < len(argv)
            else a.partition("=")[2]
            if a.startswith("--resume=")
            else None
        )
        if run:
            return ["fit", "-c", str(Path(run) / "config.yaml"), f"--output_dir={run}", *argv[1:]]
    return argv


LIST_KEYS = ("--tasks", "--parts", "--loggers", "--evaluation.variants", "--evaluation.transfer")
"""The recipe's lists of objects, which jsonargparse would merge item by item (lists of plain values it replaces)."""


def lists_replace(argv: list[str]) -> list[str]:
    """A list of objects given on the command line or in a later config file replaces the list set before it:
    ``--tasks=[...]`` becomes ``--tasks=[] --tasks=[...]``, and ``-c more.yaml`` whose YAML has ``evaluation:
    variants:`` becomes ``--evaluation.variants=[] -c more.yaml`` once a list was set before (keys in
    :data:`LIST_KEYS`). jsonargparse merges a new list of the same length item by item into the one before it, so a
    task or an evaluation variant would silently keep fields of the earlier item at its index — its shots,
    partitioner or knowledge weights. ``--key+=item`` (append) is left alone."""
    out: list[str] = []
    set_before: set[str] = set()
    i = 0
    while i < len(argv):
        a = argv[i]
        key, eq, value = a.partition("=")
        if key in ("-c", "--config"):
            path = value if eq else argv[i + 1] if i + 1 < len(argv) else ""
            lists = _lists_in(path)
            out += [f"{k}=[]" for k in lists if k in set_before]
            set_before.update(lists)
            out += [a] if eq or i + 1 == len(argv) else [a, argv[i + 1]]
            i += 1 if eq else 2
            continue
        if key in LIST_KEYS:  # `--key=[...]` or `--key [...]` (the value follows)
            out.append(f"{key}=[]")
            set_before.add(key)
        out.append(a)
        i += 1
    return out


def _lists_in(path: str) -> list[str]:
    """The keys of :data:`LIST_KEYS` a YAML config file sets (none when it cannot be read: the parser reports that)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return []
    found = []
    for key in LIST_KEYS:
        node = doc
        for name in key.removeprefix("--").split("."):
            node = node.get(name) if isinstance(node, dict) else None
        if node is not None:
            found.append(key)
    return found
