"""`datadream …`: one subcommand per stage, plus `demo`.

Every stage command takes `--preset`, `--config FILE` (repeatable) and `--set section.key=value`
(repeatable), its inputs as paths, and `--out`. A user error prints one line and exits 2; any other
failure exits 1 with a traceback, so an orchestrator may retry it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from datadream import __version__, artifacts
from datadream.errors import InfraError, UserError

log = logging.getLogger("datadream")


def _config_args(p: argparse.ArgumentParser, default_preset: str = "paper") -> None:
    g = p.add_argument_group("configuration (applied in this order)")
    from datadream import presets

    g.add_argument("--preset", default=default_preset, choices=presets.names(), metavar="NAME",
                   help="base settings: paper (the paper's, docs/method.md), tiny (CPU, seconds) or "
                   f"paper/DATASET (the paper's plus a dataset's layout and domain word: "
                   f"{', '.join(n.split('/')[1] for n in presets.names() if '/' in n)}); default {default_preset}")
    g.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file layered on the preset")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override one setting, e.g. --set adapt.rank=8")


# Stage subcommands: (one-line help, description, example, the marker file the stage writes last).
# tests/test_cli.py checks each marker against the stage module's own constant.
_STAGES = {
    "fewshot": (
        "sample k real images per class; write train/val/test manifests",
        "Pick --shots real training images per class with --seed (validated: corrupt, truncated or "
        "oversized images are rejected with a reason), and write the train/val/test manifests with a "
        "sha256 per image, the class list and the rejected files.",
        "datadream fewshot --dataset DATA --shots 16 --seed 1 --out fs",
        artifacts.FEWSHOT_MARKER),
    "adapt": (
        "LoRA fine-tuning of Stable Diffusion on the few-shot images",
        "Train LoRA adapters of Stable Diffusion's UNet and text encoder on the few-shot images: one per "
        "class (--mode class, optionally one shard of the classes) or one for the whole dataset (--mode "
        "dataset). Checkpoints are published atomically; a killed run resumes from the newest one.",
        "datadream adapt --fewshot fs --mode class --shard 0/4 --out ad",
        artifacts.ADAPTERS_MARKER),
    "generate": (
        "generate synthetic images per class with the adapters",
        "Generate generate.images_per_class images per class with each class's adapter; every image's "
        "seed comes from (seed, class, index), so shards and resumed runs make the same images.",
        "datadream generate --fewshot fs --adapters ad --shard 0/4 --out syn",
        artifacts.SYNTHETIC_MARKER),
    "classify": (
        "train the CLIP LoRA classifier (epoch chosen on val)",
        "Fine-tune CLIP with LoRA on synthetic images, synthetic+real or the real shots, with a head of "
        "class text embeddings; the epoch with the best val top-1 is kept (epoch 0 = zero-shot).",
        "datadream classify --fewshot fs --synthetic syn --train-on synthetic+real --out clf",
        artifacts.CLASSIFIER_MARKER),
    "evaluate": (
        "top-1/top-5, per-class accuracy and confusion matrix on a split",
        "Evaluate a classifier on the test (or val) split: top-1, top-5, per-class accuracy and the "
        "confusion matrix (confusion.csv); prints top1, top5 and n as one JSON line.",
        "datadream evaluate --fewshot fs --classifier clf --out ev",
        artifacts.METRICS_MARKER),
}


def _stage_parser(sub, name: str) -> argparse.ArgumentParser:
    summary, description, example, marker = _STAGES[name]
    epilog = (f"example:\n  {example}\n\nwrites {marker} last: a folder without it is incomplete; re-running a "
              "finished stage\nwith the same inputs does nothing, an interrupted one resumes.")
    return sub.add_parser(name, help=summary, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _global_flags(p: argparse.ArgumentParser, top: bool) -> None:
    # Below the top level the default is SUPPRESS, so a flag given before the subcommand is not reset.
    default = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging; stream every pipeline task's output",
                   **default)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and results only, no progress bars",
                   **default)


def _add_global_flags_everywhere(parser: argparse.ArgumentParser) -> None:
    """-q/-v on every subcommand too, so `datadream fewshot -q …` works like `datadream -q fewshot …`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                _global_flags(sub, top=False)
                _add_global_flags_everywhere(sub)


def _load(args, extra: Sequence[str] = ()):
    from datadream.config import load_config

    return load_config(args.preset, args.config, [*args.overrides, *extra])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datadream",
        description="DataDream: synthesize a few-shot classification training set with Stable Diffusion "
        "LoRA, then train a CLIP LoRA classifier on it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="make the demo dataset and run the pipeline on the tiny preset, both modes")
    p.add_argument("--out", default="demo-run",
                   help="folder or s3:// prefix for all artifacts (default demo-run); an s3:// run is built in a "
                   "local staging folder and published with results.json last")
    p.add_argument("--dataset", help="an ImageFolder (folder or s3:// prefix) instead of the procedural demo dataset")
    p.add_argument("--in-process", action="store_true",
                   help="call the stages directly instead of running the pipeline under kfp.local")
    _config_args(p, default_preset="tiny")

    p = sub.add_parser("demo-dataset", help="write the procedural demo dataset (ImageFolder with splits)")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")

    p = _stage_parser(sub, "fewshot")
    p.add_argument("--dataset", required=True, help="dataset folder (or s3:// prefix) in the --dataset-format layout; "
                   "ImageFolder: DIR/<class>/<img> or DIR/{train,val,test}/…")
    p.add_argument("--dataset-format", help="data.format: imagefolder (default), imagenet, caltech101, dtd, eurosat, "
                   "fgvc_aircraft, food101, flowers102, oxford_pets, stanford_cars, sun397 (datadream/data/formats.py)")
    p.add_argument("--shots", type=_positive_int, help="images per class (fewshot.shots)")
    p.add_argument("--seed", type=int, help="sampling seed (fewshot.seed)")
    p.add_argument("--out", required=True, help="output folder (a FewShotSet)")
    _config_args(p)

    p = _stage_parser(sub, "adapt")
    p.add_argument("--fewshot", required=True, help="a fewshot output folder")
    p.add_argument("--mode", choices=("class", "dataset"), help="adapt.mode: one adapter per class or one for all")
    p.add_argument("--shard", help="only classes I, I+N, … of shard I/N (class-wise fan-out)")
    p.add_argument("--out", required=True, help="output folder (Adapters)")
    _config_args(p)

    p = _stage_parser(sub, "generate")
    p.add_argument("--fewshot", required=True, help="a fewshot output folder (classes)")
    p.add_argument("--adapters", required=True, help="an adapt output folder")
    p.add_argument("--shard", help="only classes I, I+N, … of shard I/N")
    p.add_argument("--out", required=True, help="output folder (SyntheticSet)")
    _config_args(p)

    p = _stage_parser(sub, "classify")
    p.add_argument("--fewshot", required=True, help="a fewshot output folder (real shots, val split)")
    p.add_argument("--synthetic", help="a generate output folder (needed unless --train-on real)")
    p.add_argument("--train-on", choices=("synthetic", "synthetic+real", "real"), help="classify.train_on")
    p.add_argument("--out", required=True, help="output folder (Classifier)")
    _config_args(p)

    p = _stage_parser(sub, "evaluate")
    p.add_argument("--fewshot", required=True, help="a fewshot output folder")
    p.add_argument("--classifier", required=True, help="a classify output folder")
    p.add_argument("--split", default="test", choices=("test", "val"), help="which split (default test)")
    p.add_argument("--out", required=True,
                   help=f"output folder ({artifacts.METRICS_MARKER}, {artifacts.CONFUSION_FILE})")
    _config_args(p)
    _pipeline_parser(sub)
    from datadream import registry_cli, tune_cli

    registry_cli.add_parser(sub)
    tune_cli.add_parser(sub, lambda a: _config_args(a, default_preset="tiny"))
    _add_global_flags_everywhere(parser)
    return parser


def _pipeline_parser(sub) -> None:
    p = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, upload, submit, schedule")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def cluster_args(a):
        a.add_argument("--image", help="container image of every step (default $DATADREAM_IMAGE or the built one)")
        a.add_argument("--gpu-node-selector", metavar="KEY=VALUE", help="label of the GPU node group")
        a.add_argument("--gpu-taint", metavar="KEY:EFFECT", help="taint of the GPU node group to tolerate")
        a.add_argument("--pipeline-root", metavar="URI",
                       help="where steps write their artifacts, e.g. s3://bucket/pipeline-root (default: the "
                       "cluster's, from the kfp-launcher ConfigMap)")

    def server_args(a):
        a.add_argument("--host", required=True, help="Kubeflow Pipelines API, e.g. http://localhost:8080")
        a.add_argument("--token", help="bearer token (default $KFP_TOKEN; never printed)")
        a.add_argument("--namespace", help="Kubeflow profile namespace (multi-user)")
        a.add_argument("--package", help="a compiled YAML to use instead of compiling now")
        cluster_args(a)
        pipeline_arg(a)

    def pipeline_arg(a):
        a.add_argument("--pipeline", default="datadream", choices=("datadream", "datadream-tune"),
                       help="datadream (a run, default) or datadream-tune (a search campaign, then a run)")

    def params_arg(a):
        a.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="pipeline parameter, e.g. --param shots=8 --param train_on='[\"synthetic\"]'")

    a = actions.add_parser("compile", help="write the pipeline YAML (same inputs, byte-identical output)")
    a.add_argument("-o", "--output", default="datadream.yaml", help="YAML path (default datadream.yaml)")
    cluster_args(a)
    pipeline_arg(a)
    params_arg(a)

    a = actions.add_parser("run", help="run the pipeline (--local: kfp.local SubprocessRunner, tiny preset)")
    a.add_argument("--local", action="store_true", required=True, help="run on this machine")
    a.add_argument("--root", default="pipeline-runs", help="local pipeline root (default pipeline-runs)")
    pipeline_arg(a)
    params_arg(a)

    a = actions.add_parser("upload", help="upload the pipeline and a new version named from version + git sha")
    server_args(a)
    a.add_argument("--name", help="pipeline name in the UI (default: the --pipeline name)")

    a = actions.add_parser("submit", help="start one run")
    server_args(a)
    params_arg(a)
    a.add_argument("--experiment", default="datadream", help="experiment (created if missing)")
    a.add_argument("--run-name", help="display name of the run")

    a = actions.add_parser("schedule", help="create a recurring run (KFP cron: 6 fields, seconds first)")
    server_args(a)
    params_arg(a)
    a.add_argument("--cron", required=True, help="e.g. '0 0 3 * * 1' = Mondays 03:00 UTC")
    a.add_argument("--experiment", default="datadream", help="experiment (created if missing)")
    a.add_argument("--name", default="datadream-weekly", help="name of the recurring run")


def _cluster_settings(args):
    from pipelines.pipeline import ClusterSettings

    kw = {"image": args.image} if args.image is not None else {}
    if args.gpu_node_selector:
        key, sep, value = args.gpu_node_selector.partition("=")
        if not sep or not key:
            raise UserError(f"--gpu-node-selector {args.gpu_node_selector!r}: expected KEY=VALUE")
        kw["gpu_node_selector"] = (key, value)
    if args.gpu_taint:
        key, sep, effect = args.gpu_taint.partition(":")
        if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise UserError(f"--gpu-taint {args.gpu_taint!r}: expected KEY:NoSchedule|PreferNoSchedule|NoExecute")
        kw["gpu_toleration"] = (key, effect)
    if args.pipeline_root:
        from datadream import storage

        if not storage.is_s3(args.pipeline_root):
            raise UserError(f"--pipeline-root {args.pipeline_root!r}: expected s3://bucket/prefix")
        storage.parse_s3(args.pipeline_root)  # a valid bucket name and prefix
        kw["pipeline_root"] = args.pipeline_root.rstrip("/")
    return ClusterSettings(**kw)


def _package(args, workdir) -> str:
    """The YAML to send: --package, or the pipeline compiled now with the given cluster settings."""
    from pipelines.pipeline import compile_pipeline

    if args.package:
        if not Path(args.package).is_file():
            raise UserError(f"--package {args.package}: file not found")
        return args.package
    return str(compile_pipeline(Path(workdir) / f"{args.pipeline}.yaml", _cluster_settings(args), name=args.pipeline))


def run_pipeline_command(args) -> None:
    import tempfile

    from pipelines import client as kfp_client
    from pipelines import parameters
    from pipelines.pipeline import compile_pipeline, run_local

    if args.action == "compile":
        settings = _cluster_settings(args)
        out = Path(args.output)
        if out.suffix not in (".yaml", ".yml"):
            raise UserError(f"--output {args.output}: expected a .yaml file name")
        tmp_out = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
        try:  # atomic: a bad --param or a failed compile leaves no YAML, and an old one stays whole
            compile_pipeline(tmp_out, settings, name=args.pipeline)
            if args.param:  # validate against the compiled signature, then bake the defaults in
                params = kfp_client.parse_params(args.param, tmp_out)
                compile_pipeline(tmp_out, settings, parameters=params, name=args.pipeline)
            os.replace(tmp_out, out)
        finally:
            tmp_out.unlink(missing_ok=True)
        sys.stdout.write(f"{args.output}\n")
        return
    if args.action == "run":
        with tempfile.TemporaryDirectory() as tmp:
            params = kfp_client.parse_params(args.param, compile_pipeline(Path(tmp) / "p.yaml", name=args.pipeline))
        defaults = parameters.local_defaults(args.pipeline)
        run_dir = run_local(args.root, {**defaults, **params}, name=args.pipeline, verbose=args.verbose,
                            quiet=args.quiet)
        sys.stdout.write(f"{run_dir}\n")
        if not args.quiet:
            from pipelines.local_output import where_to_look

            sys.stderr.write(where_to_look([run_dir], run_dir / "logs", run_dir.parent / "mlflow.db") + "\n")
        return
    if args.action == "schedule":
        kfp_client.validate_cron(args.cron)  # before compiling or any network call
    with tempfile.TemporaryDirectory() as tmp:
        package = _package(args, tmp)
        params = kfp_client.parse_params(getattr(args, "param", []), package)
        client = kfp_client.connect(args.host, token=args.token, namespace=args.namespace)
        if args.action == "upload":
            from datadream.tracking import git_sha

            version = kfp_client.version_name(__version__, git_sha(Path(__file__).parent))
            ids = kfp_client.upload(client, package, args.name or args.pipeline, version)
            sys.stdout.write(f"pipeline {ids[0]} version {ids[1]} ({version})\n")
        elif args.action == "submit":
            run_id = kfp_client.submit(client, package, params, args.experiment, args.run_name)
            sys.stdout.write(f"run {run_id}\n")
        elif args.action == "schedule":
            rr = kfp_client.schedule(client, package, args.cron, params, args.experiment, args.name)
            sys.stdout.write(f"recurring run {rr}\n")


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams (tests, notebooks)
        return False


def _setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # force: main() may run many times in one process (tests, notebooks); log to the current stderr.
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    root = logging.getLogger()
    root.removeFilter(_warnings_only)
    if args.quiet or not _isatty(sys.stderr):
        os.environ["TQDM_DISABLE"] = "1"  # progress bars only for a person at a terminal, never with -q
    if args.quiet:
        # kfp.local re-points the root logger at INFO while it runs; a logger filter survives that. The
        # handler's filter also stops records of a logger someone set to INFO itself (they skip the root's).
        root.addFilter(_warnings_only)
        for handler in root.handlers:
            handler.addFilter(_warnings_only)
    # The libraries' own chatter would drown ours; keep their warnings (and kfp.local's task log unless -q).
    # Setting a logger's level imports nothing: diffusers and transformers load only in the stages that
    # use them (datadream.models.sd turns their loading bars off then).
    for name in ("diffusers", "transformers", *(("kfp",) if args.quiet else ())):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_command(args) -> None:
    cmd = args.command
    if cmd == "demo-dataset":
        from datadream.data.demo import make_demo_dataset

        path = make_demo_dataset(args.out, seed=args.seed)
        log.info("demo dataset -> %s", path)
        return
    if cmd == "demo":
        from datadream import storage
        from datadream.demo import format_table, run_demo

        with storage.output_dir(args.out, marker="results.json") as out:
            if args.in_process:
                results = run_demo(_load(args), out, dataset=args.dataset)
            else:
                from pipelines.local_demo import run_demo as run_pipeline_demo

                results = run_pipeline_demo(_load(args), out, args.preset, args.config, args.overrides,
                                            dataset=args.dataset, verbose=args.verbose, quiet=args.quiet)
        if storage.is_s3(args.out):
            results["published"] = str(args.out)
        sys.stdout.write(format_table(results) + "\n")
        if not args.quiet and "runs" in results and not storage.is_s3(args.out):
            from pipelines.local_output import where_to_look

            out = Path(results["out"])
            sys.stdout.write(where_to_look([Path(r) for r in results["runs"]], out / "logs",
                                           out / "runs" / "mlflow.db") + "\n")
        return
    if cmd == "pipeline":
        run_pipeline_command(args)
        return
    if cmd == "registry":
        from datadream import registry_cli

        registry_cli.run(args)
        return
    if cmd == "tune":
        from datadream import tune_cli

        tune_cli.run(args, _load)
        return
    # Every folder argument may be s3://bucket/prefix: inputs are mirrored into the cache (ETag-checked),
    # outputs are built in a local staging folder and published with their marker file last.
    from datadream import steps, storage

    if cmd == "fewshot":
        extra = [f"fewshot.shots={args.shots}"] if args.shots is not None else []
        extra += [f"fewshot.seed={args.seed}"] if args.seed is not None else []
        extra += [f"data.format={args.dataset_format}"] if args.dataset_format is not None else []
        with storage.output_dir(args.out, marker=artifacts.FEWSHOT_MARKER) as out:
            steps.fewshot(_load(args, extra), args.dataset, out, steps.Tracking())
    elif cmd == "adapt":
        config = _load(args, [f"adapt.mode={args.mode}"] if args.mode else [])
        with storage.output_dir(args.out, marker=artifacts.ADAPTERS_MARKER) as out:
            steps.adapt(config, storage.localize(args.fewshot), out, args.shard, steps.Tracking())
    elif cmd == "generate":
        with storage.output_dir(args.out, marker=artifacts.SYNTHETIC_MARKER) as out:
            steps.generate(_load(args), storage.localize(args.fewshot), storage.localize(args.adapters), out,
                           args.shard, steps.Tracking())
    elif cmd == "classify":
        config = _load(args, [f"classify.train_on={args.train_on}"] if args.train_on else [])
        synthetic = storage.localize(args.synthetic) if args.synthetic else None
        with storage.output_dir(args.out, marker=artifacts.CLASSIFIER_MARKER) as out:
            steps.classify(config, storage.localize(args.fewshot), synthetic, out, steps.Tracking())
    elif cmd == "evaluate":
        import json

        with storage.output_dir(args.out, marker=artifacts.METRICS_MARKER) as out:
            metrics = steps.evaluate(_load(args), storage.localize(args.classifier), storage.localize(args.fewshot),
                                     out, args.split, steps.Tracking(), name=f"evaluate {args.split}").meta
        sys.stdout.write(json.dumps({k: metrics[k] for k in ("top1", "top5", "n")}) + "\n")
    log.info("%s: done -> %s", cmd, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        run_command(args)
    except UserError as e:
        sys.stderr.write(f"datadream {args.command}: error: {e}\n")
        return 2
    except InfraError as e:
        sys.stderr.write(f"datadream {args.command}: error: {e}\n")
        return 1
    except OSError as e:  # no space, read-only, no permission: the user must act, so no retry and no traceback
        from datadream.io import oserror_message

        message = oserror_message(e, getattr(args, "out", None))
        if message is None:  # anything else may be transient: a traceback and exit 1, which may be retried
            raise
        sys.stderr.write(f"datadream {args.command}: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
