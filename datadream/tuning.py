"""Optuna search campaigns over LoRA rank and learning rate (SD adapter and CLIP classifier).

A campaign is an Optuna study in a storage URL that every worker shares:
  postgresql://…             the cluster (many workers on many GPUs)
  sqlite:///tune.db          a laptop (a few local workers)
  journal:///path/tune.log   a laptop or a shared file system, without a database server
A trial runs adapt → generate → classify on one few-shot set with the trial's settings layered on the
config (plus `tune.fidelity`, which makes trials cheap) and returns the classifier's best **val**
top-1 — never test. It reports the best val top-1 after every classify epoch, so the pruner stops
trials that trail. The config's own values (the paper's) are enqueued as trial 0.

Workers: each runs `study.optimize` until the study holds `trials` finished (complete or pruned)
trials, so `--trials N` is a target for the whole campaign: stopping and re-running the same command
resumes it, and a finished campaign is a no-op. With SQL storage every running trial sends a
heartbeat; a trial whose worker died (OOM, preempted spot node, SIGKILL) is marked failed after
`tune.grace_s` by the next worker to start a trial, and retried with the same settings
(`RetryHeartbeatStaleTrialCallback`). Trial work folders are keyed by the settings, so the retry resumes
the dead trial's checkpoints. Journal storage has no heartbeats: a dead worker's trial stays RUNNING.

MLflow: one campaign run per study (re-attached by the `optuna.study` tag), one child run per trial
(the trial's settings as params, the stages' step metrics, the objective, `optuna.state`), the
trial number and the run id cross-referenced (`optuna.trial_number` tag, `mlflow_run_id` user attr),
and the best trial's run tagged `optuna.best=true`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import warnings
from pathlib import Path
from typing import Any

from datadream.artifacts import FewShotSet
from datadream.config import SEARCHABLE, Config, deep_merge
from datadream.errors import UserError, redact
from datadream.io import atomic_write_text, file_lock, sha256_file, sha256_json

log = logging.getLogger(__name__)

STUDY_TAG = "optuna.study"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
BEST_TAG = "optuna.best"
PRUNED_TAG = "optuna.pruned_reason"
PRUNED_REASON = "pruned_reason"  # the trial's user attribute saying why it was pruned
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --- storage -----------------------------------------------------------------------------------------------


def storage_from(parameter: str) -> str:
    """A pipeline's `storage` parameter, else $OPTUNA_STORAGE (the datadream-secrets Secret). A password
    in the parameter is refused: parameters are shown in the Kubeflow UI and stored with the run."""

    url = (parameter or "").strip()
    if url:
        if redact(url) != url:
            raise UserError(f"storage {redact(url)!r}: holds a password; put the URL in the datadream-secrets "
                            "Secret as OPTUNA_STORAGE and leave the parameter empty")
        return url
    url = os.environ.get("OPTUNA_STORAGE", "").strip()
    if not url:
        raise UserError("storage: empty parameter and no $OPTUNA_STORAGE (the datadream-secrets Secret)")
    return url


def check_study_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UserError(f"--study {name!r}: use 1–128 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return name


def open_storage(url: str, config: Config | None = None, timeout_s: float = 10):
    """The Optuna storage behind `url`, checked now: an unreachable database is one UserError line.

    SQL URLs get heartbeats (`tune.heartbeat_s`, `tune.grace_s`) and retries of stale trials
    (`tune.max_retry`); `journal:///path` (or a path ending in .log/.journal) is a journal file."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage


    url = (url or "").strip()
    if not url:
        raise UserError("--storage: expected a storage URL (postgresql://…, sqlite:///tune.db or journal:///tune.log)")
    tune = (config or Config()).tune
    journal = url[len("journal://"):] if url.startswith("journal://") else url if "://" not in url else None
    if journal is not None:
        if not journal.endswith((".log", ".journal")) and not url.startswith("journal://"):
            raise UserError(f"--storage {url!r}: expected a URL (postgresql://…, sqlite:///…) or journal:///file.log")
        path = Path(journal)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise UserError(f"--storage {url}: cannot open journal file ({e.strerror})") from None
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        with contextlib.suppress(OSError):
            db.parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("postgres"):
        engine_kwargs = {"connect_args": {"connect_timeout": max(1, round(timeout_s))}, "pool_pre_ping": True}
    try:
        with _quiet_optuna(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.8
            return RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=tune.heartbeat_s, grace_period=tune.grace_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=tune.max_retry),
            )
    except ImportError as e:
        raise UserError(f"--storage {redact(url)}: database driver not installed ({e.name})") from None
    except Exception as e:
        first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--storage {redact(url)}: unreachable ({redact(first)[:200]})") from None


@contextlib.contextmanager
def _quiet_optuna():
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def load_study(name: str, storage_url: str, config: Config | None = None):
    """An existing study; UserError naming the study and the storage when it is absent."""
    import optuna


    storage = open_storage(storage_url, config)
    try:
        return optuna.load_study(study_name=check_study_name(name), storage=storage)
    except KeyError:
        names = optuna.study.get_all_study_names(storage)
        raise UserError(f"--study {name!r}: no such study in {redact(storage_url)}"
                        + (f" (studies: {', '.join(names[:10])})" if names else " (it holds no studies)")) from None


# --- the search space ------------------------------------------------------------------------------------------


def baseline_params(config: Config) -> dict[str, Any]:
    """The config's own values of the searched settings (enqueued as trial 0)."""
    data = config.to_dict()
    return {name: data[name.split(".")[0]][name.split(".")[1]] for name in config.tune.search}


def suggest(trial, config: Config) -> dict[str, Any]:
    """The trial's value of each searched setting."""
    params = {}
    for name in config.tune.search:
        r = config.tune.space[name]
        if r.choices is not None:
            choices = [int(c) for c in r.choices] if SEARCHABLE[name] is int else list(r.choices)
            params[name] = trial.suggest_categorical(name, choices)
        elif SEARCHABLE[name] is int:
            params[name] = trial.suggest_int(name, math.ceil(r.low), math.floor(r.high), log=r.log)
        else:
            params[name] = trial.suggest_float(name, r.low, r.high, log=r.log)
    return params


def _dotted(overrides: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        out = deep_merge(out, {section: {name: value}})
    return out


def trial_config(config: Config, params: dict[str, Any], fidelity: bool = True) -> Config:
    """`config` with the fidelity overrides (for search) and the trial's settings; a rank carries its
    LoRA alpha along (alpha/rank, the LoRA scale, stays the config's)."""
    data = config.to_dict()
    if fidelity:
        data = deep_merge(data, _dotted(config.tune.fidelity))
    data = deep_merge(data, _dotted(params))
    for section in ("adapt", "classify"):
        if f"{section}.rank" in params:
            old = getattr(config, section)
            data[section]["alpha"] = old.alpha / old.rank * params[f"{section}.rank"]
    try:
        return Config.model_validate(data)
    except Exception as e:
        raise UserError(f"tune.fidelity or the trial's settings {params}: {str(e).splitlines()[0]}") from None


def best_overrides(config: Config, params: dict[str, Any]) -> dict:
    """The nested config mapping (`--config` file or the pipeline's `config` text) for `params`,
    alpha included for ranks."""
    full = trial_config(config, params, fidelity=False).to_dict()
    out: dict = {}
    for name in params:
        section, key = name.split(".")
        out.setdefault(section, {})[key] = full[section][key]
        if key == "rank":
            out[section]["alpha"] = full[section]["alpha"]
    return out


def write_best(study, config: Config, path: str | os.PathLike) -> Path:
    """Write the best trial's settings as a config file; UserError if no trial completed yet."""
    import yaml

    try:
        best = study.best_trial
    except ValueError:
        raise UserError(f"study {study.study_name!r}: no completed trial yet; nothing to export") from None
    body = yaml.safe_dump(best_overrides(config, best.params), sort_keys=True)
    header = (f"# Best trial of study {study.study_name!r}: trial {best.number}, val top-1 {best.value:.4f}\n"
              f"# Use: datadream … --config {Path(path).name}, or as the pipeline's `config` parameter.\n")
    atomic_write_text(path, header + body)
    return Path(path)


# --- campaigns ----------------------------------------------------------------------------------------------------


def create_study(name: str, storage_url: str, config: Config):
    """Create or load the study (safe when workers race) and enqueue the baseline once."""
    import optuna

    if config.tune.min_class_agreement is not None and not config.assess.enabled:
        raise UserError(f"tune.min_class_agreement={config.tune.min_class_agreement:g} needs assess.enabled=true "
                        "(it prunes on the synthetic set's quality.json)")
    pruner: optuna.pruners.BasePruner
    if config.tune.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=config.tune.pruner_warmup_epochs)
    elif config.tune.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, config.classify.epochs))
    else:
        pruner = optuna.pruners.NopPruner()
    sampler = optuna.samplers.TPESampler(seed=config.tune.sampler_seed, n_startup_trials=config.tune.startup_trials)
    storage = open_storage(storage_url, config)
    with _quiet_optuna():
        study = optuna.create_study(study_name=check_study_name(name), storage=storage, direction="maximize",
                                    load_if_exists=True, sampler=sampler, pruner=pruner)
        if not study.trials:
            study.enqueue_trial(baseline_params(config), skip_if_exists=True)
    return study


def finished(study) -> int:
    """Trials that count toward a campaign's target: complete or pruned."""
    return len(study.get_trials(deepcopy=False, states=_finished_states()))


class Campaign:
    """One worker's view of a campaign: the base config, the few-shot set and where trials work."""

    def __init__(self, study, config: Config, fewshot_dir: str | os.PathLike, work: str | os.PathLike,
                 experiment: str | None = None):
        self.study, self.config = study, config
        self.fewshot_dir, self.work = Path(fewshot_dir), Path(work)
        self.experiment = experiment
        self.parent_run: str | None = None

    def open_tracking(self, storage_url: str) -> None:
        if not self.experiment:
            return
        from datadream import tracking

        tracking.check_tracking()
        self.parent_run = tracking.start_pipeline_run(
            self.experiment, {STUDY_TAG: self.study.study_name, "optuna.storage": storage_url,
                              "git_sha": tracking.code_version()},
            params={"tune": self.config.to_dict()["tune"]}, run_name=f"tune-{self.study.study_name}",
            match_tag=STUDY_TAG)

    def objective(self, trial) -> float:
        import optuna

        from datadream import steps

        params = suggest(trial, self.config)
        cfg = trial_config(self.config, params)
        cfg = cfg.model_copy(update={"classify": cfg.classify.model_copy(update={"train_on": cfg.tune.train_on})})
        folders = self.folders(cfg)
        trial.set_user_attr("work_dir", str(folders["classifier"]))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        log.info("tune: trial %d %s -> %s", trial.number, params, folders["classifier"])
        tracking = steps.Tracking(self.parent_run, standalone=False)
        pruned = None
        with tracking.step(f"trial {trial.number}", {**params, **{f"fidelity.{k}": v for k, v in
                                                                  cfg.tune.fidelity.items()}},
                           prefix="", tags={TRIAL_TAG: trial.number, STUDY_TAG: self.study.study_name}) as run:
            if run:
                trial.set_user_attr("mlflow_run_id", run.run_id)
            try:
                value = self._run_trial(trial, cfg, folders)
            except optuna.TrialPruned as e:
                pruned = e
                trial.set_user_attr(PRUNED_REASON, str(e))
                run.tags({STATE_TAG: "PRUNED", PRUNED_TAG: str(e)[:5000]})
            else:
                run.tags({STATE_TAG: "COMPLETE"})
                run.metrics({"objective_val_top1": value})
        if pruned is not None:
            raise pruned
        return value

    def folders(self, cfg: Config) -> dict[str, Path]:
        """Work folders keyed by the settings each stage depends on: trials that differ only in CLIP
        settings share the SD adapters and images, and a retried trial resumes its own checkpoints."""
        d = cfg.to_dict()
        fewshot_set = {"path": str(self.fewshot_dir.resolve()),
                       "marker": sha256_file(FewShotSet(self.fewshot_dir).marker)}
        sd = {"fewshot_set": fewshot_set, **{k: d[k] for k in ("run", "data", "models", "fewshot", "adapt")}}
        images = {**sd, "generate": d["generate"], "assess": d["assess"]}
        return {"adapters": self.work / "adapters" / sha256_json(sd)[:16],
                "synthetic": self.work / "synthetic" / sha256_json(images)[:16],
                "classifier": self.work / "classifiers" / sha256_json({**images, "classify": d["classify"]})[:16]}

    def _run_trial(self, trial, cfg: Config, folders: dict[str, Path]) -> float:
        import optuna

        from datadream import steps

        def report(epoch: int, best_val: float | None) -> None:
            if best_val is None:
                return
            trial.report(best_val, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (best val top-1 {best_val:.4f} trails other trials)")

        # Shared folders are built by one worker at a time; the others wait, then find them finished.
        # The steps run inside the trial's run (untracked themselves): their stages' step metrics land there.
        with file_lock(lock_of(folders["adapters"])):
            steps.adapt(cfg, self.fewshot_dir, folders["adapters"])
        with file_lock(lock_of(folders["synthetic"])):
            steps.generate(cfg, self.fewshot_dir, folders["adapters"], folders["synthetic"])
        prune_on_quality(trial, cfg, folders["synthetic"])
        with file_lock(lock_of(folders["classifier"])):
            clf = steps.classify(cfg, self.fewshot_dir, folders["synthetic"], folders["classifier"], on_epoch=report)
        if clf.best_val_top1 is None:
            raise UserError(f"{self.fewshot_dir}: the val split is empty; a search needs val images")
        return float(clf.best_val_top1)

    def optimize(self, trials: int) -> int:
        """Run trials until the study holds `trials` finished ones; returns how many this worker ran."""
        from optuna.study import MaxTrialsCallback

        done = finished(self.study)
        if done >= trials:
            log.info("tune: study %s already holds %d finished trials (target %d); nothing to do",
                     self.study.study_name, done, trials)
            return 0
        ran = []
        with _quiet_optuna():
            self.study.optimize(self.objective, n_trials=trials, gc_after_trial=True, catch=(),
                                callbacks=[MaxTrialsCallback(trials, states=_finished_states()),
                                           lambda study, trial: ran.append(trial.number)])
        return len(ran)

    def tag_best(self) -> None:
        """Mark the best trial's MLflow run (and only it) with optuna.best=true."""
        if not self.parent_run:
            return
        tag_best(self.study, self.parent_run)


def prune_on_quality(trial, cfg: Config, synthetic_dir: Path) -> None:
    """Prune the trial before it trains a classifier when its synthetic set's mean class agreement (the share
    of images the base CLIP assigns to their own class, quality.json) is below tune.min_class_agreement."""
    import optuna

    from datadream import quality

    threshold = cfg.tune.min_class_agreement
    if threshold is None:
        return
    report = quality.read_report(synthetic_dir)
    agreement = report["overall"]["class_agreement"] if report else None
    if agreement is None:
        raise UserError(f"tune.min_class_agreement={threshold}: {synthetic_dir} has no class agreement in "
                        f"{quality.REPORT} (is assess.enabled false?)")
    trial.set_user_attr("synthetic_class_agreement", agreement)
    if agreement < threshold:
        raise optuna.TrialPruned(f"synthetic class agreement {agreement:.4f} < tune.min_class_agreement "
                                 f"{threshold:g}, before classify")


def lock_of(folder: Path) -> Path:
    """The lock file beside a shared work folder."""
    return folder.with_name(folder.name + ".lock")


def _finished_states():
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED)


def tag_best(study, parent_run: str) -> None:
    from mlflow import MlflowClient

    from datadream import tracking

    try:
        best = study.best_trial
    except ValueError:
        return
    client = MlflowClient()
    best_run = best.user_attrs.get("mlflow_run_id")
    experiment_id = client.get_run(parent_run).info.experiment_id
    for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run}' "
                                                   f"and tags.`{BEST_TAG}` = 'true'"):
        if run.info.run_id != best_run:
            client.delete_tag(run.info.run_id, BEST_TAG)
    if best_run:
        tracking.set_tags({BEST_TAG: "true"}, best_run)
    tracking.set_tags({"optuna.best_trial": best.number, "optuna.best_value": f"{best.value:.6f}",
                       **{f"best.{k}": v for k, v in best.params.items()}}, parent_run)


def prepare(config: Config, dataset: str, study: str, storage_url: str, fewshot_out: str | os.PathLike,
            experiment: str | None, work: str | os.PathLike | None = None) -> FewShotSet:
    """Everything a campaign's workers share, checked and made once before they start: the study
    storage and the study (the config's own settings enqueued as trial 0), the MLflow experiment
    (created now: workers starting at once on a fresh SQLite store would race to create its tables),
    and the few-shot set every trial trains on ("demo": the procedural dataset, made under `work`)."""
    from datadream import steps

    check_study_name(study)
    create_study(study, storage_url, config)  # fails fast on an unreachable storage, before any work
    if experiment:
        from datadream import tracking

        tracking.check_tracking()
        tracking.get_or_create_experiment(experiment)
    return steps.fewshot(config, dataset, fewshot_out, demo_work=work)  # a no-op when it exists


def pipeline_prepare(preset: str, config_text: str, overrides: list[str], dataset: str, study: str, storage: str,
                     workers: int, register_name: str, fewshot_out: str | os.PathLike) -> tuple[str, list[str]]:
    """The `datadream-tune` pipeline's first step: `prepare`, then the config text the workers share
    (`config_text` with the pipeline's parameters folded in) and the worker list of the fan-out."""
    import yaml

    from datadream import steps
    from datadream.config import layered_overrides

    config = steps.resolve_config(preset, config_text, overrides)  # bad settings fail here, before any GPU
    if workers < 1:
        raise UserError(f"workers {workers}: expected at least 1")
    prepare(config, dataset, study, storage_from(storage), fewshot_out, f"{register_name}-tune" if register_name
            else None)
    run_config = deep_merge(yaml.safe_load(config_text) or {}, layered_overrides([], overrides))
    return yaml.safe_dump(run_config, sort_keys=True), [str(i) for i in range(workers)]


def pipeline_best(study: str, storage: str, preset: str, run_config: str, best: str | os.PathLike):
    """The `datadream-tune` pipeline's last search step: best.yaml (the best settings alone) and the
    run's config with them layered on, for the final datadream run; returns (config, study)."""
    import yaml

    from datadream import steps

    config = steps.resolve_config(preset, run_config)
    s = load_study(study, storage_from(storage), config)
    path = write_best(s, config, best)
    merged = deep_merge(yaml.safe_load(run_config) or {}, yaml.safe_load(path.read_text()))
    return yaml.safe_dump(merged, sort_keys=True), s


def pipeline_worker(study: str, storage: str, trials: int, worker: str, register_name: str, preset: str,
                    run_config: str, fewshot_dir: str | os.PathLike) -> int:
    """One worker task of the `datadream-tune` pipeline: `work` with the campaign's settings, its trial
    folders under $DATADREAM_WORK (else the temp folder) / datadream-tune / <study>."""
    import tempfile

    from datadream import steps

    config = steps.resolve_config(preset, run_config)
    work_dir = Path(os.environ.get("DATADREAM_WORK") or tempfile.gettempdir()) / "datadream-tune" / study
    ran = work(study, storage_from(storage), config, fewshot_dir, work_dir,
               f"{register_name}-tune" if register_name else None, trials)
    log.info("tune worker %s: ran %d trial(s)", worker, ran)
    return ran


def work(study: str, storage_url: str, config: Config, fewshot_dir: str | os.PathLike, work_dir: str | os.PathLike,
         experiment: str | None, trials: int) -> int:
    """One worker: run trials until the study holds `trials` finished ones; returns how many it ran."""
    campaign = Campaign(create_study(study, storage_url, config), config, fewshot_dir, work_dir, experiment)
    campaign.open_tracking(storage_url)
    ran = campaign.optimize(trials)
    campaign.tag_best()
    return ran


def _work_in_process(kwargs: dict, log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ran = work(**kwargs)
    log.info("tune: worker %d ran %d trial(s)", os.getpid(), ran)


def run_workers(workers: int, target=_work_in_process, **kwargs) -> int:
    """Run `work(**kwargs)` in `workers` processes of this machine at once and wait for all of them.

    The processes are started fresh (multiprocessing "spawn"): the settings, the storage URL included,
    reach them through a pipe, never a command line. Returns the first non-zero exit code, or 0.
    Ctrl-C stops the workers; the campaign resumes from the storage."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    # Share the cores: W processes with a thread per core each oversubscribe the CPU (10× slower on 2 cores).
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    added = {var: threads for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if var not in os.environ}
    level = logging.getLogger().getEffectiveLevel()
    procs = [ctx.Process(target=target, args=(kwargs, level), name=f"tune-worker-{i}") for i in range(workers)]
    os.environ.update(added)  # the children inherit the environment at start
    try:
        for p in procs:
            p.start()
    finally:
        for var in added:
            os.environ.pop(var, None)
    status = 0
    try:
        for p in procs:
            p.join()
            status = status or (p.exitcode or 0)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
        raise
    return status


# --- reports -------------------------------------------------------------------------------------------------------


def trials_table(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
            t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "last_epoch": max(t.intermediate_values) if t.intermediate_values else None,
                     "seconds": round(duration, 1) if duration is not None else None, **t.params,
                     "retry_of": t.system_attrs.get("failed_trial"),
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                     PRUNED_REASON: t.user_attrs.get(PRUNED_REASON)})
    return rows


def importances(study) -> dict[str, float]:
    """Parameter importances (Optuna's default evaluator); empty with fewer than 2 completed trials."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2 or not complete[0].params:
        return {}
    try:
        with _quiet_optuna():
            return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        log.warning("tune: no parameter importances (%s)", e)
        return {}


def plot_history(study, path: str | os.PathLike) -> Path:
    """The optimization history (objective per trial and best so far) as a PNG."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning: the matplotlib backend is "experimental"
        ax = plot_optimization_history(study)
    ax.set_ylabel("val top-1")
    fig = ax.figure
    fig.set_size_inches(8, 4.5)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
