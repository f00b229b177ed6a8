"""The `datadream-tune` pipeline: its compiled IR and a kfp.local run with two workers on tiny."""

import os
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from test_pipeline import _step, _tasks

from datadream.cli import main
from pipelines.pipeline import compile_pipeline


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    path = compile_pipeline(tmp_path_factory.mktemp("ir") / "tune.yaml", name="datadream-tune")
    docs = list(yaml.safe_load_all(path.read_text()))
    return {"spec": docs[0], "platform": docs[1]}


def test_workers_on_gpus_and_the_best_run_nested(ir):
    spec = ir["spec"]
    k8s = ir["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = _tasks(spec["root"]["dag"], spec["components"])
    steps = {_step(n) for n in tasks if not n.startswith(("condition", "for-loop"))}
    assert {"tune-prepare", "tune-worker", "tune-best", "datadream"} <= steps
    # The nested datadream pipeline's steps are there too, under the run-best condition.
    assert {"fewshot", "adapt", "generate", "classify", "evaluate", "register"} <= steps
    worker = spec["components"][tasks["tune-worker"]["componentRef"]["name"]]["executorLabel"]
    assert spec["deploymentSpec"]["executors"][worker]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert k8s[worker]["nodeSelector"]["labels"] == {"datadream.io/node-pool": "gpu"}
    # The study storage (a database password) comes from the Secret, never from a parameter default.
    assert "OPTUNA_STORAGE" in {e["envVar"] for e in k8s[worker]["secretAsEnv"][0]["keyToEnv"]}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["storage"]["defaultValue"] == "" and params["workers"]["defaultValue"] == 2
    assert params["trials"]["description"].startswith("Finished trials the campaign should reach")
    assert params["shots"]["description"].startswith("Real images per class")  # the datadream pipeline's
    assert all(p.get("description") for p in params.values())
    for name in ("tune-prepare", "tune-worker", "tune-best"):
        assert tasks[name]["cachingOptions"] == {}, name  # never replayed from cache: the study is outside KFP


def test_a_password_in_the_storage_parameter_is_refused(monkeypatch):
    from datadream import tuning
    from datadream.errors import UserError

    with pytest.raises(UserError, match="holds a password; put the URL in the datadream-secrets Secret"):
        tuning.storage_from("postgresql://optuna:hunter2@db/optuna")
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    with pytest.raises(UserError, match="no \\$OPTUNA_STORAGE"):
        tuning.storage_from("")
    monkeypatch.setenv("OPTUNA_STORAGE", "postgresql://optuna:hunter2@db/optuna")
    assert tuning.storage_from("") == "postgresql://optuna:hunter2@db/optuna"


@pytest.mark.slow
def test_local_campaign_with_two_workers_then_the_best_run(tmp_path, capsys, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("OPTUNA_STORAGE", storage)
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]  # the session's store, which the kfp.local tasks inherit
    args = ["-q", "pipeline", "run", "--local", "--pipeline", "datadream-tune", "--root", str(tmp_path / "root"),
            "--param", "study=local", "--param", "trials=2", "--param", "workers=2",
            "--param", "register_name=tl", "--param", "config=generate: {images_per_class: 2}\n"]
    assert main(args) == 0
    run = Path(capsys.readouterr().out.strip())
    study = optuna.load_study(study_name="local", storage=storage)
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert 2 <= len(finished) <= 3 and len({t.user_attrs["worker"] for t in study.trials}) == 2
    best = yaml.safe_load(next(run.glob("**/tune-best/best")).read_text())
    assert best["adapt"]["rank"] == study.best_params["adapt.rank"]
    # The run with the best settings went through the gate: first version, so champion.
    client = MlflowClient(tracking_uri)
    champion = client.get_model_version_by_alias("tl-classifier", "champion")
    parent = client.get_run(champion.tags["mlflow_run_id"])
    assert parent.data.params["adapt.rank"] == str(study.best_params["adapt.rank"])
    campaign = client.search_runs([client.get_experiment_by_name("tl-tune").experiment_id],
                                  "tags.`optuna.study` = 'local' and tags.`datadream.kind` = 'pipeline'")
    assert len(campaign) == 1 and campaign[0].data.tags["optuna.best_trial"] == str(study.best_trial.number)
