"""The ``mmfl`` command: ``mmfl fit -c RECIPE [--a.b=value ...]``, ``mmfl evaluate``, ``mmfl plot RUN``,
``mmfl zeroshot``, ``mmfl export RUN``, ``mmfl choose RUN RUN``, ``mmfl modalities``; ``-v`` shows everything,
``-q`` warnings only."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from mmfl import plots
from mmfl.backbone import Backbone
from mmfl.choose import choose_parser, run_choose
from mmfl.data.task import Task, prepare_task
from mmfl.evaluation.command import OUTPUTS, add_evaluate_arguments, run_evaluate
from mmfl.evaluation.protocol import Protocol
from mmfl.evaluation.zeroshot_command import run_zeroshot, zeroshot_parser, zeroshot_report
from mmfl.export import export_parser, run_export
from mmfl.federated.averaging import AVERAGE
from mmfl.federated.faults import RoundFailed
from mmfl.federated.resume import CHECKPOINT, completed_round
from mmfl.federated.run_loggers import build_loggers
from mmfl.federated.settings import Federation
from mmfl.federated.simulation import Simulation, seed_all
from mmfl.federated.summary import run_summary
from mmfl.hub import Unavailable
from mmfl.interrupt import Interrupted, flush_streams, interrupted_message, stop_on_signals
from mmfl.modalities import ModalityError, available_modalities
from mmfl.progress import progress_for
from mmfl.quiet import setup_logging
from mmfl.recipe import Parser, check_recipe, check_resume, fit_parser, lists_replace, resume_argv

log = logging.getLogger("mmfl")

RUN_FILES = ("config.yaml", "metrics.csv", "global.safetensors", plots.PNG)


def flower_app_parser() -> ArgumentParser:
    """Arguments of ``mmfl flower-app``: a recipe (checked, resolved) plus where the app and the run go."""
    p = fit_parser()
    p.add_argument("--app_dir", type=str, required=True, help="the Flower app folder to write (pyproject.toml)")
    p.add_argument(
        "--min_nodes", type=int, default=0, help="nodes to wait for before a round (default: one per client)"
    )
    p.add_argument(
        "--secure_aggregation",
        type=bool,
        default=False,
        help="run with SecAgg+: the server sees only sums of the clients' tensors (merge rule FedAvg/FedAvgM)",
    )
    p.add_argument("--secagg_num_shares", type=float, default=1.0, help="SecAgg+ shares per key (share of clients)")
    p.add_argument("--secagg_threshold", type=float, default=0.67, help="SecAgg+ shares needed to reconstruct")
    p.add_argument(
        "--secagg_clipping_range", type=float, default=8.0, help="SecAgg+ bound on |value| before quantization"
    )
    p.add_argument("--secagg_max_weight", type=float, default=1000.0, help="SecAgg+ bound on a client's weight")
    return p


def write_flower_app(parser: ArgumentParser, cfg: Namespace) -> Path:
    """Check the recipe, then write the app whose ServerApp writes to ``--output_dir``."""
    from mmfl.federated.virtual_features import refuse_on_flower

    try:
        from mmfl.federated.flower import write_app
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"the Flower engine needs flwr: pip install 'mmfl[flower]' ({e})") from None
    init, tasks, federation = check_recipe(parser, cfg)
    refuse_on_flower(federation.virtual_features)
    secagg = None
    if cfg.secure_aggregation:
        from mmfl.federated.flower_secagg import check_secure

        unseen = init.evaluation.unseen_clients if init.evaluation else 0
        check_secure(federation.aggregator, sum(t.clients - unseen for t in tasks))
        secagg = {
            "num-shares": cfg.secagg_num_shares,
            "threshold": cfg.secagg_threshold,
            "clipping-range": cfg.secagg_clipping_range,
            "max-weight": cfg.secagg_max_weight,
        }
    out = _output_dir(cfg).resolve()
    _check_output_dir(out, cfg.overwrite)
    app_dir = Path(cfg.app_dir)
    recipe = cfg.clone()
    flower_only = ("secure_aggregation", "secagg_num_shares", "secagg_threshold", "secagg_clipping_range")
    for k in ("app_dir", "min_nodes", "output_dir", "overwrite", "config", "resume", *flower_only, "secagg_max_weight"):
        recipe.pop(k, None)
    fit = fit_parser()
    text = fit.dump(recipe, skip_none=False, skip_validation=True)
    path = write_app(text, app_dir, out, min_nodes=cfg.min_nodes, secagg=secagg)
    log.info("wrote %s; run it with: flwr run %s <connection>", path, app_dir)
    return path


def plot_parser() -> ArgumentParser:
    """Arguments of ``mmfl plot``: the run folder."""
    p = Parser(description="Redraw RUN/accuracy_per_round.png from RUN/metrics.csv.", allow_abbrev=False)
    p.add_argument("run", type=str, help="a run folder written by `mmfl fit` (finished or still running)")
    return p


def build_parser() -> ArgumentParser:
    """The top-level ``mmfl`` parser with its subcommands."""
    parser = Parser(prog="mmfl", description=__doc__, allow_abbrev=False)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show everything: debug lines, other libraries' notices"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only: no progress lines")
    sub = parser.add_subcommands(required=True)
    sub.add_subcommand("fit", fit_parser(), help="train: a federation, or a centralised run")
    sub.add_subcommand(
        "evaluate",
        add_evaluate_arguments(fit_parser()),
        help="the evaluation protocol on a recipe: base/novel/HM, local vs global, per modality, ECE, unseen "
        "clients, transfer, baselines, mean ± std over seeds; writes report.md, metrics.json and plots",
    )
    sub.add_subcommand(
        "flower-app",
        flower_app_parser(),
        help="write a Flower app folder that runs a recipe on Flower's simulation or deployment engine",
    )
    sub.add_subcommand("zeroshot", zeroshot_parser(), help="zero-shot top-1 of a backbone on a data set")
    sub.add_subcommand(
        "export",
        export_parser(),
        help="write a run's merged backbone projections as an open_clip checkpoint, scored against the original",
    )
    sub.add_subcommand(
        "choose", choose_parser(), help="keep per (task, modality) the run that scores highest on its validation data"
    )
    sub.add_subcommand("plot", plot_parser(), help="redraw a run's accuracy_per_round.png (finished or running)")
    sub.add_subcommand("modalities", Parser(), help="list the registered modalities")
    return parser


def _output_dir(cfg: Namespace) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    configs = cfg.get("config") or []
    stem = Path(str(configs[-1])).stem if configs else "run"
    return Path("runs") / stem


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {str(out)!r} exists and is not a folder")
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"--output_dir {str(out)!r} already holds a run ({', '.join(existing)}); choose another "
            "--output_dir, or pass --overwrite=true to replace it"
        )


def run_fit(parser: ArgumentParser, cfg: Namespace) -> Simulation:
    """Check everything cheap, prepare data, build the backbone, then run and write the outputs
    (or continue the run of ``--resume``)."""
    init, tasks, federation = check_recipe(parser, cfg)
    protocol: Protocol = init.evaluation or Protocol()
    if protocol.variants:
        names = ", ".join(v.name for v in protocol.variants)
        log.info(
            "evaluation.variants (%s) are trained and scored by `mmfl evaluate`; `mmfl fit` trains the recipe", names
        )
    if cfg.resume:
        out = check_resume(parser, cfg)
    else:
        out = _output_dir(cfg)
        _check_output_dir(out, cfg.overwrite)

    try:
        return _fit(parser, cfg, init, tasks, federation, protocol, out)
    except Interrupted as e:  # say where the run is (a folder with a config.yaml resumes) and how far it got
        e.run = str(out) if (out / "config.yaml").is_file() else None
        e.completed = completed_round(out) if e.run else None
        raise


def _fit(
    parser: ArgumentParser,
    cfg: Namespace,
    init: Namespace,
    tasks: list[Task],
    federation: Federation,
    protocol: Protocol,
    out: Path,
) -> Simulation:
    """:func:`run_fit` after the cheap checks: data, backbone, the rounds, the outputs."""
    loggers = build_loggers(cfg.loggers, out)  # a bad entry is reported now, before any data or model
    prepared = [prepare_task(t, seed=cfg.seed, **protocol.split_args()) for t in tasks]
    seed_all(cfg.seed)  # random-weight backbones must come out the same for the same seed
    backbone = Backbone(**cfg.backbone.as_dict())
    sim = Simulation(
        backbone,
        prepared,
        init.parts,
        init.training,
        federation,
        seed=cfg.seed,
        output_dir=None,
        **protocol.selection_args(),
    )
    done = sim.resume(out) if cfg.resume else None  # a bad checkpoint fails here, before anything is written
    if cfg.resume and done is None:
        log.info("%s has no complete round yet: starting it from the beginning", out)
    # Everything is built and checked: now write.
    out.mkdir(parents=True, exist_ok=True)
    if done is None:
        for f in (*RUN_FILES, "best.safetensors", AVERAGE, CHECKPOINT):
            (out / f).unlink(missing_ok=True)
    if not cfg.resume:
        parser.save(cfg, out / "config.yaml", skip_none=False, overwrite=True, multifile=False)
    sim.attach_output(out)
    log.info("writing to %s", out)
    t0 = time.monotonic()
    sim.progress = progress_for(quiet=not log.isEnabledFor(logging.INFO))  # a live display on a terminal
    sim.loggers = loggers
    status = "failed"
    try:
        sim.run()
        status = "success"
    finally:
        for lg in loggers:
            lg.finalize(status)
    plots.plot_run(out)
    log.info("summary:\n%s", run_summary(sim.metrics.rows, sim.best_round, time.monotonic() - t0, sim.best_average))
    if sim.best_round is not None:
        where = f"the average of rounds {sim.best_average}" if sim.best_average else f"round {sim.best_round}"
        log.info("best validation accuracy %.1f%% at %s: best.safetensors", 100 * sim.best_score, where)
    if sim.averaging and sim.avg_count:
        log.info("the mean of the states after %s: %s (local_average/ for the clients' own)", sim.window(), AVERAGE)
    log.info("done: %s", ", ".join(str(out / f) for f in RUN_FILES))
    return sim


def evaluate_command(parser: ArgumentParser, cfg: Namespace) -> dict:
    """``mmfl evaluate``: check the recipe and the output folder, then run the protocol and write the report."""
    init, tasks, federation = check_recipe(parser, cfg)
    if cfg.output_dir:
        out = Path(cfg.output_dir)
    else:
        out = _output_dir(cfg) / "eval"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {str(out)!r} exists and is not a folder")
    existing = [f for f in OUTPUTS if (out / f).exists()]
    if existing and not cfg.overwrite:
        raise ValueError(
            f"--output_dir {str(out)!r} already holds an evaluation ({', '.join(existing)}); choose another "
            "--output_dir, or pass --overwrite=true to replace it"
        )
    summary = run_evaluate(cfg, init, tasks, federation, out)
    parser.save(cfg, out / "config.yaml", skip_none=False, overwrite=True, multifile=False)
    return summary


VERBOSITY_FLAGS = ("-v", "--verbose", "-q", "--quiet")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mmfl`` command. Returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # -v / -q are the top-level parser's, and accepted anywhere on the line (`mmfl fit -c r.yaml -q`)
    flags, argv = [a for a in argv if a in VERBOSITY_FLAGS], [a for a in argv if a not in VERBOSITY_FLAGS]
    verbose, quiet = any(a in flags for a in ("-v", "--verbose")), any(a in flags for a in ("-q", "--quiet"))
    if verbose and quiet:
        print("mmfl: error: give -v (show everything) or -q (warnings only), not both", file=sys.stderr)
        return 2
    setup_logging(verbose, quiet)
    resumed = resume_argv(argv)
    if resumed is not argv and not Path(resumed[2]).is_file():
        run = Path(resumed[2]).parent
        print(f"mmfl fit: error: --resume {str(run)!r}: no run there (no config.yaml)", file=sys.stderr)
        return 2
    cfg = parser.parse_args(flags + lists_replace(resumed))  # bad keys/types/files: prints the problem, exits 2
    if cfg.subcommand == "modalities":
        for name, source in available_modalities().items():
            print(f"{name:<16} {source}")
        return 0
    sub = parser._subcommands_action._name_parser_map
    try:
        with stop_on_signals():
            return _dispatch(cfg, sub)
    except Interrupted as e:
        print(interrupted_message(cfg.subcommand, e, e.run, e.completed), file=sys.stderr)
        flush_streams()
        return e.status
    except RoundFailed as e:
        print(f"mmfl {cfg.subcommand}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, FileNotFoundError, ModuleNotFoundError, ModalityError, Unavailable) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"mmfl {cfg.subcommand}: error: {msg}", file=sys.stderr)
        return 2


def _dispatch(cfg: Namespace, sub: dict) -> int:
    """Run the parsed subcommand."""
    if cfg.subcommand == "zeroshot":
        print(zeroshot_report(cfg.zeroshot, run_zeroshot(cfg.zeroshot)))
    elif cfg.subcommand == "export":
        run_export(cfg.export)
    elif cfg.subcommand == "choose":
        run_choose(cfg.choose.runs, cfg.choose.output, cfg.choose.state, cfg.choose.overwrite)
    elif cfg.subcommand == "plot":
        log.info("wrote %s", plots.plot_run(cfg.plot.run))
    elif cfg.subcommand == "flower-app":
        write_flower_app(sub["flower-app"], cfg["flower-app"])
    elif cfg.subcommand == "evaluate":
        evaluate_command(sub["evaluate"], cfg.evaluate)
    else:
        run_fit(sub["fit"], cfg.fit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
