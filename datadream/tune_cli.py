"""`datadream tune run|best|report`: Optuna search campaigns over LoRA rank and learning rate.

Wired into datadream.cli with `tune_cli.add_parser(sub, config_args)` and, for `args.command == "tune"`,
`tune_cli.run(args, load)`. Results go to stdout; bad input raises UserError (exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from datadream.errors import UserError

log = logging.getLogger(__name__)

_STORAGE_HELP = ("study storage URL: postgresql://user@host/db (cluster), sqlite:///tune.db or "
                 "journal:///tune.log (one machine)")


def add_parser(subparsers, config_args) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune", help="hyperparameter search campaigns (Optuna): run, export the best config, report",
        description="Search LoRA rank and learning rate (tune.search, tune.space) by the val top-1 of the "
        "classifier trained on each trial's synthetic images. Campaigns resume: re-run the same command.")
    sub = p.add_subparsers(dest="tune_command", required=True, metavar="ACTION")

    def study_args(a):
        a.add_argument("--study", required=True, help="study name (one campaign)")
        a.add_argument("--storage", default=os.environ.get("OPTUNA_STORAGE"),
                       help=_STORAGE_HELP + "; default $OPTUNA_STORAGE (keeps a password out of the command line)")

    a = sub.add_parser("run", help="start or resume a campaign until it holds N finished trials",
                       description="Create or load the study, enqueue the config's own settings as trial 0, and "
                       "run trials until the study holds --trials finished (complete or pruned) trials. Stop "
                       "it any time (Ctrl-C); the same command resumes it.")
    study_args(a)
    a.add_argument("--trials", type=int, required=True, help="finished trials the campaign should reach")
    a.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    a.add_argument("--dataset", default="demo", help="ImageFolder root, or 'demo' (default)")
    a.add_argument("--work", help="folder for the few-shot set and trial outputs (default tune-runs/STUDY)")
    a.add_argument("--experiment", help="MLflow experiment for the campaign and trial runs "
                   "(default datadream-tune; '' = no MLflow); store: $MLFLOW_TRACKING_URI or ./mlflow.db")
    config_args(a)

    a = sub.add_parser("best", help="write the best trial's settings as a config file",
                       description="The best completed trial's searched settings (LoRA alpha follows the "
                       "rank) as YAML that --config and the pipeline's `config` parameter accept.")
    study_args(a)
    a.add_argument("-o", "--output", default="best.yaml", help="config file to write (default best.yaml)")
    config_args(a)

    a = sub.add_parser("report", help="trials table, parameter importances, optimization-history plot",
                       description="Print every trial (state, val top-1, settings, MLflow run) and the "
                       "parameter importances; with --plot, write the optimization history as PNG.")
    study_args(a)
    a.add_argument("--plot", metavar="PNG", help="write the optimization history plot here")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def run(args, load) -> None:
    from datadream import tuning

    if not args.storage:
        raise UserError("--storage: required (or set $OPTUNA_STORAGE), e.g. sqlite:///tune.db")
    if args.tune_command == "run":
        _run(args, load)
    elif args.tune_command == "best":
        config = load(args)
        study = tuning.load_study(args.study, args.storage, config)
        path = tuning.write_best(study, config, args.output)
        sys.stdout.write(f"{path}\n")
    elif args.tune_command == "report":
        study = tuning.load_study(args.study, args.storage)
        rows = tuning.trials_table(study)
        imp = tuning.importances(study)
        if args.plot:
            if not any(r["state"] == "COMPLETE" for r in rows):
                raise UserError(f"study {args.study!r}: no completed trial yet; nothing to plot")
            tuning.plot_history(study, args.plot)
        if args.json:
            sys.stdout.write(json.dumps({"trials": rows, "importances": imp}, default=str, indent=2) + "\n")
        else:
            sys.stdout.write(_table(rows) + "\n")
            if imp:
                sys.stdout.write("\nparameter importances: "
                                 + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()) + "\n")


def _run(args, load) -> None:
    from datadream import tuning

    if args.trials < 1:
        raise UserError(f"--trials {args.trials}: expected at least 1")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: expected at least 1")
    tuning.check_study_name(args.study)
    config = load(args)
    experiment = "datadream-tune" if args.experiment is None else args.experiment
    work = Path(args.work or Path("tune-runs") / args.study)
    fewshot_set = tuning.prepare(config, args.dataset, args.study, args.storage, work / "fewshot", experiment,
                                 work=work)
    job = {"study": args.study, "storage_url": args.storage, "config": config, "fewshot_dir": fewshot_set.path,
           "work_dir": work, "experiment": experiment, "trials": args.trials}
    if args.workers > 1:
        status = tuning.run_workers(args.workers, **job)
        if status:
            raise UserError(f"tune run: a worker exited with status {status}; re-run the command to resume")
    else:
        log.info("tune: this worker ran %d trial(s)", tuning.work(**job))
    study = tuning.load_study(args.study, args.storage, config)
    try:
        best = study.best_trial
        sys.stdout.write(json.dumps({"study": args.study, "finished": tuning.finished(study),
                                     "best_trial": best.number, "best_value": best.value,
                                     "best_params": best.params}) + "\n")
    except ValueError:
        sys.stdout.write(json.dumps({"study": args.study, "finished": tuning.finished(study), "best_trial": None})
                         + "\n")


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
