"""Wall time of the tiny demo under kfp.local (SubprocessRunner) vs the same stages in-process.

Both paths run the same work: the demo dataset, fewshot, both adaptation modes, generation and the
six classifiers of `datadream demo`, on the tiny preset. The ratio is the orchestration overhead on
this machine: one Python process per step (interpreter, torch and model imports, artifact copies).

    .venv/bin/python benchmarks/pipeline_overhead.py            # table on stdout, JSON in benchmarks/results/
"""

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("benchmarks.pipeline_overhead")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE",
                        help="override a tiny-preset setting in both runs")
    parser.add_argument("--json", default=str(RESULTS / "pipeline-overhead.json"), help="where to write the figures")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    from datadream.config import load_config
    from datadream.demo import run_demo as in_process
    from pipelines.local_demo import run_demo as under_kfp

    config = load_config("tiny", overrides=args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        # Build the tiny models once, outside both timings.
        from datadream.models.clip import load_clip
        from datadream.models.sd import resolve_sd

        resolve_sd(config.models)
        load_clip(config.models)

        t = time.perf_counter()
        direct = in_process(config, Path(tmp) / "in-process")
        t_direct = time.perf_counter() - t
        log.info("in-process: %.1f s", t_direct)
        t = time.perf_counter()
        local = under_kfp(config, Path(tmp) / "kfp-local", "tiny", [], args.overrides)
        t_local = time.perf_counter() - t
        log.info("kfp.local: %.1f s", t_local)
        tasks = _task_count(local)

    same = [r["top1"] for r in direct["rows"]] == [r["top1"] for r in local["rows"]]
    result = {
        "in_process_s": round(t_direct, 1), "kfp_local_s": round(t_local, 1),
        "ratio": round(t_local / t_direct, 2), "same_top1": same, "tasks": tasks,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "overrides": args.overrides, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'path':<12} {'wall s':>8}")
    print(f"{'in-process':<12} {t_direct:>8.1f}")
    print(f"{'kfp.local':<12} {t_local:>8.1f}")
    print(f"ratio kfp.local / in-process: {result['ratio']}x over {result['tasks']} tasks; "
          f"same top-1 in both: {same}; JSON: {args.json}")
    return 0


def _task_count(results: dict) -> int:
    return sum(1 for run in results["runs"] for _ in Path(run).glob("**/executor_output.json"))


if __name__ == "__main__":
    raise SystemExit(main())
