"""``mmfl export RUN --output FILE.safetensors``: a run's merged backbone projections written into a full open_clip
checkpoint, which ``Backbone(model_name, pretrained=FILE)``, ``mmfl zeroshot --pretrained FILE`` and open_clip's own
``create_model(model_name, pretrained=FILE)`` load."""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from mmfl.backbone import Backbone
from mmfl.federated.checkpoint import load_state, save_state
from mmfl.federated.settings import seed_all
from mmfl.prompts.alignment import BackboneProjections

log = logging.getLogger(__name__)

STATES = {"last": "global.safetensors", "best": "best.safetensors", "average": "average.safetensors"}
"""Which of a run's merged states to export: the last round's, the one its ``best_val`` selection kept, or the
mean its ``average`` selection wrote."""


class ExportError(ValueError):
    """The run cannot be exported (no run folder, no backbone part, a scope other than ``global``)."""


def run_recipe(run: str | Path):
    """The parsed recipe of a run folder (``RUN/config.yaml``) and its instantiated sections.

    Raises:
        ExportError: no run folder or no ``config.yaml`` in it.
    """
    from mmfl.recipe import fit_parser

    config = Path(run) / "config.yaml"
    if not config.is_file():
        raise ExportError(f"{str(run)!r} is not a run folder of `mmfl fit` (it has no config.yaml)")
    parser = fit_parser()
    cfg = parser.parse_args(["-c", str(config)])
    return cfg, parser.instantiate(cfg)


def projection_parts(backbone: Backbone, init) -> list[BackboneProjections]:
    """The run's :class:`BackboneProjections` parts, built on ``backbone``.

    Raises:
        ExportError: the run has none, or one of them is not of ``global`` scope.
    """
    parts = [p for p in (f(backbone, ["class"]) for f in init.parts) if isinstance(p, BackboneProjections)]
    if not parts:
        raise ExportError(
            "the run trained nothing of the backbone: its recipe has no mmfl.prompts.BackboneProjections part "
            "(prompts and adapters are not part of a backbone checkpoint)"
        )
    for p in parts:
        scopes = {p.scope_of(f"delta.{k}") for k in p.targets}
        if scopes != {"global"}:
            raise ExportError(
                f"part {p.part_name!r} has scope(s) {sorted(scopes)}: a backbone checkpoint holds one projection, so "
                "only a `global` BackboneProjections can be exported"
            )
    return parts


def adapted_state(
    run: str | Path, state: str = "last", mix: float = 1.0
) -> tuple[Backbone, dict[str, Tensor], dict[str, str]]:
    """The run's backbone with its merged projections: (the original backbone, the adapted full state dict, the
    checkpoint's metadata).

    Args:
        run: a run folder of ``mmfl fit``.
        state: which merged state (:data:`STATES`).
        mix: how much of the federation's change each projection takes, ``W0 + mix · (W − W0)`` (a weight-space
            ensemble of the original and the adapted backbone, as WiSE-FT's "Robust fine-tuning of zero-shot
            models", CVPR 2022): 1 the merged projections, 0 the original ones.

    Raises:
        ExportError: see :func:`run_recipe` and :func:`projection_parts`; ``state`` unknown or its file missing;
            ``mix`` outside [0, 1].
    """
    if state not in STATES:
        raise ExportError(f"--state {state!r}: use one of {sorted(STATES)}")
    if not 0.0 <= mix <= 1.0:
        raise ExportError(f"--mix {mix}: give a number from 0 (the original projections) to 1 (the run's merged ones)")
    cfg, init = run_recipe(run)
    path = Path(run) / STATES[state]
    if not path.is_file():
        hints = {"best": "best_val", "average": "average"}
        hint = (
            f" (the run had no `evaluation.selection: {hints[state]}`, or has not finished)"
            if state in hints
            else " (no round finished yet)"
        )
        raise ExportError(f"{str(path)!r} does not exist{hint}")
    merged = load_state(path)
    seed_all(cfg.seed)  # a random-weight backbone comes out as the run's (`mmfl fit` seeds before building it)
    backbone = Backbone(**cfg.backbone.as_dict())
    weights: dict[str, Tensor] = {}
    for part in projection_parts(backbone, init):
        prefix = f"global/{part.part_name}.delta."
        missing = [k for k in part.targets if prefix + k not in merged]
        if missing:
            raise ExportError(f"{str(path)!r} has no tensor {prefix + missing[0]!r}: not the state of this recipe")
        weights.update(part.weights({k: mix * merged[prefix + k] for k in part.targets}))  # W0 + s·(mix·Δ)
    full = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    for name, w in weights.items():
        full[name] = w.detach().to(full[name].dtype).cpu().contiguous()
    meta = {
        "model_name": backbone.model_name,
        "base_pretrained": str(cfg.backbone.pretrained or ""),
        "adapted": ",".join(sorted(weights)),
        "run": str(Path(run).resolve().name),
        "state": state,
        "mix": str(mix),
    }
    return backbone, full, meta


def export(run: str | Path, output: str | Path, state: str = "last", mix: float = 1.0) -> tuple[Backbone, Path]:
    """Write the run's adapted backbone to ``output`` (safetensors, written atomically); ``state`` and ``mix`` as
    :func:`adapted_state`.

    Returns:
        The original backbone (for comparisons) and the written path.
    """
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ExportError(f"--output {str(output)!r}: give a file name ending in .safetensors")
    if output.is_dir():
        raise ExportError(f"--output {str(output)!r} is a folder; give a file name ending in .safetensors")
    backbone, full, meta = adapted_state(run, state, mix)
    save_state(output, full, meta)
    log.info("wrote %s: %s with the run's merged %s", output, backbone.model_name, meta["adapted"])
    return backbone, output


def checkpoint_model_name(path: str | None) -> str | None:
    """The model name an ``mmfl export`` checkpoint records in its metadata (None: not such a file)."""
    if not path or not str(path).endswith(".safetensors") or not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("model_name")
    except (SafetensorError, OSError):
        return None


def export_parser():
    """Arguments of ``mmfl export``."""
    from jsonargparse import ActionYesNo

    from mmfl.recipe import Parser

    p = Parser(
        description="Write a run's merged backbone projections (BackboneProjections) into an open_clip checkpoint, "
        "and score it against the original backbone (zero-shot, hand-written templates) on the federation's tasks "
        "and on bundled sets it never saw.",
        allow_abbrev=False,
    )
    p.add_argument("run", type=str, help="a run folder written by `mmfl fit`")
    p.add_argument("--output", type=str, required=True, help="the checkpoint to write (FILE.safetensors)")
    p.add_argument(
        "--state",
        type=str,
        default="last",
        help="last: the last round's merged state; best: best.safetensors; average: average.safetensors",
    )
    p.add_argument(
        "--mix",
        type=float,
        default=1.0,
        help="how much of the run's change to the projections the checkpoint takes: W0 + mix·(W − W0) (WiSE-FT's "
        "weight-space ensemble; 1: the merged projections, 0: the original; lower forgets less of what the "
        "federation never saw)",
    )
    p.add_argument(
        "--guard", action=ActionYesNo, default=True, help="score the export against the original (--no_guard: skip)"
    )
    p.add_argument("--limit", type=int | None, default=500, help="examples per never-seen set in the guard")
    p.add_argument("--accelerator", type=str, default="auto")
    return p


def run_export(cfg) -> dict:
    """``mmfl export``: write the checkpoint; with the guard, print the comparison and write it beside the
    checkpoint as ``FILE.json``."""
    import json

    from mmfl.evaluation.forgetting import forgetting_report, guard_tasks, report_table

    original, path = export(cfg.run, cfg.output, cfg.state, cfg.mix)
    result: dict = {"checkpoint": str(path), "model_name": original.model_name}
    if cfg.guard:
        _, init = run_recipe(cfg.run)
        adapted = Backbone(original.model_name, pretrained=str(path))
        rows = forgetting_report(original, adapted, guard_tasks(init.tasks, cfg.limit), accelerator=cfg.accelerator)
        result["zero_shot"] = rows
        report = path.with_suffix(".json")
        report.write_text(json.dumps(result, indent=2) + "\n")
        log.info(
            "zero-shot top-1, hand-written templates (%s):\n%s",
            report.name,
            report_table(rows, original.model_name, path.name),
        )
    return result
