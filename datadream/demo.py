"""`datadream demo`: the whole method on the procedural demo dataset, both adaptation modes.

Runs fewshot -> {zero-shot, real-only} classifiers, and for each mode (class-wise, dataset-wise)
adapt -> generate -> {synthetic-only, synthetic+real} classifiers, evaluating each on the test split.
Every stage is the library's own `run`, so a re-run of a finished demo is a sequence of no-ops.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from datadream.config import Config
from datadream.io import atomic_write_json

log = logging.getLogger(__name__)


def run_demo(config: Config, out: str | Path, dataset: str | None = None) -> dict:
    from datadream.data.demo import make_demo_dataset
    from datadream.stages import adapt, classify, evaluate, fewshot, generate

    out = Path(out)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name, fn, *a):
        t = time.perf_counter()
        result = fn(*a)
        timings[name] = round(time.perf_counter() - t, 2)
        return result

    if dataset is None:  # else an ImageFolder, local or s3:// (fewshot mirrors it)
        dataset = timed("dataset", make_demo_dataset, out / "dataset", config.run.seed)
    fs = timed("fewshot", fewshot.run, config, dataset, out / "fewshot")
    test = fs / "test.jsonl"
    rows = []

    def train_and_eval(label: str, cfg: Config, synthetic: Path | None, name: str) -> None:
        clf = timed(f"classify {name}", classify.run, cfg, fs, synthetic, out / "classifiers" / name)
        metrics = timed(f"evaluate {name}", evaluate.run, cfg, clf, test, out / "metrics" / name)
        rows.append({"setting": label, "top1": metrics["top1"], "top5": metrics["top5"], "n": metrics["n"],
                     "classifier": str(clf), "metrics": str(out / "metrics" / name / "metrics.json")})

    def with_(**sections) -> Config:
        return config.model_copy(update={k: getattr(config, k).model_copy(update=v) for k, v in sections.items()})

    train_and_eval("zero-shot", with_(classify={"epochs": 0, "train_on": "real"}), None, "zero-shot")
    train_and_eval("real only", with_(classify={"train_on": "real"}), None, "real")
    for mode in ("class", "dataset"):
        cfg = with_(adapt={"mode": mode})
        adapters = timed(f"adapt {mode}", adapt.run, cfg, fs, out / f"adapters-{mode}")
        synthetic = timed(f"generate {mode}", generate.run, cfg, fs, adapters, out / f"synthetic-{mode}")
        for train_on in ("synthetic", "synthetic+real"):
            name = f"{train_on.replace('+', '-')}-{mode}"
            train_and_eval(f"{train_on} ({mode}-wise)", with_(adapt={"mode": mode}, classify={"train_on": train_on}),
                           synthetic, name)

    report = timed("report", write_demo_report, out, fs, rows)
    results = {"out": str(out), "rows": rows, "report": str(report), "timings_s": timings,
               "wall_s": round(time.perf_counter() - t0, 1), "config": config.to_dict()}
    atomic_write_json(out / "results.json", results)
    log.info("demo finished in %.1f s; results in %s", results["wall_s"], out / "results.json")
    return results


def write_demo_report(out: Path, fewshot_dir: Path, rows: list[dict]) -> Path:
    """`out`/report.html: every classifier of the demo side by side, with the class-wise samples."""
    from datadream.io import read_json
    from datadream.report import render_html, run_facts, write_report

    results = [{"setting": r["setting"], "metrics": read_json(r["metrics"]),
                "classifier": read_json(Path(r["classifier"]) / "classifier.json")} for r in rows]
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
