"""MLflow tracking against a real server (Postgres + artifacts proxied to S3 on moto) and the SQLite default."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from datadream import tracking
from datadream.errors import UserError
from datadream.io import sha256_json

# The server fixtures (mlflow_pg_s3, mlflow_sqlite, …) come from tests/servers.py, registered in conftest.py.


@pytest.fixture(autouse=True)
def restore_tracking(monkeypatch):
    """check_tracking() sets the process-wide URI (and $MLFLOW_TRACKING_URI); give both back afterwards."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    yield
    leaked = []
    while (run := mlflow.active_run()) is not None:
        leaked.append(run.info.run_id)
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    assert not leaked, f"test left active runs: {leaked}"


@pytest.fixture(params=["sqlite", "server"])
def store(request):
    """(tracking URI, server or None): every test using it runs against both stores."""
    if request.param == "sqlite":
        return request.getfixturevalue("mlflow_sqlite"), None
    server = request.getfixturevalue("mlflow_pg_s3")
    return server.url, server


def _tags(cfg, kfp_run_id: str | None = None) -> dict:
    return {
        "kfp.run_id": kfp_run_id or uuid.uuid4().hex,
        "git_sha": "0123abc",
        "config_hash": sha256_json(cfg.to_dict()),
        "data_hash": "d" * 64,
    }


def _children(client: MlflowClient, parent_id: str) -> list:
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_hierarchy_params_metrics_artifacts(store, tiny, tmp_path):
    uri, server = store
    assert tracking.check_tracking(uri) == uri
    cfg = tiny()
    experiment = f"datadream-test-{uuid.uuid4().hex[:8]}"
    tags = _tags(cfg)
    parent_id = tracking.start_pipeline_run(experiment, tags, params={"fewshot": cfg.to_dict()["fewshot"]},
                                            run_name=tracking.pipeline_run_name("class", tags["kfp.run_id"]))

    picture = Image.new("RGB", (8, 8), (200, 30, 30))
    with tracking.stage_run(parent_id, "adapt", cfg.to_dict()["adapt"], tags={"shard": "0"}) as run:
        adapt_id = run.info.run_id
        for step in range(3):
            tracking.log_step_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
        tracking.log_final_metrics({"steps": 3})
        tracking.log_image(picture, "samples/class0.png")
        tracking.log_json({"top1": 0.5, "classes": ["a", "b"]}, "metrics.json")
        tracking.log_config(cfg)
        extra = tmp_path / "adapter.json"
        extra.write_text('{"rank": 4}')
        tracking.log_artifact_file(extra, "adapters")
    with tracking.stage_run(parent_id, "evaluate", cfg.to_dict()["evaluate"], tags={}):
        tracking.log_final_metrics({"top1": 0.75, "top5": 1.0})
    results = [{"train_on": "synthetic+real", "top1": 0.75, "top5": 1.0}, {"train_on": "zero-shot", "top1": 0.25}]
    tracking.log_final_metrics(tracking.result_metrics(results), parent_id)
    tracking.finish_pipeline_run(parent_id)

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert {k: parent.data.tags[k] for k in tags} == tags
    assert parent.data.tags[tracking.KIND_TAG] == "pipeline"
    # The runs table: named with the mode, each classifier's test accuracy as a column to compare.
    assert parent.info.run_name == f"datadream class-wise {tags['kfp.run_id'][:8]}"
    assert parent.data.metrics == {"test_top1/synthetic-real": 0.75, "test_top5/synthetic-real": 1.0,
                                   "test_top1/zero-shot": 0.25}
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.params == {"fewshot.shots": str(cfg.fewshot.shots), "fewshot.seed": str(cfg.fewshot.seed)}

    children = {r.data.tags[tracking.STAGE_TAG]: r for r in _children(client, parent_id)}
    assert set(children) == {"adapt", "evaluate"}
    adapt = children["adapt"]
    assert adapt.info.run_id == adapt_id and adapt.info.status == "FINISHED"
    assert adapt.info.experiment_id == parent.info.experiment_id
    assert adapt.data.tags["mlflow.parentRunId"] == parent_id
    assert adapt.data.tags["shard"] == "0"
    assert {k: adapt.data.tags[k] for k in tags} == tags  # inherited from the parent
    # The stage's section flattened, then the whole config from log_config (same values, no conflicts).
    assert adapt.data.params["adapt.rank"] == str(cfg.adapt.rank)
    assert adapt.data.params["adapt.unet_targets"] == json.dumps(cfg.adapt.unet_targets)
    assert adapt.data.params["adapt.train_text_encoder"] == json.dumps(cfg.adapt.train_text_encoder)
    assert adapt.data.params == tracking.flatten(cfg.to_dict())
    evaluate = children["evaluate"]
    assert evaluate.data.params == tracking.flatten(cfg.to_dict()["evaluate"], "evaluate")
    assert evaluate.data.metrics == {"top1": 0.75, "top5": 1.0}

    history = client.get_metric_history(adapt_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert adapt.data.metrics["steps"] == 3

    expected = {"samples/class0.png", "metrics.json", "config.yaml", "adapters/adapter.json"}
    assert _artifact_paths(client, adapt_id) == expected
    config_file = mlflow.artifacts.download_artifacts(run_id=adapt_id, artifact_path="config.yaml", dst_path=tmp_path)
    assert yaml.safe_load(Path(config_file).read_text()) == cfg.to_dict()
    png = mlflow.artifacts.download_artifacts(run_id=adapt_id, artifact_path="samples/class0.png", dst_path=tmp_path)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.getpixel((0, 0)) == (200, 30, 30)
    metrics = mlflow.artifacts.download_artifacts(run_id=adapt_id, artifact_path="metrics.json", dst_path=tmp_path)
    assert json.loads(Path(metrics).read_text()) == {"top1": 0.5, "classes": ["a", "b"]}

    if server is None:
        # The embedded store keeps artifacts beside the database, not in ./mlruns of the working dir.
        db_dir = Path(uri[len("sqlite:///") :]).parent
        assert adapt.info.artifact_uri.startswith((db_dir / "mlartifacts").as_uri())
    else:
        # Proxied artifacts: clients hold no S3 credentials, the server wrote the objects to the bucket.
        assert adapt.info.artifact_uri.startswith("mlflow-artifacts:")
        prefix = f"{server.prefix}/{parent.info.experiment_id}/{adapt_id}/artifacts/"
        assert {k[len(prefix) :] for k in server.list_keys(prefix)} == expected


def test_reattach_after_retry_and_crash(store, tiny):
    uri, _ = store
    tracking.check_tracking(uri)
    cfg = tiny()
    experiment = f"datadream-test-{uuid.uuid4().hex[:8]}"
    tags = _tags(cfg)

    first = tracking.start_pipeline_run(experiment, tags, params={"run": {"seed": 1}})
    again = tracking.start_pipeline_run(experiment, tags, params={"run": {"seed": 1}})
    other = tracking.start_pipeline_run(experiment, {**tags, "kfp.run_id": uuid.uuid4().hex})
    assert again == first != other
    client = MlflowClient(uri)
    assert client.get_run(first).data.tags[tracking.ATTEMPT_TAG] == "2"

    section = cfg.to_dict()["generate"]
    with pytest.raises(RuntimeError, match="CUDA out of memory"), tracking.stage_run(first, "generate", section) as run:
        crashed_id = run.info.run_id
        tracking.log_step_metrics({"images": 10}, step=0)
        raise RuntimeError("CUDA out of memory")
    crashed = client.get_run(crashed_id)
    assert crashed.info.status == "FAILED"
    assert crashed.data.tags[tracking.ERROR_TAG] == "RuntimeError: CUDA out of memory"
    assert mlflow.active_run() is None

    with tracking.stage_run(first, "generate", section) as run:
        assert run.info.run_id == crashed_id
        tracking.log_step_metrics({"images": 20}, step=1)
    resumed = client.get_run(crashed_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags[tracking.ATTEMPT_TAG] == "2"
    assert tracking.ERROR_TAG not in resumed.data.tags
    assert [m.value for m in sorted(client.get_metric_history(crashed_id, "images"), key=lambda m: m.step)] == [10, 20]
    assert [r.info.run_id for r in _children(client, first)] == [crashed_id]
    assert _children(client, other) == []


def test_stage_run_in_another_process(store, tiny):
    """A KFP task is another process (another pod): it only gets the parent run id."""
    uri, _ = store
    tracking.check_tracking(uri)
    parent_id = tracking.start_pipeline_run(f"datadream-test-{uuid.uuid4().hex[:8]}", _tags(tiny()))
    script = textwrap.dedent(f"""
        from datadream import tracking
        tracking.check_tracking({uri!r})
        with tracking.stage_run({parent_id!r}, "classify", {{"rank": 4}}) as run:
            tracking.log_final_metrics({{"val_top1": 0.5}})
        print("CHILD", run.info.run_id)
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    child_id = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("CHILD "))
    child = MlflowClient(uri).get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.params == {"classify.rank": "4"}
    assert child.data.metrics == {"val_top1": 0.5} and child.info.status == "FINISHED"


def test_unreachable_server_fails_fast_without_credentials():
    from servers import closed_port_url  # after pytest_plugins imported it (with assertion rewriting)

    url = closed_port_url().replace("http://", "http://alice:s3cret@")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        tracking.check_tracking(url, timeout_s=5)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"MLflow tracking server http://***@{url.rsplit('@', 1)[1]}: unreachable (")
    assert "Connection refused" in message
    assert "s3cret" not in message and "alice" not in message


def test_silent_server_times_out_fast():
    """Something listening that never answers (a hung server, a blackholing firewall)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(UserError, match=r"unreachable \(no answer within 1 s\)$"):
            tracking.check_tracking(url, timeout_s=1)
        assert time.monotonic() - start < 4


def test_unreachable_server_from_environment(monkeypatch):
    from servers import closed_port_url

    url = closed_port_url()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    with pytest.raises(UserError, match="unreachable"):
        tracking.check_tracking(timeout_s=2)


def test_disallowed_host_header_is_a_clear_error(mlflow_pg_s3):
    """The session server allows only Host 127.0.0.1:*; the same server reached as `localhost` answers
    /health (exempt) but refuses every API call with 403 "Invalid Host header"."""
    port = mlflow_pg_s3.url.rsplit(":", 1)[1]
    url = f"http://bob:hunter2@localhost:{port}"
    with pytest.raises(UserError) as err:
        tracking.check_tracking(url, timeout_s=5)
    message = str(err.value)
    assert "\n" not in message
    assert "HTTP 403" in message and "Invalid Host header" in message
    assert f"'localhost:{port}'" in message and "--allowed-hosts" in message
    assert "hunter2" not in message and "bob" not in message
    assert tracking.check_tracking(mlflow_pg_s3.url) == mlflow_pg_s3.url


def test_default_is_sqlite_in_the_working_dir(monkeypatch, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = tracking.check_tracking()
    assert uri == f"sqlite:///{work.resolve()}/mlflow.db"
    assert mlflow.get_tracking_uri() == uri

    nested = tmp_path / "a" / "b" / "mlflow.db"
    assert tracking.check_tracking(f"sqlite:///{nested}") == f"sqlite:///{nested}"
    assert nested.parent.is_dir()


def test_helpers_without_a_run_do_nothing(tmp_path):
    tracking.log_step_metrics({"loss": 1.0}, step=0)
    tracking.log_final_metrics({"top1": 1.0})
    tracking.log_json({"a": 1}, "a.json")
    tracking.log_text("<p>", "r.html")
    tracking.log_table({"a": [1]}, "t.json")
    tracking.set_tags({"a": "b"})
    tracking.log_image(Image.new("RGB", (2, 2)), "x.png")
    with tracking.StepMetrics() as metrics:
        metrics.add({"loss": 1.0}, 1)
    with tracking.tracked_stage("", "adapt", {"rank": 4}) as run:  # untracked pipeline: no run, no store check
        assert run is None
    assert mlflow.active_run() is None


def test_step_metrics_are_buffered_and_flushed(mlflow_sqlite, tiny):
    tracking.check_tracking(mlflow_sqlite)
    client = MlflowClient(mlflow_sqlite)
    parent = tracking.start_pipeline_run(f"datadream-test-{uuid.uuid4().hex[:8]}", _tags(tiny()))
    with tracking.tracked_stage(parent, "adapt 0/2", {"rank": 4}, prefix="adapt") as run:
        with tracking.StepMetrics(every_s=3600, max_buffer=5) as metrics:
            for step in range(1, 8):
                metrics.add({"loss": 1 / step, "lr": None}, step)  # None values are skipped
            # 5 buffered steps went out in one batch when the buffer filled; the rest wait for the exit.
            assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5]
        history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 8)) and history[-1].value == pytest.approx(1 / 7)
    child = client.get_run(run.info.run_id)
    assert "lr" not in child.data.metrics and child.data.params == {"adapt.rank": "4"}
    assert child.data.tags["datadream.stage"] == "adapt 0/2" and child.info.status == "FINISHED"


def test_tracked_stage_checks_the_store_first(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(UserError, match="unreachable"), tracking.tracked_stage("0" * 32, "adapt", {}):
        pass


def test_credentials_are_redacted():
    assert tracking.redact("http://user:pw@host:5000/x") == "http://***@host:5000/x"
    assert tracking.redact("see postgresql+psycopg2://mlflow:secret@db/mlflow now") == (
        "see postgresql+psycopg2://***@db/mlflow now"
    )
    assert tracking.redact("https://b.s3.amazonaws.com/k?X-Amz-Signature=abc&x=1") == (
        "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&x=1"
    )
    assert tracking.flatten({"a": {"b": [1, 2], "c": None, "d": "s"}}) == {"a.b": "[1, 2]", "a.c": "null", "a.d": "s"}


def test_params_never_hold_credentials(mlflow_sqlite):
    tracking.check_tracking(mlflow_sqlite)
    run_id = tracking.start_pipeline_run(
        "datadream-test-redact",
        {"kfp.run_id": "r1", "dataset": "https://u:p4ss@example.com/data"},
        params={"data": {"uri": "s3://bucket/x", "mirror": "http://u:p4ss@mirror/sd"}},
    )
    run = MlflowClient(mlflow_sqlite).get_run(run_id)
    assert run.data.params == {"data.uri": "s3://bucket/x", "data.mirror": "http://***@mirror/sd"}
    assert run.data.tags["dataset"] == "https://***@example.com/data"
    buf = io.StringIO()
    json.dump(run.data.to_dictionary(), buf)
    assert "p4ss" not in buf.getvalue()
