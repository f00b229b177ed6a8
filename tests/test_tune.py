"""Optuna search campaigns (datadream.tuning): search space, storage (SQLite, journal, Postgres), workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from servers import postgres_db

from datadream import tuning
from datadream.cli import main
from datadream.config import load_config

# Trials that search only CLIP settings share the SD adapters and images: seconds each on tiny.
CLIP_SEARCH = ["--set", "tune.search=[classify.rank, classify.lr]",
               "--set", "tune.space={classify.rank: {choices: [4, 8]}, classify.lr: {choices: [3.0e-3, 1.0e-9]}}",
               "--set", "tune.startup_trials=10"]


@pytest.fixture(autouse=True)
def restore_tracking_uri(monkeypatch):
    """`tune run` in this process sets MLflow's tracking URI (and $MLFLOW_TRACKING_URI); give both back."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    yield
    mlflow.set_tracking_uri(None)  # also drops the variable, which monkeypatch then restores


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def trials_of(study_name: str, storage: str) -> list:
    return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)


# --- search space and bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("tune.space={adapt.lr: {low: 1.0e-3, high: 1.0e-5}}",
     "'tune.space.adapt.lr': Value error, low (0.001) must be below high (1e-05)"),
    ("tune.space={adapt.lr: {low: 0, high: 1, log: true}}", "a log range needs low > 0"),
    ("tune.search=[adapt.rank, unet.rank]", "unknown parameter 'unet.rank'; searchable: adapt.rank, adapt.lr"),
    ("tune.space={adapt.rank: {choices: [4, 8.5]}}", "ranks must be whole numbers"),
    ("tune.fidelity={generate: 3}", "key 'generate': expected 'section.key'"),
])
def test_bad_search_space_is_one_line(capsys, tmp_path, override, message):
    code, _, err = run_cli(capsys, "tune", "run", "--study", "s", "--storage", f"sqlite:///{tmp_path}/t.db",
                           "--trials", "1", "--set", override)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "t.db").exists()  # nothing is created before the input is known good


def test_unreachable_storage_and_bad_names_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "tune", "run", "--study", "s", "--trials", "1",
                           "--storage", "postgresql+psycopg2://postgres:s3cret@127.0.0.1:9/nodb")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unreachable" in err and "s3cret" not in err
    code, _, err = run_cli(capsys, "tune", "run", "--study", "../x", "--storage", "sqlite:///t.db", "--trials", "1")
    assert code == 2 and "--study '../x'" in err
    code, _, err = run_cli(capsys, "tune", "best", "--study", "missing", "--storage", f"sqlite:///{tmp_path}/t.db")
    assert code == 2 and "no such study" in err
    code, _, err = run_cli(capsys, "tune", "run", "--study", "s", "--storage", "tune.db", "--trials", "1")
    assert code == 2 and "expected a URL" in err


def test_trial_settings_carry_alpha_and_fidelity(tiny):
    config = tiny()
    cfg = tuning.trial_config(config, {"adapt.rank": 16, "classify.lr": 1e-3})
    assert cfg.adapt.rank == 16 and cfg.adapt.alpha == config.adapt.alpha / config.adapt.rank * 16
    assert cfg.classify.lr == 1e-3
    assert cfg.generate.images_per_class == config.tune.fidelity["generate.images_per_class"]
    best = tuning.best_overrides(config, {"adapt.rank": 16, "adapt.lr": 2e-4})
    assert best == {"adapt": {"rank": 16, "alpha": 16.0, "lr": 2e-4}}
    assert tuning.baseline_params(config) == {"adapt.rank": config.adapt.rank, "adapt.lr": config.adapt.lr}


# --- one machine: SQLite and journal ---------------------------------------------------------------------------


def test_campaign_on_sqlite_prunes_resumes_and_exports(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path}/tune.db"
    args = ["tune", "run", "--study", "clip", "--storage", storage, "--work", str(tmp_path / "work"), *CLIP_SEARCH]
    # Stop after 2 finished trials, then resume to 4: only the missing ones run.
    code, out, err = run_cli(capsys, *args, "--trials", "2")
    assert code == 0, err
    assert json.loads(out)["finished"] == 2
    # The config's own settings are trial 0 (the paper's, here the tiny preset's).
    first = trials_of("clip", storage)[0]
    assert first.params == {"classify.rank": 4, "classify.lr": 3e-3} and first.state == TrialState.COMPLETE
    study = optuna.load_study(study_name="clip", storage=storage)
    study.enqueue_trial({"classify.rank": 8, "classify.lr": 1e-9})  # learns nothing: must be pruned
    code, out, err = run_cli(capsys, *args, "--trials", "4")
    assert code == 0, err
    trials = trials_of("clip", storage)
    assert len(trials) == 4 and [t.number for t in trials] == [0, 1, 2, 3]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert [t.params["classify.lr"] for t in pruned] == [1e-9] and pruned[0].user_attrs["mlflow_run_id"]
    assert max(pruned[0].intermediate_values) < 10  # stopped before its last epoch
    # A finished campaign is a no-op.
    code, out, _ = run_cli(capsys, *args, "--trials", "4")
    assert code == 0 and len(trials_of("clip", storage)) == 4

    # Every trial has one MLflow child run of the campaign run, cross-referenced both ways.
    client = MlflowClient()
    experiment = client.get_experiment_by_name("datadream-tune")
    campaign = client.search_runs([experiment.experiment_id], "tags.`optuna.study` = 'clip' "
                                  "and tags.`datadream.kind` = 'pipeline'")
    assert len(campaign) == 1
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{campaign[0].info.run_id}'")
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert sorted(by_number) == [0, 1, 2, 3]
    for t in trials:
        run = by_number[t.number]
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["optuna.state"] == t.state.name
        assert run.data.params["classify.lr"] == json.dumps(t.params["classify.lr"])
    assert client.get_metric_history(by_number[0].info.run_id, "val_top1")  # the stage's epoch metrics
    best = study.best_trial
    assert [n for n, r in by_number.items() if r.data.tags.get("optuna.best") == "true"] == [best.number]
    assert campaign[0].data.tags["optuna.best_trial"] == str(best.number)

    # The best settings as a config file the stages and the pipeline accept.
    code, out, err = run_cli(capsys, "tune", "best", "--study", "clip", "--storage", storage, "-o", "best.yaml")
    assert code == 0, err
    exported = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert exported["classify"]["rank"] == best.params["classify.rank"]
    cfg = load_config("paper", [tmp_path / "best.yaml"])
    assert cfg.classify.lr == best.params["classify.lr"] and cfg.classify.alpha == 2 * cfg.classify.rank

    code, out, err = run_cli(capsys, "tune", "report", "--study", "clip", "--storage", storage,
                             "--plot", str(tmp_path / "history.png"))
    assert code == 0, err
    assert "PRUNED" in out and "COMPLETE" in out and "parameter importances" in out
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_trial_whose_images_disagree_with_their_classes_is_pruned_before_classify(capsys, tmp_path):
    storage = f"sqlite:///{tmp_path}/tune.db"
    # The tiny SD is random-init: the base CLIP assigns few of its images to their class (≈ 0.2 of 1.0).
    code, out, err = run_cli(capsys, "tune", "run", "--study", "q", "--storage", storage, "--trials", "1",
                             "--work", str(tmp_path / "work"), *CLIP_SEARCH, "--set", "tune.min_class_agreement=0.9")
    assert code == 0, err
    assert json.loads(out)["finished"] == 1
    [trial] = trials_of("q", storage)
    assert trial.state == TrialState.PRUNED and not trial.intermediate_values
    agreement = trial.user_attrs["synthetic_class_agreement"]
    assert agreement < 0.9 and trial.user_attrs["pruned_reason"] == (
        f"synthetic class agreement {agreement:.4f} < tune.min_class_agreement 0.9, before classify")
    assert not (tmp_path / "work" / "classifiers").exists()  # no classifier was trained
    run = MlflowClient().get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["optuna.state"] == "PRUNED" and run.data.tags["optuna.pruned_reason"].startswith("synthetic")
    code, _, err = run_cli(capsys, "tune", "run", "--study", "q2", "--storage", storage, "--trials", "1",
                           "--work", str(tmp_path / "work2"), *CLIP_SEARCH,
                           "--set", "tune.min_class_agreement=0.5", "--set", "assess.enabled=false")
    assert code == 2 and "tune.min_class_agreement=0.5 needs assess.enabled=true" in err


def test_journal_storage_without_mlflow(capsys, tmp_path):
    journal = tmp_path / "j" / "tune.log"
    code, out, err = run_cli(capsys, "tune", "run", "--study", "j", "--storage", f"journal:///{journal}",
                             "--trials", "2", "--experiment", "", "--work", str(tmp_path / "work"), *CLIP_SEARCH)
    assert code == 0, err
    assert journal.exists() and json.loads(out)["finished"] == 2
    code, out, _ = run_cli(capsys, "tune", "report", "--study", "j", "--storage", f"journal:///{journal}", "--json")
    assert [t["state"] for t in json.loads(out)["trials"]] == ["COMPLETE", "COMPLETE"]


# --- the cluster: PostgreSQL, several workers, dead workers ------------------------------------------------------


@pytest.mark.slow
def test_two_workers_share_a_postgres_study(capsys, tmp_path, mlflow_pg_s3, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_pg_s3.url)
    experiment = f"tune-{uuid.uuid4().hex[:8]}"
    with postgres_db("datadream_optuna") as storage:
        code, _, err = run_cli(capsys, "tune", "run", "--study", "pg", "--storage", storage, "--trials", "4",
                                 "--workers", "2", "--experiment", experiment, "--work", str(tmp_path / "work"))
        assert code == 0, err
        trials = trials_of("pg", storage)
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        # Each worker stops once 4 are finished; one may have started a 5th just before.
        assert 4 <= len(finished) <= 5 and len(trials) == len(finished)
        assert len({t.number for t in trials}) == len(trials)
        assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran trials
        runs = {t.user_attrs["mlflow_run_id"] for t in trials}
        assert len(runs) == len(trials)  # one MLflow run per trial, none shared, none lost
        client = MlflowClient(mlflow_pg_s3.url)
        for run_id in runs:
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED" and run.data.tags["optuna.study"] == "pg"
        cfg = load_config("tiny")
        path = tuning.write_best(optuna.load_study(study_name="pg", storage=storage), cfg, tmp_path / "best.yaml")
        assert set(load_config("tiny", [path]).adapt.model_dump()) >= {"rank", "lr"}


@pytest.mark.slow
def test_a_killed_workers_trial_is_retried_after_the_grace_period(capsys, tmp_path):
    with postgres_db("datadream_optuna") as storage:
        cmd = [sys.executable, "-m", "datadream.cli", "-q", "tune", "run", "--study", "kill", "--storage", storage,
               "--trials", "1", "--experiment", "", "--work", str(tmp_path / "work")]
        worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # wait until trial 0 is running and sending heartbeats
                try:
                    running = [t for t in trials_of("kill", storage) if t.state == TrialState.RUNNING]
                except KeyError:  # the study is not created yet
                    running = []
                if running and "work_dir" in running[0].user_attrs:
                    break
                assert worker.poll() is None, "the worker ended before it could be killed"
                time.sleep(0.2)
            else:
                pytest.fail("no trial started within 120 s")
            time.sleep(2)
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
        dead = running[0]
        assert trials_of("kill", storage)[dead.number].state == TrialState.RUNNING  # nobody knows yet
        time.sleep(load_config("tiny").tune.grace_s + 1)

        # The next worker fails the stale trial and runs it again with the same settings.
        code, _, err = run_cli(capsys, "tune", "run", "--study", "kill", "--storage", storage, "--trials", "1",
                                 "--experiment", "", "--work", str(tmp_path / "work"))
        assert code == 0, err
        trials = trials_of("kill", storage)
        assert trials[dead.number].state == TrialState.FAIL
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert retries[0].params == dead.params


def _record_worker(kwargs: dict, log_level: int) -> None:
    """A stand-in for a worker: what a spawned process sees of its job."""
    Path(kwargs["out"]).write_text(json.dumps({"argv": sys.argv, "storage": kwargs["storage_url"],
                                               "env": os.environ.get("OPTUNA_STORAGE"),
                                               "threads": os.environ.get("OMP_NUM_THREADS")}))


def test_storage_password_stays_out_of_worker_command_lines(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    url = "postgresql://u:pw@db/x"
    assert tuning.run_workers(1, target=_record_worker, storage_url=url, out=str(tmp_path / "seen.json")) == 0
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert "pw" not in " ".join(seen["argv"]) and seen["storage"] == url  # through the pipe, not argv
    assert seen["env"] is None and seen["threads"] == str(os.cpu_count() or 1)
    assert os.environ.get("OPTUNA_STORAGE") is None and "OMP_NUM_THREADS" not in os.environ
