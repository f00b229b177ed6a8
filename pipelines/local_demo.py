"""`datadream demo` through the pipeline: the same DAG the cluster runs, under kfp.local.

Two local runs on the procedural demo dataset — class-wise with the zero-shot and real-only
baselines plus synthetic and synthetic+real classifiers, then dataset-wise with the two synthetic
ones — and the results table of `datadream.demo`, read from the evaluate steps' outputs.
"""

import logging
import time
from pathlib import Path

import yaml

from datadream.artifacts import Metrics
from datadream.config import Config, layered_overrides
from datadream.io import atomic_write_json
from pipelines import parameters

log = logging.getLogger(__name__)

ORDER = ["zero-shot", "real", "synthetic (class-wise)", "synthetic+real (class-wise)",
         "synthetic (dataset-wise)", "synthetic+real (dataset-wise)"]
LABELS = {"real": "real only"}


def pipeline_arguments(config: Config, preset: str, overrides_yaml: str, dataset: str, mode: str,
                       train_on: list[str]) -> dict:
    """The pipeline parameters that reproduce `config` (the rest travels in the config YAML)."""
    return {**parameters.from_config(config), "dataset": dataset, "mode": mode, "train_on": train_on, "gpus": 1,
            "preset": preset, "config": overrides_yaml}


def overrides_to_yaml(files: list[str], overrides: list[str]) -> str:
    """--config files and --set overrides as one YAML text, the pipeline's `config` parameter."""
    data = layered_overrides(files, overrides)
    return yaml.safe_dump(data, sort_keys=True) if data else ""


def run_demo(config: Config, out: str | Path, preset: str, files: list[str], overrides: list[str],
             dataset: str | None = None, verbose: bool = False, quiet: bool = False, warm: bool = True) -> dict:
    """Both runs; each task's output in `out`/logs/<mode>-wise/<task>.log, a line per task on stderr.
    `warm`: tasks forked from one warm helper for both runs (pipelines/warm_start.py); False starts
    every task as a fresh interpreter, as kfp.local does by itself."""
    from datadream.data.demo import make_demo_dataset
    from pipelines.pipeline import run_local
    from pipelines.warm_start import WarmStarter

    out = Path(out).resolve()
    t0 = time.perf_counter()
    if dataset is None:  # else an ImageFolder, local or s3:// (the fewshot step mirrors it)
        dataset = make_demo_dataset(out / "dataset", seed=config.run.seed)
    text = overrides_to_yaml(files, overrides)
    runs = []
    with WarmStarter(out / "logs" / "warm-start.log") as starter:  # one warm helper for both runs' tasks
        for mode, train_on in (("class", ["zero-shot", "real", "synthetic", "synthetic+real"]),
                               ("dataset", ["synthetic", "synthetic+real"])):
            args = pipeline_arguments(config, preset, text, str(dataset), mode, train_on)
            runs.append(run_local(out / "runs", args, verbose=verbose, quiet=quiet, label=f"{mode}-wise",
                                  logs_dir=out / "logs" / f"{mode}-wise", warm=starter if warm else False))
            log.debug("demo: %s-wise run finished -> %s", mode, runs[-1])

    rows = []
    for run in runs:
        for scores in sorted(run.glob("**/evaluate*/scores")):  # "evaluate-2" in the second branch
            result = Metrics.open(scores)
            setting, metrics = result.setting(), result.meta
            rows.append({"setting": LABELS.get(setting["label"], setting["label"]), "key": setting["label"],
                         "top1": metrics["top1"], "top5": metrics["top5"], "n": metrics["n"],
                         "metrics": str(result.marker),
                         "classifier": str(next(scores.parent.parent.glob("classify*/classifier")))})
    rows.sort(key=lambda r: ORDER.index(r.pop("key")))
    results = {"out": str(out), "rows": rows, "runs": [str(r) for r in runs],
               "reports": [str(r / "report.html") for r in runs if (r / "report.html").is_file()],
               "wall_s": round(time.perf_counter() - t0, 1),
               "engine": "kfp.local SubprocessRunner" + (", tasks forked from a warm helper" if warm else "")}
    atomic_write_json(out / "results.json", results)
    return results

