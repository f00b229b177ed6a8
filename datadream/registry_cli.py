"""`datadream registry list|promote|rollback`: look at and move the `champion` alias by hand.

Wired into datadream.cli with `registry_cli.add_parser(sub)` and, for `args.command == "registry"`,
`registry_cli.run(args)`. Results go to stdout; bad input raises UserError (exit 2).
"""

from __future__ import annotations

import argparse
import os

from datadream.errors import UserError

# registry.KINDS, spelled out so that building the parser (every `datadream …` command) does not
# import mlflow (~2 s); tests/test_cli.py checks the two agree.
KINDS = ("classifier", "adapters")
_TABLE_METRICS = ("test_top1", "test_top5", "test_mean_per_class")
_NAME_HELP = "registry name: the models are NAME-classifier and NAME-sd-lora"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `registry` with its actions to the CLI's subparsers; returns the `registry` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow tracking (and registry) URI, e.g. http://mlflow:5000 or "
                        "sqlite:///mlflow.db; default $MLFLOW_TRACKING_URI (one of the two is required)")
    common.add_argument("--kind", choices=KINDS, default="classifier",
                        help="which registered model: the classifier (NAME-classifier, default) or the "
                        "SD adapters (NAME-sd-lora)")

    p = subparsers.add_parser(
        "registry", help="MLflow model registry: list versions, promote a version, roll back the champion",
        description="Registered models NAME-classifier (served as models:/NAME-classifier@champion) and "
        "NAME-sd-lora. New versions get the alias 'candidate'; the pipeline's gate or these commands move "
        "'champion'.")
    sub = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")

    a = sub.add_parser("list", parents=[common], help="versions with aliases, test metrics and gate decisions",
                       description="One row per version, oldest first: aliases, test metrics (test_* tags), "
                       "the gate's decision and when it was created.")
    a.add_argument("name", metavar="NAME", help=_NAME_HELP)

    a = sub.add_parser("promote", parents=[common], help="make VERSION the champion (no gate)",
                       description="Set the 'champion' alias on VERSION by hand and record it in the champion "
                       "history, so 'rollback' can undo it.")
    a.add_argument("name", metavar="NAME", help=_NAME_HELP)
    a.add_argument("version", metavar="VERSION", help="model version number")

    a = sub.add_parser("rollback", parents=[common], help="move the champion back to the previous champion",
                       description="Set 'champion' on the version that held it before the current one "
                       "(from the registered model's champion_history tag).")
    a.add_argument("name", metavar="NAME", help=_NAME_HELP)
    return p


def format_table(rows: list[dict]) -> str:
    """The `list` table: VERSION, ALIASES, TEST_TOP1, TEST_TOP5, TEST_MEAN_PER_CLASS (those present), GATE, CREATED."""
    keys = [k for k in _TABLE_METRICS if any(k in r["metrics"] for r in rows)]
    header = ["VERSION", "ALIASES", *(k.upper() for k in keys), "GATE", "CREATED"]
    table = [header]
    for r in rows:
        metrics = [f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-" for k in keys]
        table.append([r["version"], ",".join(r["aliases"]) or "-", *metrics, r["gate"] or "-", r["created"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)


def run(args: argparse.Namespace) -> None:
    """Carry out a parsed `registry …` command, printing the result."""
    # No silent fallback to MLflow's default ./mlflow.db: a typo'd environment would create an empty
    # registry in the current folder and report every model as missing.
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise UserError("registry: no tracking URI; pass --tracking-uri or set MLFLOW_TRACKING_URI")
    from datadream import registry

    model = registry.registered_name(args.name, args.kind)
    if args.registry_command == "list":
        rows = registry.list_versions(args.name, kind=args.kind, tracking_uri=tracking_uri)
        print(format_table(rows) if rows else f"{model}: no versions")
    elif args.registry_command == "promote":
        result = registry.promote(args.name, args.version, kind=args.kind, tracking_uri=tracking_uri)
        if result["decision"] == "unchanged":
            print(f"{model}: {result['reason']}")
        else:
            print(f"{model}: champion {result['champion_before'] or 'none'} -> {result['champion_after']}")
    elif args.registry_command == "rollback":
        result = registry.rollback(args.name, kind=args.kind, tracking_uri=tracking_uri)
        print(f"{model}: champion {result['champion_before'] or 'none'} -> {result['champion_after']} "
              "(rolled back)")
    else:  # argparse's `required=True` makes this unreachable from the command line
        raise ValueError(f"unknown registry action {args.registry_command!r}")
