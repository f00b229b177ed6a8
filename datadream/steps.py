"""One function per pipeline step, the same for every entry point (CLI, KFP component, demo, search).

A step takes folders (or URIs), a typed `Config` and a `Tracking`, calls one stage of
`datadream.stages`, logs what the stage did to its tracked run, and returns a typed artifact from
`datadream.artifacts`. The entry points only parse their inputs and call these:

    cli.py, components/stages.py, tune_cli.py/tuning.py, demo.py  ->  steps  ->  stages, artifacts, tracking

Tracking: a step's MLflow run is a child of the pipeline's parent run when there is one (KFP, a
search trial), else — when $MLFLOW_TRACKING_URI is set — a run of its own in the experiment
$MLFLOW_EXPERIMENT_NAME (default "datadream"); else nothing is tracked and nothing of MLflow is
imported. Inside the run the stages' own step metrics (loss, lr, throughput, val top-1 per epoch)
land through `tracking.StepMetrics`, and the step adds its summary metrics and artifacts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datadream.artifacts import Adapters, Classifier, FewShotSet, Metrics, SyntheticSet
from datadream.config import Config, load_config
from datadream.errors import UserError

log = logging.getLogger(__name__)

DEMO_DATASET = "demo"  # the dataset argument that means "the procedural demo dataset"
DEFAULT_EXPERIMENT = "datadream"


# --- configuration ------------------------------------------------------------------------------------


def resolve_config(preset: str, text: str = "", overrides: list[str] | None = None,
                   files: list[str] | None = None) -> Config:
    """The step's config: the preset, then config files, then YAML text, then `section.key=value`."""
    return load_config(preset, files or [], overrides or [], text=text)


def resolve_dataset(dataset: str | os.PathLike, work: str | os.PathLike | None = None, seed: int = 0) -> str:
    """`dataset`, or for "demo" the procedural demo dataset, made under `work` (else a temp folder)."""
    if str(dataset) != DEMO_DATASET:
        return str(dataset)
    from datadream.data.demo import make_demo_dataset

    if work is None:
        import tempfile

        work = tempfile.mkdtemp(prefix="datadream-demo-")
    return str(make_demo_dataset(Path(work) / "dataset", seed=seed))


# --- tracking -----------------------------------------------------------------------------------------


@dataclass
class Tracking:
    """Where a step's run goes: `parent` (a pipeline's MLflow run id), else a run of its own when
    `standalone` (the default: when $MLFLOW_TRACKING_URI is set), else nowhere."""

    parent: str | None = None
    standalone: bool | None = None
    experiment: str | None = None

    @property
    def enabled(self) -> bool:
        if self.parent:
            return True
        if self.standalone is not None:
            return self.standalone
        return bool(os.environ.get("MLFLOW_TRACKING_URI", "").strip())

    @contextlib.contextmanager
    def step(self, name: str, params: Mapping[str, Any], prefix: str | None = None,
             tags: Mapping[str, Any] | None = None) -> Iterator[StepRun]:
        """The step's run, active while the block runs (FINISHED, or FAILED when it raises)."""
        if not self.enabled:
            yield StepRun(None)
            return
        import mlflow  # noqa: F401 - configures MLflow's loggers (at INFO) on first import

        from datadream import runtime, tracking

        runtime.register_step_metrics(tracking.StepMetrics)  # the stage's step metrics go to the active run
        if not log.isEnabledFor(logging.DEBUG):  # its database chatter is not the step's output
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        tracking.check_tracking()
        if self.parent:
            with tracking.stage_run(self.parent, name, params, tags=tags, prefix=prefix) as run:
                yield StepRun(run.info.run_id)
            return
        with _standalone_run(self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
                             name, params, prefix, tags) as run_id:
            yield StepRun(run_id)


@contextlib.contextmanager
def _standalone_run(experiment: str, name: str, params: Mapping[str, Any], prefix: str | None,
                    tags: Mapping[str, Any] | None) -> Iterator[str]:
    import mlflow

    from datadream import tracking

    experiment_id = tracking.get_or_create_experiment(experiment)
    clean = {k: str(v) for k, v in (tags or {}).items() if v is not None}
    stage_tags = {tracking.KIND_TAG: "stage", tracking.STAGE_TAG: name, "git_sha": tracking.code_version(), **clean}
    with mlflow.start_run(experiment_id=experiment_id, run_name=name,
                          tags={k: v for k, v in stage_tags.items() if v is not None}) as run:
        flat = tracking.flatten(params, name if prefix is None else prefix)
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        yield run.info.run_id


@dataclass
class StepRun:
    """A step's tracked run (`run_id` None: untracked, and every method does nothing)."""

    run_id: str | None

    def __bool__(self) -> bool:
        return self.run_id is not None

    def metrics(self, values: Mapping[str, float]) -> None:
        if self:
            from datadream import tracking

            tracking.log_final_metrics(values, self.run_id)

    def file(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self:
            from datadream import tracking

            tracking.log_artifact_file(path, artifact_path, self.run_id)

    def image(self, make: Callable[[], Any], name: str) -> None:
        """Log the image `make()` draws (only drawn when tracked)."""
        if self:
            from datadream import tracking

            tracking.log_image(make(), name, self.run_id)

    def table(self, columns: Mapping[str, list], name: str) -> None:
        if self:
            from datadream import tracking

            tracking.log_table(columns, name, self.run_id)

    def tags(self, values: Mapping[str, Any]) -> None:
        if self:
            from datadream import tracking

            tracking.set_tags(values, self.run_id)


UNTRACKED = Tracking(standalone=False)


def in_pipeline(parent: str | None) -> Tracking:
    """A pipeline step's tracking: under the pipeline's parent run, else (an untracked pipeline) nowhere."""
    return Tracking(parent or None, standalone=False)


def start_pipeline(config: Config, experiment: str, kfp_run_id: str, dataset: str, mode: str) -> str:
    """Open (or re-attach to) the pipeline's parent MLflow run; checks the tracking store first, so an
    unreachable server is reported before any GPU work. Returns its id."""
    from datadream import tracking
    from datadream.io import sha256_json

    tracking.check_tracking()
    parent = tracking.start_pipeline_run(
        experiment, {"kfp.run_id": kfp_run_id, "git_sha": tracking.code_version(),
                     "config_hash": sha256_json(config.to_dict()), "dataset": dataset, "mode": mode},
        run_name=tracking.pipeline_run_name(mode, kfp_run_id))
    tracking.log_config(config, parent)
    return parent


def finish_pipeline(parent: str, status: str = "FINISHED") -> None:
    from datadream import tracking

    tracking.check_tracking()
    tracking.finish_pipeline_run(parent, status)


# --- failures -----------------------------------------------------------------------------------------


def _note_of(output_uri: str) -> str | None:
    """Where the user-error note of an output lives: beside it, on S3 or on disk (None: nowhere we can write)."""
    from datadream.artifacts import USER_ERROR_NOTE

    uri = str(output_uri or "").rstrip("/")
    if not uri:
        return None
    if uri.startswith("s3://") or "://" not in uri:
        return uri + USER_ERROR_NOTE
    return None  # another object store (gs://, minio://): not ours to write


def _read_note(note: str) -> str | None:
    from datadream import storage

    if storage.is_s3(note):
        parent, _, name = note.rpartition("/")
        return storage.read_bytes(note).decode("utf-8").strip() if storage.exists(parent, name) else None
    path = Path(note)
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _write_note(note: str, line: str) -> None:
    from datadream import storage
    from datadream.io import atomic_write_text

    if storage.is_s3(note):
        storage.write_bytes(note, (line + "\n").encode("utf-8"))
    else:
        atomic_write_text(note, line + "\n")


@contextlib.contextmanager
def final_user_errors(output_uri: str) -> Iterator[None]:
    """Make a `UserError` of the block final for the retries of an orchestrator (KFP's retry policy
    cannot tell exit codes apart): its one-line message is written beside the step's output
    (`<output uri>.user-error`, on the pipeline root), and a retry that finds the note fails at once
    with the same line instead of redoing minutes of GPU work on the same bad input."""
    note = _note_of(output_uri)
    if note is not None:
        previous = _read_note(note)
        if previous:
            log.error("an earlier attempt of this step failed on bad input; not retrying it")
            raise UserError(previous)
    try:
        yield
    except UserError as e:
        if note is not None:
            try:
                _write_note(note, (str(e).strip().splitlines() or [""])[0])
            except Exception:  # the user's error matters more than the note
                log.warning("could not write %s", note, exc_info=True)
        raise


def user_error_notes(folder: str | os.PathLike) -> list[str]:
    """The user-error notes under a local run folder (kfp.local), oldest first."""
    from datadream.artifacts import USER_ERROR_NOTE

    notes = sorted(Path(folder).rglob(f"*{USER_ERROR_NOTE}"), key=lambda p: p.stat().st_mtime)
    return [n.read_text(encoding="utf-8").strip() for n in notes]


def interrupt_pipeline(parent_run_id: str) -> None:
    """An interrupted local run (Ctrl-C): its parent MLflow run and the step runs still RUNNING end
    KILLED, tagged as interrupted, so the UI shows no run that will never finish."""
    from mlflow import MlflowClient

    from datadream import tracking

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    running = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                                                "attributes.status = 'RUNNING'")
    for run in [*running, parent]:
        if run.info.status == "RUNNING":
            tracking.set_tags({tracking.ERROR_TAG: "interrupted (Ctrl-C)"}, run.info.run_id)
            tracking.finish_pipeline_run(run.info.run_id, "KILLED")


def close_pipeline(experiment: str, kfp_run_id: str, state: str) -> str | None:
    """The pipeline's last word to MLflow (its exit handler): the parent run of `kfp_run_id` in
    `experiment` ends FINISHED when the pipeline succeeded, else FAILED, tagged with the steps that
    failed (`datadream.failed_steps`) and their first error; no RUNNING parent run is left behind.
    Returns the run's id (None when the pipeline opened none, e.g. it failed before its first step)."""
    from mlflow import MlflowClient

    from datadream import tracking

    if not experiment or not kfp_run_id:
        return None
    tracking.check_tracking()
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], f"tags.`{tracking.KFP_RUN_TAG}` = '{kfp_run_id}' and "
                                                     f"tags.`{tracking.KIND_TAG}` = 'pipeline'")
    for run in runs:
        run_id = run.info.run_id
        if state == "SUCCEEDED":
            if run.info.status == "RUNNING":
                tracking.finish_pipeline_run(run_id, "FINISHED")
            continue
        failed = client.search_runs([found.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and "
                                                           "attributes.status = 'FAILED'")
        names = sorted(r.data.tags.get(tracking.STAGE_TAG, r.info.run_name or "") for r in failed)
        first = next((r.data.tags[tracking.ERROR_TAG] for r in failed if tracking.ERROR_TAG in r.data.tags), "")
        tracking.set_tags({"datadream.failed_steps": ", ".join(names) or "(none tracked)",
                           tracking.ERROR_TAG: first or f"pipeline {state.lower()}"}, run_id)
        tracking.finish_pipeline_run(run_id, "FAILED")
    return runs[0].info.run_id if runs else None


# --- the steps ----------------------------------------------------------------------------------------


def fewshot(config: Config, dataset: str | os.PathLike, out: str | os.PathLike,
            tracking: Tracking = UNTRACKED, demo_work: str | os.PathLike | None = None) -> FewShotSet:
    """Sample `fewshot.shots` images per class of `dataset` into `out`; "demo" is the procedural demo
    dataset, made under `demo_work` (else a temporary folder)."""
    from datadream.stages import fewshot as stage

    dataset = resolve_dataset(dataset, demo_work)
    sections = {"fewshot": config.to_dict()["fewshot"], "data": config.to_dict()["data"]}
    with tracking.step("fewshot", sections, prefix="") as run:
        result = FewShotSet.open(stage.run(config, dataset, out))
        run.tags({"data_hash": result.data_hash})
        run.metrics({"classes": result.meta["classes"], "rejected": result.meta["rejected"]["total"]})
        run.file(result.marker)
        run.file(result.classes_file)
    if tracking.parent:
        from datadream import tracking as mlflow_tracking

        mlflow_tracking.set_tags({"data_hash": result.data_hash}, tracking.parent)
    return result


def adapt(config: Config, fewshot_set: str | os.PathLike, out: str | os.PathLike, shard: str | None = None,
          tracking: Tracking = UNTRACKED) -> Adapters:
    """LoRA-adapt Stable Diffusion to the shots (all classes, or those of `shard` "I/N")."""
    from datadream.stages import adapt as stage

    with tracking.step(f"adapt {shard}" if shard else "adapt", config.to_dict()["adapt"], prefix="adapt") as run:
        result = Adapters.open(stage.run(config, Path(fewshot_set), out, shard=shard or None))
        run.metrics({"adapters": len(result.units()), "classes": len(result.index["classes"])})
        run.file(result.marker)
    return result


def generate(config: Config, fewshot_set: str | os.PathLike, adapters: str | os.PathLike, out: str | os.PathLike,
             shard: str | None = None, tracking: Tracking = UNTRACKED) -> SyntheticSet:
    """Generate `generate.images_per_class` images per class (of `shard`) with the adapters."""
    from datadream.stages import generate as stage

    name = f"generate {shard}" if shard else "generate"
    with tracking.step(name, config.to_dict()["generate"], prefix="generate") as run:
        result = SyntheticSet.open(stage.run(config, Path(fewshot_set), Path(adapters), out, shard=shard or None))
        run.file(result.marker)
        if run:
            from datadream.report import sample_grid

            run.image(lambda: sample_grid(result.path, fewshot_dir=fewshot_set), "samples.png")
            _log_quality(run, result)  # this shard's classes; gather has all of them
    return result


def _log_quality(run: StepRun, synthetic: SyntheticSet) -> dict[str, float]:
    """The synthetic set's quality (quality.json, when generate assessed it) on the step's run; returns
    its overall metrics."""
    from datadream import quality

    report = quality.read_report(synthetic.path)
    if not report:
        return {}
    metrics = quality.run_metrics(report)
    run.metrics(metrics)
    run.table(quality.class_table(report), "quality_per_class.json")
    run.file(synthetic.path / quality.REPORT)
    return metrics


def gather(shards: list[str | os.PathLike], out: str | os.PathLike,
           tracking: Tracking = UNTRACKED) -> tuple[SyntheticSet, dict[str, float]]:
    """One SyntheticSet from the generate fan-out's shards, and its overall quality metrics; the parent
    run gets synthetic_class_agreement and synthetic_fd_clip."""
    from datadream import quality
    from datadream.stages import generate as stage

    with tracking.step("gather", {"shards": len(shards)}, prefix="gather") as run:
        result = SyntheticSet.open(stage.merge(list(shards), out))
        report = quality.read_report(result.path)
        _log_quality(run, result)
        if run and report and tracking.parent:
            from datadream import tracking as mlflow_tracking

            mlflow_tracking.log_final_metrics(quality.parent_metrics(report), run_id=tracking.parent)
    return result, (quality.run_metrics(report) if report else {})


def gather_adapters(shards: list[str | os.PathLike], out: str | os.PathLike) -> Adapters:
    """One Adapters folder (one index) from the class-wise adapt fan-out's shards."""
    from datadream.stages import adapt as stage

    return Adapters.open(stage.merge(list(shards), out))


def classify(config: Config, fewshot_set: str | os.PathLike, synthetic: str | os.PathLike | None,
             out: str | os.PathLike, tracking: Tracking = UNTRACKED, name: str | None = None,
             on_epoch: Callable[[int, float | None], None] | None = None) -> Classifier:
    """Train the CLIP LoRA classifier on `classify.train_on`; the epoch is chosen on val."""
    from datadream.stages import classify as stage

    name = name or f"classify {config.classify.train_on}"
    with tracking.step(name, config.to_dict()["classify"], prefix="classify") as run:
        result = Classifier.open(stage.run(config, Path(fewshot_set), Path(synthetic) if synthetic else None, out,
                                           on_epoch=on_epoch))
        best = result.best_val_top1
        run.metrics({"best_epoch": result.meta["best_epoch"],
                     **({"best_val_top1": best} if best is not None else {})})
        run.file(result.marker)
    return result


def evaluate(config: Config, classifier: str | os.PathLike, fewshot_set: str | os.PathLike, out: str | os.PathLike,
             split: str = "test", tracking: Tracking = UNTRACKED, name: str = "evaluate",
             tags: Mapping[str, Any] | None = None) -> Metrics:
    """Score the classifier on a split of the few-shot set (test by default): metrics.json, confusion.csv."""
    from datadream.stages import evaluate as stage

    fs = FewShotSet.open(fewshot_set)
    with tracking.step(name, config.to_dict()["evaluate"], prefix="evaluate", tags=tags) as run:
        stage.run(config, Classifier.open(classifier).path, fs.manifest(split), out)
        result = Metrics.open(out)
        if run:
            from datadream import plots

            m, names = result.meta, fs.names()
            labels = [names.get(c, c) for c in m["classes"]]
            what = (tags or {}).get("train_on", name)
            run.metrics({f"{split}_{k}": m[k] for k in ("top1", "top5", "mean_per_class")})
            run.table({"class": labels, f"{split}_images": [m["per_class_n"][c] for c in m["classes"]],
                       "accuracy": [m["per_class"][c] for c in m["classes"]]}, "per_class.json")
            run.image(lambda: plots.image(plots.confusion_matrix(
                labels, m["confusion"], f"Confusion matrix: {what} ({split} split)")), "confusion_matrix.png")
            run.image(lambda: plots.image(plots.per_class_accuracy(
                labels, {what: [m["per_class"][c] for c in m["classes"]]}, f"Per-class {split} accuracy: {what}")),
                "per_class_accuracy.png")
            run.file(result.marker)
            run.file(result.confusion_csv)
    return result


def setting_label(train_on: str, mode: str) -> dict[str, str]:
    """How a classifier is named in tables: its training data, and the adaptation mode when synthetic."""
    return {"train_on": train_on, "mode": mode,
            "label": train_on if train_on in ("zero-shot", "real") else f"{train_on} ({mode}-wise)"}


def classify_config(config: Config, train_on: str) -> Config:
    """`config` for a classifier trained on `train_on`; "zero-shot" = the real split, no epochs."""
    update = {"train_on": "real", "epochs": 0} if train_on == "zero-shot" else {"train_on": train_on}
    data = config.to_dict()
    data["classify"].update(update)
    try:
        return Config.model_validate(data)
    except Exception as e:
        raise UserError(f"train_on {train_on!r}: {str(e).splitlines()[0]}") from None


def report_results(scores: list[Metrics]) -> list[dict]:
    """The report's rows: one per scored classifier (label, metrics, classifier.json)."""
    return [{"setting": s.setting()["label"], "metrics": s.meta, "classifier": s.classifier.meta} for s in scores]


def summarize(scores: list[str | os.PathLike], synthetic: str | os.PathLike, fewshot_set: str | os.PathLike,
              report: str | os.PathLike, tracking: Tracking = UNTRACKED, title: str = "DataDream run",
              run: Mapping[str, Any] | None = None) -> list[dict]:
    """One HTML report with the run's facts (`run`: mode, gate, …; dataset, shots, seed and git sha are
    read here), every classifier side by side and the synthetic samples; logged to the parent run, with
    each classifier's test top-1/top-5 as the parent's metrics."""
    from datadream.report import render_html, run_facts, write_report

    metrics = [Metrics.open(s) for s in scores]
    results = report_results(metrics)
    html = render_html(title, results, synthetic_dir=synthetic, fewshot_dir=fewshot_set,
                       run=run_facts(fewshot_set, **(run or {})))
    write_report(report, html)
    if tracking.parent:
        from datadream import tracking as mlflow_tracking

        mlflow_tracking.check_tracking()
        mlflow_tracking.log_final_metrics(mlflow_tracking.result_metrics(
            [{"train_on": m.setting()["train_on"], **m.meta} for m in metrics]), tracking.parent)
        mlflow_tracking.log_text(html, "report.html", run_id=tracking.parent)  # the MLflow UI renders .html
        mlflow_tracking.log_json([{"setting": r["setting"], **{k: r["metrics"][k] for k in
                                                               ("top1", "top5", "mean_per_class")}}
                                  for r in results], "results.json", run_id=tracking.parent)
    return results


@dataclass(frozen=True)
class Registration:
    classifier_version: str
    adapters_version: str
    decision: str
    gate: dict | None = None  # registry.promote_if_better's answer; None when skipped


def register(name: str, fewshot_set: str | os.PathLike, adapters: str | os.PathLike,
             scores: list[str | os.PathLike], lineage: Mapping[str, Any], promote_margin: float,
             promote_floor: float, parent: str = "") -> Registration:
    """Register the adapters and the classifier with the best *val* top-1; the gate decides on `champion`.

    `lineage` holds the run's settings (dataset, shots, seed, mode, models, kfp_run_id); the parent run
    (`parent`, else found or opened by `lineage["kfp_run_id"]`) gets a "register" child and is finished."""
    from datadream import registry
    from datadream import tracking as mlflow_tracking

    if not name:
        return Registration("", "", "skipped")
    mlflow_tracking.check_tracking()
    fs = FewShotSet.open(fewshot_set)
    candidates = [Metrics.open(s) for s in scores]
    best = max(candidates, key=lambda m: m.classifier.best_val_top1 or 0.0)  # chosen on val, never on test
    sha = mlflow_tracking.code_version()
    data_hash = lineage.get("data_hash") or fs.data_hash
    full = {**lineage, "data_hash": data_hash, "manifest_sha256": fs.meta["manifest_sha256"]["train"],
            "train_on": best.setting()["train_on"], "val_top1": best.classifier.best_val_top1 or 0.0, "git_sha": sha}
    kfp_run_id = str(lineage.get("kfp_run_id") or "")
    # One MLflow run per pipeline run (opened by fewshot; found again by kfp.run_id otherwise);
    # registration is its "register" stage, so the models' artifacts sit under the experiment.
    parent = parent or mlflow_tracking.start_pipeline_run(
        name, {"kfp.run_id": kfp_run_id, "git_sha": sha, "data_hash": data_hash})
    full["mlflow_run_id"] = parent
    metrics = best.meta
    with mlflow_tracking.stage_run(parent, "register", {"name": name, "margin": promote_margin,
                                                        "floor": promote_floor}):
        mlflow_tracking.log_final_metrics({f"test_{k}": metrics[k] for k in ("top1", "top5", "mean_per_class")})
        mlflow_tracking.log_artifact_file(best.marker, "evaluation")
        adapters_version = registry.register_adapters(name, Adapters.open(adapters).path, full)
        version = registry.register_classifier(name, best.classifier.path, metrics,
                                               {**full, "adapter_version": adapters_version})
        gate = registry.promote_if_better(name, version, margin=promote_margin, floor=promote_floor)
    mlflow_tracking.finish_pipeline_run(parent)
    return Registration(version, adapters_version, f"{gate['decision']}: {gate['reason']}", gate)
