"""`datadream registry list|promote|rollback|deploy`: look at and move the `champion` alias by hand, and
serve it on the cluster (datadream.serving.deploy; kubernetes is imported only by the commands using it).

Wired into datadream.cli with `registry_cli.add_parser(sub)` and, for `args.command == "registry"`,
`registry_cli.run(args)`. Results go to stdout; bad input raises UserError (exit 2).
"""

from __future__ import annotations

import argparse
import os
import re

from datadream.errors import UserError

# registry.KINDS, spelled out so that building the parser (every `datadream …` command) does not
# import mlflow (~2 s); tests/test_cli.py checks the two agree.
KINDS = ("classifier", "adapters")
DEFAULT_NAMESPACE = "datadream-serving"  # datadream.serving.manifests.DEFAULT_NAMESPACE (tests check)
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

    cluster = argparse.ArgumentParser(add_help=False)
    g = cluster.add_argument_group("serving on the cluster")
    g.add_argument("--namespace", default=DEFAULT_NAMESPACE, metavar="NS",
                   help=f"namespace of the serving Deployment (default {DEFAULT_NAMESPACE})")
    g.add_argument("--image", default=None, metavar="IMAGE",
                   help="container image with datadream and mlflow; pin it by digest in production "
                   "(default $DATADREAM_IMAGE or the pipeline's image)")
    g.add_argument("--gpu", action="store_true", help="one NVIDIA GPU per pod, on the GPU node group")
    g.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                   help="how long the rollout may take before it is undone (default 900)")
    g.add_argument("--context", default=None, metavar="CTX",
                   help="kubeconfig context (default: in-cluster inside a pod, else the current context)")

    a = sub.add_parser("promote", parents=[common, cluster], help="make VERSION the champion (no gate)",
                       description="Set the 'champion' alias on VERSION by hand and record it in the champion "
                       "history, so 'rollback' can undo it. With --deploy, also roll it out on the cluster; "
                       "if the rollout fails the alias moves back.",
                       epilog="example: datadream registry promote pets 7 --deploy --tracking-uri http://mlflow:5000",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("name", metavar="NAME", help=_NAME_HELP)
    a.add_argument("version", metavar="VERSION", help="model version number")
    a.add_argument("--deploy", action="store_true", help="then serve the new champion (see 'registry deploy')")

    a = sub.add_parser("rollback", parents=[common, cluster], help="move the champion back to the previous champion",
                       description="Set 'champion' on the version that held it before the current one "
                       "(from the registered model's champion_history tag). With --deploy, also roll the "
                       "cluster back to it; if that rollout fails the alias moves forward again.",
                       epilog="example: datadream registry rollback pets --deploy",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("name", metavar="NAME", help=_NAME_HELP)
    a.add_argument("--deploy", action="store_true", help="then serve the restored champion")

    a = sub.add_parser(
        "deploy", parents=[common, cluster], help="serve the champion classifier on Kubernetes",
        description="Render the Deployment (mlflow models serve on models:/NAME-classifier/<version>), "
        "Service, HorizontalPodAutoscaler and PodDisruptionBudget for the version ALIAS points to, apply them "
        "through the Kubernetes API and wait for the rolling update. A rollout that is not ready within "
        "--timeout is undone: the previous version keeps serving.",
        epilog="examples:\n  datadream registry deploy pets --dry-run > pets.yaml\n"
        "  datadream registry deploy pets --namespace datadream-serving --tracking-uri http://mlflow:5000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("name", metavar="NAME", help=_NAME_HELP)
    a.add_argument("--alias", default="champion", help="registry alias to serve (default champion)")
    a.add_argument("--dry-run", action="store_true", help="print the manifests as YAML; change nothing")
    return p


def format_table(rows: list[dict]) -> str:
    """The `list` table: VERSION, ALIASES, TEST_TOP1, TEST_TOP5, TEST_MEAN_PER_CLASS (those present), GATE,
    CREATED and REASON (the gate's reason from the version's description, without its settings)."""
    keys = [k for k in _TABLE_METRICS if any(k in r["metrics"] for r in rows)]
    header = ["VERSION", "ALIASES", *(k.upper() for k in keys), "GATE", "CREATED", "REASON"]
    table = [header]
    for r in rows:
        metrics = [f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-" for k in keys]
        reason = re.sub(r"\s*\(gate on [^)]*\)$", "", r.get("description") or "").partition(": ")[2]
        table.append([r["version"], ",".join(r["aliases"]) or "-", *metrics, r["gate"] or "-", r["created"],
                      reason or "-"])
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
    if getattr(args, "deploy", False) or args.registry_command == "deploy":
        if args.kind != "classifier":
            raise UserError(f"registry {args.registry_command}: only the classifier is served; drop --kind {args.kind}")
        _run_deploy(args, tracking_uri)
    elif args.registry_command == "list":
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


def _run_deploy(args: argparse.Namespace, tracking_uri: str) -> None:
    from datadream import registry
    from datadream.serving import deploy
    from datadream.serving.manifests import ServingSettings

    settings = ServingSettings(namespace=args.namespace, image=args.image, gpu=args.gpu)
    options = {"settings": settings, "timeout_s": args.timeout, "context": args.context}
    model = registry.classifier_name(args.name)
    if args.registry_command == "deploy":
        result = deploy.deploy(args.name, alias=args.alias, tracking_uri=tracking_uri, dry_run=args.dry_run, **options)
        print(result if isinstance(result, str) else result.line(), end="" if isinstance(result, str) else "\n")
        return
    if args.registry_command == "promote":
        moved, result = deploy.promote_and_deploy(args.name, args.version, tracking_uri=tracking_uri, **options)
    else:
        moved, result = deploy.rollback_and_deploy(args.name, tracking_uri=tracking_uri, **options)
    print(f"{model}: champion {moved['champion_before'] or 'none'} -> {moved['champion_after']}"
          + (" (rolled back)" if args.registry_command == "rollback" else ""))
    print(result.line())
