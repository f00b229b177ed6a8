"""Search throughput: trials per hour of `datadream tune run` on the tiny preset, 1 worker vs N workers.

Each run is a fresh campaign (its own SQLite study and work folder; the wall time includes making the
demo dataset and few-shot set, a second or two) that runs until the study holds --trials finished
trials; trials/hour counts the trials that actually finished (workers may overshoot the target by one
each). No MLflow, so the figure is the search itself. One run per setting: the ratio is indicative.

    .venv/bin/python benchmarks/tune.py [--trials 6] [--workers 2]     # table on stdout, JSON in benchmarks/results/
"""

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("benchmarks.tune")


def campaign(root: Path, trials: int, workers: int) -> dict:
    import optuna

    storage = f"sqlite:///{root / 'tune.db'}"
    base = [sys.executable, "-m", "datadream.cli", "-q", "tune", "run", "--study", "bench", "--storage", storage,
            "--experiment", "", "--work", str(root / "work")]
    t0 = time.perf_counter()
    subprocess.run([*base, "--trials", str(trials), "--workers", str(workers)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name="bench", storage=storage)
    done = sum(t.state.is_finished() and t.state.name != "FAIL" for t in study.trials)
    return {"workers": workers, "trials_finished": done, "wall_s": round(wall, 1),
            "trials_per_hour": round(done / wall * 3600, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6, help="finished trials per campaign (default 6)")
    parser.add_argument("--workers", type=int, default=2, help="workers of the parallel campaign (default 2)")
    parser.add_argument("--json", default=str(RESULTS / "tune.json"), help="where to write the figures")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, args.workers):
            log.info("campaign: %d trial(s), %d worker(s)", args.trials, workers)
            rows.append(campaign(Path(tmp) / f"w{workers}", args.trials, workers))
    ratio = rows[1]["trials_per_hour"] / rows[0]["trials_per_hour"]
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "preset": "tiny", "rows": rows, "speedup": round(ratio, 2)}
    sys.stdout.write("workers  trials  wall s  trials/hour\n")
    for r in rows:
        sys.stdout.write(f"{r['workers']:>7}  {r['trials_finished']:>6}  {r['wall_s']:>6}  "
                         f"{r['trials_per_hour']:>11}\n")
    sys.stdout.write(f"{args.workers} workers vs 1: {ratio:.2f}× trials/hour on {result['machine']}\n")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
