"""Wall time of the tiny demo under kfp.local (SubprocessRunner) vs the same stages in-process.

Three paths run the same work: the demo dataset, fewshot, both adaptation modes, generation and the
six classifiers of `datadream demo`, on the tiny preset:
- in-process: `datadream demo --in-process`, every stage in this one process;
- kfp.local, warm: `datadream demo`, each task a process forked from a helper that has imported the
  libraries already (pipelines/warm_start.py);
- kfp.local, cold: each task a fresh interpreter that imports torch, mlflow, open_clip, diffusers …
  itself, as kfp.local starts it on its own.
The ratios to in-process are the orchestration overhead on this machine.

    .venv/bin/python benchmarks/pipeline_overhead.py            # table on stdout, JSON in benchmarks/results/
    .venv/bin/python benchmarks/pipeline_overhead.py --skip-cold   # about 4 minutes less on 2 cores
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
    parser.add_argument("--skip-cold", action="store_true", help="leave out the cold kfp.local run")
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
        walls = {"in-process": time.perf_counter() - t}
        log.info("in-process: %.1f s", walls["in-process"])
        local = {}
        for name, warm in (("kfp.local, warm", True), ("kfp.local, cold", False)):
            if not warm and args.skip_cold:
                continue
            t = time.perf_counter()
            local[name] = under_kfp(config, Path(tmp) / name.replace(", ", "-").replace(".", "-"), "tiny", [],
                                    args.overrides, warm=warm)
            walls[name] = time.perf_counter() - t
            log.info("%s: %.1f s", name, walls[name])
        tasks = _task_count(local["kfp.local, warm"])

    top1 = [r["top1"] for r in direct["rows"]]
    same = all([r["top1"] for r in res["rows"]] == top1 for res in local.values())
    result = {
        "wall_s": {k: round(v, 1) for k, v in walls.items()},
        "ratio_to_in_process": {k: round(v / walls["in-process"], 2) for k, v in walls.items()},
        "same_top1": same, "tasks": tasks,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "overrides": args.overrides, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'path':<18} {'wall s':>8} {'× in-process':>13}")
    for name, wall in walls.items():
        print(f"{name:<18} {wall:>8.1f} {result['ratio_to_in_process'][name]:>12.2f}x")
    if "kfp.local, cold" in walls:
        print(f"warm start saves {walls['kfp.local, cold'] / walls['kfp.local, warm']:.2f}x over {tasks} tasks")
    print(f"same top-1 on every path: {same}; load average at the end {result['load_average']}; JSON: {args.json}")
    return 0


def _task_count(results: dict) -> int:
    return sum(1 for run in results["runs"] for _ in Path(run).glob("**/executor_output.json"))


if __name__ == "__main__":
    raise SystemExit(main())
