"""Lightning loggers of a run (recipe ``loggers:``): each round's metrics go to them with the round as the step.

A recipe names loggers as Lightning does, by ``class_path`` (a short name means ``lightning.pytorch.loggers``)::

    loggers:
      - class_path: TensorBoardLogger          # pip install tensorboard (or mmfl[tensorboard])
      - class_path: CSVLogger
        init_args: {name: csv}
      - class_path: my_package.MyLogger        # any lightning.pytorch.loggers.Logger

``save_dir`` (or ``root_dir``), when the logger takes one and the recipe leaves it out, is the run folder. Per round
they receive: ``test_acc/<task>/<modality>`` and ``test_loss/...`` (``test_novel_acc/...`` with novel classes),
``fit_loss/...`` and ``fit_acc/...`` (example-weighted over the group's clients), ``client/<id>/fit_loss`` and
``.../fit_acc``, ``bytes_sent/<task>/<modality>`` and ``bytes_sent/total``, and ``epsilon`` under DP.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.loggers import Logger

SHORT = "lightning.pytorch.loggers"


def _resolve(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or SHORT), name)
    except (ImportError, AttributeError):
        raise ValueError(
            f"loggers: no class {class_path!r} (give a Lightning logger such as TensorBoardLogger or CSVLogger, "
            f"or a full module path)"
        ) from None
    if not (inspect.isclass(cls) and issubclass(cls, Logger)):
        raise ValueError(f"loggers: {class_path!r} is not a lightning.pytorch.loggers.Logger")
    return cls


def build_loggers(specs: Sequence[object] | None, run_dir: Path) -> list[Logger]:
    """The recipe's loggers, built now (before any data or model) so that a mistake is reported at once.

    Raises:
        ValueError: an entry that is not ``{class_path, init_args?}``, an unknown class, bad arguments, or a logger
            whose package is missing (TensorBoard).
    """
    loggers = []
    for i, spec in enumerate(specs or []):
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("class_path"), str)
            or set(spec)
            - {
                "class_path",
                "init_args",
            }
        ):
            raise ValueError(f"loggers[{i}] must be {{class_path: ..., init_args: {{...}}}}, got {spec!r}")
        cls = _resolve(spec["class_path"])
        args = dict(spec.get("init_args") or {})
        params = inspect.signature(cls.__init__).parameters
        for key in ("save_dir", "root_dir"):
            if key in params and key not in args:
                args[key] = str(run_dir)
        try:
            loggers.append(cls(**args))
        except (TypeError, ValueError, ModuleNotFoundError) as e:
            extra = " (pip install tensorboard, or mmfl[tensorboard])" if "tensorboard" in str(e).lower() else ""
            raise ValueError(f"loggers[{i}] {spec['class_path']}: {e}{extra}") from None
    return loggers


def round_metrics(rows: Sequence[dict], rnd: int) -> dict[str, float]:
    """The scalars of round ``rnd`` from the run's metric rows (see the module's docstring)."""
    out: dict[str, float] = {}
    fit: dict[str, list[tuple[float, float, int]]] = {}
    for r in rows:
        if int(r["round"]) != rnd:
            continue
        group = f"{r['task']}/{r['modality']}"
        if r["level"] == "task" and r["split"] in ("test", "test_novel"):
            out[f"{r['split']}_acc/{group}"] = float(r["accuracy"])
            out[f"{r['split']}_loss/{group}"] = float(r["loss"])
        elif r["level"] == "client" and r["split"] == "fit":
            out[f"client/{r['client']}/fit_loss"] = float(r["loss"])
            out[f"client/{r['client']}/fit_acc"] = float(r["accuracy"])
            fit.setdefault(group, []).append((float(r["loss"]), float(r["accuracy"]), int(r["examples"])))
        elif r["level"] == "traffic":
            out[f"bytes_sent/{group}"] = out.get(f"bytes_sent/{group}", 0.0) + float(r["value"])  # replies, statistics
            out["bytes_sent/total"] = out.get("bytes_sent/total", 0.0) + float(r["value"])
        elif r["level"] == "server" and r["split"] == "privacy":
            out["epsilon"] = float(r["value"])
    for group, vals in fit.items():
        n = sum(e for _, _, e in vals)
        if n:
            out[f"fit_loss/{group}"] = sum(lo * e for lo, _, e in vals) / n
            out[f"fit_acc/{group}"] = sum(a * e for _, a, e in vals) / n
    return {k: v for k, v in out.items() if not math.isnan(v)}


def log_round(loggers: Sequence[Logger], rows: Sequence[dict], rnd: int) -> None:
    """Send round ``rnd``'s scalars to every logger, the round as the step, and write them out."""
    if not loggers:
        return
    scalars = round_metrics(rows, rnd)
    for lg in loggers:
        lg.log_metrics(scalars, step=rnd)
        lg.save()
