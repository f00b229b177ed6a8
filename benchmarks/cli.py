"""How long the `datadream` command takes to answer `--help` and a usage error, as a user runs it.

Each row starts a fresh `python -m datadream.cli …` process (what the `datadream` script does) several
times and reports the median wall time. Beside them, in the same run: a bare interpreter (the floor)
and `import datadream.registry` (mlflow: what every command used to import before parsing its
arguments), so the ratio says what the lazy imports save on this machine.

    .venv/bin/python benchmarks/cli.py              # table on stdout, JSON in benchmarks/results/cli.json
    .venv/bin/python benchmarks/cli.py --repeat 9
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

# (row, argv after `python`, target seconds or None, expected exit code)
ROWS = [
    ("python -c pass (floor)", ["-c", "pass"], None, 0),
    ("import datadream.registry (mlflow)", ["-c", "import datadream.registry"], None, 0),
    ("datadream --help", ["-m", "datadream.cli", "--help"], 1.0, 0),
    ("datadream fewshot --help", ["-m", "datadream.cli", "fewshot", "--help"], 1.0, 0),
    ("datadream registry list --help", ["-m", "datadream.cli", "registry", "list", "--help"], 1.0, 0),
    ("datadream pipeline submit --help", ["-m", "datadream.cli", "pipeline", "submit", "--help"], 1.0, 0),
    ("usage error: datadream fewshot", ["-m", "datadream.cli", "fewshot"], 1.5, 2),
    ("usage error: --shots 0", ["-m", "datadream.cli", "fewshot", "--dataset", "d", "--out", "o", "--shots", "0"],
     1.5, 2),
    ("usage error: registry list (no NAME)", ["-m", "datadream.cli", "registry", "list"], 1.5, 2),
]


def time_command(argv: list[str], expect: int, repeat: int) -> float:
    times = []
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for _ in range(repeat):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, *argv], capture_output=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - t)
        if r.returncode != expect:
            raise SystemExit(f"{argv}: exit {r.returncode}, expected {expect}:\n{r.stderr.decode()[-2000:]}")
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs per row; the median is reported (default 5)")
    parser.add_argument("--json", default=str(RESULTS / "cli.json"), help="where to write the figures")
    args = parser.parse_args(argv)

    time_command(["-c", "import datadream.registry"], 0, 1)  # warm the page cache and .pyc files
    rows = []
    for name, cmd, target, expect in ROWS:
        rows.append({"row": name, "median_s": round(time_command(cmd, expect, args.repeat), 3), "target_s": target})
    by_name = {r["row"]: r["median_s"] for r in rows}
    heavy = by_name["import datadream.registry (mlflow)"]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    print(f"{'command':<40} {'median s':>9} {'target s':>9} {'vs mlflow import':>17}")
    for r in rows:
        target = f"{r['target_s']:.1f}" if r["target_s"] else "-"
        ok = "" if r["target_s"] is None else ("  ok" if r["median_s"] <= r["target_s"] else "  OVER")
        print(f"{r['row']:<40} {r['median_s']:>9.3f} {target:>9} {r['median_s'] / heavy:>16.2f}x{ok}")
    print(f"machine: {machine}; median of {args.repeat} runs each; JSON: {args.json}")
    result = {"rows": rows, "repeat": args.repeat, "machine": machine,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
