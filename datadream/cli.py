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

from datadream import __version__
from datadream.errors import UserError

log = logging.getLogger("datadream")


def _config_args(p: argparse.ArgumentParser, default_preset: str = "paper") -> None:
    g = p.add_argument_group("configuration (applied in this order)")
    g.add_argument("--preset", default=default_preset, choices=("paper", "tiny"),
                   help=f"base settings: paper (REFERENCE.md) or tiny (CPU, seconds); default {default_preset}")
    g.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file layered on the preset")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override one setting, e.g. --set adapt.rank=8")


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
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="make the demo dataset and run every stage on the tiny preset, both modes")
    p.add_argument("--out", default="demo-run", help="folder for the dataset and all artifacts (default demo-run)")
    _config_args(p, default_preset="tiny")

    p = sub.add_parser("demo-dataset", help="write the procedural demo dataset (ImageFolder with splits)")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")

    p = sub.add_parser("fewshot", help="sample k real images per class; write train/val/test manifests")
    p.add_argument("--dataset", required=True, help="ImageFolder root: DIR/<class>/<img> or DIR/{train,val,test}/…")
    p.add_argument("--shots", type=int, help="images per class (fewshot.shots)")
    p.add_argument("--seed", type=int, help="sampling seed (fewshot.seed)")
    p.add_argument("--out", required=True, help="output folder (a FewShotSet)")
    _config_args(p)

    p = sub.add_parser("adapt", help="LoRA fine-tuning of Stable Diffusion on the few-shot images")
    p.add_argument("--fewshot", required=True, help="a fewshot output folder")
    p.add_argument("--mode", choices=("class", "dataset"), help="adapt.mode: one adapter per class or one for all")
    p.add_argument("--shard", help="only classes I, I+N, … of shard I/N (class-wise fan-out)")
    p.add_argument("--out", required=True, help="output folder (Adapters)")
    _config_args(p)

    p = sub.add_parser("generate", help="generate synthetic images per class with the adapters")
    p.add_argument("--fewshot", required=True, help="a fewshot output folder (classes)")
    p.add_argument("--adapters", required=True, help="an adapt output folder")
    p.add_argument("--shard", help="only classes I, I+N, … of shard I/N")
    p.add_argument("--out", required=True, help="output folder (SyntheticSet)")
    _config_args(p)

    p = sub.add_parser("classify", help="train the CLIP LoRA classifier (epoch chosen on val)")
    p.add_argument("--fewshot", required=True, help="a fewshot output folder (real shots, val split)")
    p.add_argument("--synthetic", help="a generate output folder (needed unless --train-on real)")
    p.add_argument("--train-on", choices=("synthetic", "synthetic+real", "real"), help="classify.train_on")
    p.add_argument("--out", required=True, help="output folder (Classifier)")
    _config_args(p)

    p = sub.add_parser("evaluate", help="top-1/top-5, per-class accuracy and confusion matrix on a split")
    p.add_argument("--fewshot", required=True, help="a fewshot output folder")
    p.add_argument("--classifier", required=True, help="a classify output folder")
    p.add_argument("--split", default="test", choices=("test", "val"), help="which split (default test)")
    p.add_argument("--out", required=True, help="output folder (metrics.json, confusion.csv)")
    _config_args(p)
    return parser


def _setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    # The libraries' own per-call progress bars would drown ours; keep their warnings.
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def run_command(args) -> None:
    cmd = args.command
    if cmd == "demo-dataset":
        from datadream.data.demo import make_demo_dataset

        path = make_demo_dataset(args.out, seed=args.seed)
        log.info("demo dataset -> %s", path)
        return
    if cmd == "demo":
        from datadream.demo import format_table, run_demo

        results = run_demo(_load(args), args.out)
        sys.stdout.write(format_table(results) + "\n")
        return
    if cmd == "fewshot":
        from datadream.stages import fewshot

        extra = [f"fewshot.shots={args.shots}"] if args.shots is not None else []
        extra += [f"fewshot.seed={args.seed}"] if args.seed is not None else []
        fewshot.run(_load(args, extra), args.dataset, args.out)
    elif cmd == "adapt":
        from datadream.stages import adapt

        adapt.run(_load(args, [f"adapt.mode={args.mode}"] if args.mode else []), args.fewshot, args.out, args.shard)
    elif cmd == "generate":
        from datadream.stages import generate

        generate.run(_load(args), args.fewshot, args.adapters, args.out, args.shard)
    elif cmd == "classify":
        from datadream.stages import classify

        config = _load(args, [f"classify.train_on={args.train_on}"] if args.train_on else [])
        classify.run(config, args.fewshot, args.synthetic, args.out)
    elif cmd == "evaluate":
        import json
        from pathlib import Path

        from datadream.stages import evaluate

        metrics = evaluate.run(_load(args), args.classifier, Path(args.fewshot) / f"{args.split}.jsonl", args.out)
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
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
