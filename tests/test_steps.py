"""The steps layer: every entry point runs the same step, tracked the same way."""

import json

import pytest

from datadream import artifacts, steps
from datadream.cli import main
from datadream.errors import UserError


def test_artifacts_open_only_finished_folders(tmp_path, fewshot_set):
    fs = artifacts.FewShotSet.open(fewshot_set)
    assert fs.meta["classes"] == len(fs.classes()) and fs.manifest("test").is_file()
    assert len(fs.data_hash) == 64
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match=r"no classifier\.json \(not a finished classify output"):
        artifacts.Classifier.open(tmp_path / "half")
    with pytest.raises(UserError, match="split 'dev'"):
        fs.manifest("dev")


def test_untracked_steps_import_no_mlflow(tmp_path, monkeypatch):
    # Without a tracking URI or a parent run a step is untracked, and opens no run anywhere.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tracking = steps.Tracking()
    assert not tracking.enabled
    with tracking.step("x", {"a": 1}) as run:
        assert not run
        run.metrics({"m": 1.0})  # a no-op


@pytest.mark.slow
def test_cli_classify_logs_its_run_when_a_tracking_uri_is_set(tmp_path, monkeypatch, fewshot_set, mlflow_sqlite):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "cli-steps")
    out = tmp_path / "clf"
    assert main(["-q", "classify", "--preset", "tiny", "--fewshot", str(fewshot_set), "--train-on", "real",
                 "--set", "classify.epochs=2", "--out", str(out)]) == 0
    mlflow.set_tracking_uri(mlflow_sqlite)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("cli-steps")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["datadream.stage"] == "classify real"
    assert run.data.params["classify.epochs"] == "2" and run.data.params["classify.train_on"] == "real"
    history = client.get_metric_history(run.info.run_id, "val_top1")
    clf = json.loads((out / "classifier.json").read_text())
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert {m.step: m.value for m in history} == {h["epoch"]: h["val_top1"] for h in clf["history"]}
    assert run.data.metrics["best_val_top1"] == clf["best_val_top1"]
    assert "classifier.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_adapt_refuses_an_unknown_prediction_type_before_claiming_its_folder(tmp_path, tiny, fewshot_set):
    import shutil

    from datadream.models.sd import resolve_sd

    cfg = tiny()
    model = tmp_path / "sd"
    shutil.copytree(resolve_sd(cfg.models), model)
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "sample"}))
    cfg = tiny(f"models.sd={model}")
    with pytest.raises(UserError, match=r"prediction_type 'sample' is not supported; expected one of epsilon"):
        steps.adapt(cfg, fewshot_set, tmp_path / "adapters")
    assert not (tmp_path / "adapters").exists()


def test_a_user_error_is_final_for_retries(tmp_path):
    calls = []

    def attempt():
        with steps.final_user_errors(str(tmp_path / "task" / "out")):
            calls.append(1)
            raise UserError("--dataset /x: folder not found")

    for _ in range(2):  # the second attempt (a KFP retry) fails at once, with the same line
        with pytest.raises(UserError, match=r"^--dataset /x: folder not found$"):
            attempt()
    assert len(calls) == 1
    assert steps.user_error_notes(tmp_path) == ["--dataset /x: folder not found"]


@pytest.mark.slow
def test_a_failing_pipeline_fails_once_and_closes_its_mlflow_run(tmp_path, monkeypatch, capsys, mlflow_sqlite):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite)
    missing = tmp_path / "no-such-dataset"
    code = main(["-q", "pipeline", "run", "--local", "--root", str(tmp_path / "runs"),
                 "--param", f"dataset={missing}", "--param", "register_name=failing"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and str(missing) in err[-1] and "not found" in err[-1], err[-3:]
    (note,) = (tmp_path / "runs").rglob("*.user-error")  # beside the fewshot step's output
    assert note.read_text().strip() in err[-1]
    client = MlflowClient(mlflow_sqlite)
    experiment = client.get_experiment_by_name("failing")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`datadream.kind` = 'pipeline'")
    assert parent.info.status == "FAILED"  # closed by the exit handler, not left RUNNING
    assert parent.data.tags["datadream.failed_steps"] == "fewshot"
    assert "not found" in parent.data.tags["datadream.error"]
