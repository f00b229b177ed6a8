"""`datadream demo`: the whole method on the procedural demo dataset, both adaptation modes.

Runs fewshot -> {zero-shot, real-only} classifiers, and for each mode (class-wise, dataset-wise)
adapt -> generate -> {synthetic-only, synthetic+real} classifiers, evaluating each on the test split.
Every stage runs as its step (datadream.steps), so a re-run of a finished demo is a sequence of no-ops,
and with $MLFLOW_TRACKING_URI set every step logs its run as it does in the pipeline.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from datadream.config import Config
from datadream.io import atomic_write_json

log = logging.getLogger(__name__)


def run_demo(config: Config, out: str | Path, dataset: str | None = None) -> dict:
    from datadream import steps
    from datadream.data.demo import make_demo_dataset

    out = Path(out)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    tracking = steps.Tracking()  # each step's own MLflow run when $MLFLOW_TRACKING_URI is set

    def timed(what, fn, *a, **kw):
        t = time.perf_counter()
        result = fn(*a, **kw)
        timings[what] = round(time.perf_counter() - t, 2)
        return result

    if dataset is None:  # else an ImageFolder, local or s3:// (fewshot mirrors it)
        dataset = timed("dataset", make_demo_dataset, out / "dataset", config.run.seed)
    fs = timed("fewshot", steps.fewshot, config, dataset, out / "fewshot", tracking)
    rows = []

    def train_and_eval(label: str, cfg: Config, synthetic: Path | None, name: str) -> None:
        clf = timed(f"classify {name}", steps.classify, cfg, fs.path, synthetic, out / "classifiers" / name,
                    tracking, name=f"classify {name}")
        metrics = timed(f"evaluate {name}", steps.evaluate, cfg, clf.path, fs.path, out / "metrics" / name,
                        tracking=tracking, name=f"evaluate {name}")
        rows.append({"setting": label, "top1": metrics.meta["top1"], "top5": metrics.meta["top5"],
                     "n": metrics.meta["n"], "classifier": str(clf), "metrics": str(metrics.marker)})

    def with_(**sections) -> Config:
        return config.model_copy(update={k: getattr(config, k).model_copy(update=v) for k, v in sections.items()})

    train_and_eval("zero-shot", steps.classify_config(config, "zero-shot"), None, "zero-shot")
    train_and_eval("real only", steps.classify_config(config, "real"), None, "real")
    for mode in ("class", "dataset"):
        cfg = with_(adapt={"mode": mode})
        adapters = timed(f"adapt {mode}", steps.adapt, cfg, fs.path, out / f"adapters-{mode}", tracking=tracking)
        synthetic = timed(f"generate {mode}", steps.generate, cfg, fs.path, adapters.path, out / f"synthetic-{mode}",
                          tracking=tracking)
        for train_on in ("synthetic", "synthetic+real"):
            name = f"{train_on.replace('+', '-')}-{mode}"
            train_and_eval(f"{train_on} ({mode}-wise)", steps.classify_config(cfg, train_on), synthetic.path, name)

    report = timed("report", write_demo_report, out, fs.path, rows)
    results = {"out": str(out), "rows": rows, "report": str(report), "timings_s": timings,
               "wall_s": round(time.perf_counter() - t0, 1), "config": config.to_dict()}
    atomic_write_json(out / "results.json", results)
    log.info("demo finished in %.1f s; results in %s", results["wall_s"], out / "results.json")
    return results


def write_demo_report(out: Path, fewshot_dir: Path, rows: list[dict]) -> Path:
    """`out`/report.html: every classifier of the demo side by side, with the class-wise samples."""
    from datadream.artifacts import Classifier
    from datadream.io import read_json
    from datadream.report import render_html, run_facts, write_report

    results = [{"setting": r["setting"], "metrics": read_json(r["metrics"]),
                "classifier": Classifier.open(r["classifier"]).meta} for r in rows]
    facts = run_facts(fewshot_dir, mode="class-wise and dataset-wise (both, one row each)",
                      gate="none: the in-process demo registers nothing")
    path = out / "report.html"
    write_report(path, render_html("DataDream demo (in-process)", results, synthetic_dir=out / "synthetic-class",
                                   fewshot_dir=fewshot_dir, run=facts))
    return path


def format_table(results: dict) -> str:
    where = results.get("published") or results["out"]  # an s3:// --out: where the run was published
    lines = [
        f"DataDream demo — tiny models on CPU; artifacts under {where}",
        "",
        f"{'training data':<32} {'top-1':>7} {'top-5':>7}  test images",
        f"{'-' * 32} {'-' * 7} {'-' * 7}  {'-' * 11}",
    ]
    for r in results["rows"]:
        lines.append(f"{r['setting']:<32} {100 * r['top1']:>6.1f}% {100 * r['top5']:>6.1f}%  {r['n']}")
    lines += ["", f"wall time {results['wall_s']} s; paths, reports and timings in {where}/results.json"]
    return "\n".join(lines)
