"""The classifier server's cold start and latency per image on CPU, run with the serving pod's command line.

For each model — `tiny` (CI size) and `vitb16` (the paper's ViT-B/16 architecture at random init, base
weights shipped with the model as in production) — the script trains a classifier for one epoch on the
demo dataset's real shots, registers it in a SQLite registry under a temporary folder, renders the
serving Deployment (`datadream registry deploy --dry-run`'s), and runs its container's command line here
(datadream.serving.local: only the bind address, port and scratch folder differ). Figures:

    cold start     seconds from starting the process to /ping answering 200: imports, the model's
                   download from the registry and its load (what a new pod spends before it is ready)
    ms/img b1      one image per POST /invocations, median of the repeats, after one warm-up request
    ms/img b32     32 images per request, median per image

Requests carry demo-dataset test images drawn at 256 px (PNG; the server decodes and resizes them to the
model's input), base64-encoded as a client sends them.

    .venv/bin/python benchmarks/serving.py                  # tiny and vitb16 (ViT-B/16 takes minutes on 2 cores)
    .venv/bin/python benchmarks/serving.py --models tiny    # CI size only, about a minute

Table on stdout, logs on stderr, JSON in benchmarks/results/serving.json unless --json says otherwise.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from stages import device_info  # benchmarks/stages.py

log = logging.getLogger("benchmarks.serving")

RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"
MODELS = {
    "tiny": {"overrides": [], "repeats": 20},
    "vitb16": {"overrides": ["models.clip=ViT-B-16", "models.clip_pretrained=null"], "repeats": 3},
}
BATCHES = (1, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_classifier(model: str, work: Path) -> Path:
    """One epoch of the classify stage on the demo dataset's real shots (the weights do not matter here)."""
    import torch

    from datadream.config import load_config
    from datadream.data.demo import make_demo_dataset
    from datadream.stages import classify, fewshot

    overrides = [*MODELS[model]["overrides"], "classify.train_on=real", "classify.epochs=1", "classify.batch_size=8",
                 "fewshot.shots=2"]
    config = load_config("tiny", overrides=overrides)
    dataset = make_demo_dataset(work / "demo", seed=0)
    shots = fewshot.run(config, dataset, work / "fewshot")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = classify.run(config, shots, None, work / f"classifier-{model}")
    log.info("%s: classifier trained in %.1f s", model, time.perf_counter() - t0)
    return out


def register(model: str, classifier: Path, tracking: str, work: Path) -> str:
    import mlflow

    from datadream import registry

    mlflow.set_tracking_uri(tracking)
    # The model's files go under the temporary folder, never into ./mlruns.
    name = f"bench-{model}"
    experiment = mlflow.get_experiment_by_name(name) or mlflow.get_experiment(
        mlflow.create_experiment(name, artifact_location=(work / "artifacts").as_uri()))
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    t0 = time.perf_counter()
    version = registry.register_classifier(f"bench-{model}", classifier, {}, {})
    registry.promote(f"bench-{model}", version)
    log.info("%s: registered as version %s in %.1f s", model, version, time.perf_counter() - t0)
    return version


def post(base: str, images: list[str]) -> tuple[float, list[dict]]:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[x] for x in images]}}).encode()
    request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as r:
        predictions = json.loads(r.read())["predictions"]
    return time.perf_counter() - t0, predictions


def measure(model: str, work: Path, tracking: str, images: list[str]) -> dict:
    import yaml

    from datadream.serving import deploy, local
    from datadream.serving.manifests import ServingSettings

    version = register(model, build_classifier(model, work), tracking, work)
    rendered = deploy.deploy(f"bench-{model}", tracking_uri=tracking, dry_run=True,
                             settings=ServingSettings(image="benchmark"))
    deployment = next(yaml.safe_load_all(rendered))
    port = free_port()
    argv, env = local.pod_process(deployment, port=port, scratch=work / f"pod-{model}",
                                  values={"MLFLOW_TRACKING_URI": tracking})
    server_log = work / f"server-{model}.log"
    t0 = time.monotonic()
    proc = local.start(argv, env, server_log)
    try:
        local.wait_ready(f"http://127.0.0.1:{port}/ping", proc, server_log, timeout_s=900)
        cold = time.monotonic() - t0
        log.info("%s: cold start %.1f s", model, cold)
        base = f"http://127.0.0.1:{port}"
        result = {"model": model, "version": version, "cold_start_s": round(cold, 2), "command": argv[1:]}
        for batch in BATCHES:
            chunk = (images * (batch // len(images) + 1))[:batch]
            _, predictions = post(base, chunk)  # warm-up
            assert len(predictions) == batch and predictions[0]["model_version"] == version, predictions[0]
            seconds = [post(base, chunk)[0] for _ in range(MODELS[model]["repeats"])]
            per_image = statistics.median(seconds) / batch * 1000
            result[f"ms_per_image_b{batch}"] = round(per_image, 2)
            result[f"request_s_b{batch}"] = [round(s, 4) for s in seconds]
            log.info("%s: batch %d: %.1f ms/img (median of %d)", model, batch, per_image, len(seconds))
        return result
    finally:
        local.stop_process_group(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: .venv/bin/python benchmarks/serving.py --models tiny")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "vitb16"])
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where the figures go (default {RESULTS})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results = []
    with tempfile.TemporaryDirectory(prefix="datadream-bench-serving-") as tmp:
        work = Path(tmp)
        os.environ["DATADREAM_CACHE"] = str(work / "cache")  # also the served pods' (pod_process keeps it)
        tracking = f"sqlite:///{work / 'mlflow.db'}"
        from datadream.data.demo import make_demo_dataset

        test = sorted((make_demo_dataset(work / "requests", seed=1, size=256) / "test").rglob("*.png"))[:8]
        images = [base64.b64encode(p.read_bytes()).decode("ascii") for p in test]
        for model in args.models:
            results.append(measure(model, work / model, tracking, images))

    import torch

    machine = f"{device_info()['device']}, {os.cpu_count()} CPUs" + ("" if torch.cuda.is_available() else ", no GPU")
    print(f"Classifier server on CPU ({machine}); the pod's command line, one uvicorn worker")
    print(f"{'model':8} {'cold start':>11} {'ms/img b1':>10} {'ms/img b32':>11} {'b1/b32':>7}")
    for r in results:
        ratio = r["ms_per_image_b1"] / r["ms_per_image_b32"]
        print(f"{r['model']:8} {r['cold_start_s']:>9.1f} s {r['ms_per_image_b1']:>10.1f} "
              f"{r['ms_per_image_b32']:>11.1f} {ratio:>6.1f}×")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "torch_threads": torch.get_num_threads(),
                                     "time": datetime.now(UTC).isoformat(timespec="seconds"),
                                     "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
