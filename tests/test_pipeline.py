"""The compiled `datadream` pipeline (IR), its kfp.local run, and the `datadream pipeline` commands."""

import json
import re
from pathlib import Path

import kfp
import pytest
import yaml
from kfp_fake import FakeKFP

import components
from datadream.cli import main
from datadream.data.manifest import read_manifest
from pipelines.pipeline import ClusterSettings, compile_pipeline

GPU_STEPS = {"adapt", "generate", "classify"}
TOKEN = "kfp-token-do-not-print"


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    path = compile_pipeline(tmp_path_factory.mktemp("ir") / "datadream.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    return {"spec": docs[0], "platform": docs[1] if len(docs) > 1 else {}, "path": path}


def _tasks(dag: dict, components: dict, out: dict | None = None) -> dict:
    """Every task in the DAG, recursively through If/ParallelFor sub-DAGs: name -> task spec."""
    out = {} if out is None else out
    for name, task in dag["tasks"].items():
        out[name] = task
        sub = components[task["componentRef"]["name"]].get("dag")
        if sub:
            _tasks(sub, components, out)
    return out


def _step(task_name: str) -> str:
    return task_name.rsplit("-", 1)[0] if task_name[-1].isdigit() else task_name


def test_gpu_resources_and_placement_on_exactly_the_gpu_steps(ir):
    spec, platform = ir["spec"], ir["platform"]
    tasks = _tasks(spec["root"]["dag"], spec["components"])
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    steps = {_step(n): n for n in tasks if not n.startswith(("condition", "for-loop", "exit-handler"))}
    assert set(map(_step, steps)) == {"fewshot", "adapt", "generate", "gather", "gather-adapters", "classify",
                                      "evaluate", "summarize", "register", "finish"}
    for name, task in tasks.items():
        if name.startswith(("condition", "for-loop", "exit-handler")):
            continue
        executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        resources = executors[executor]["container"].get("resources", {})
        placement = k8s.get(executor, {})
        if _step(name) in GPU_STEPS:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
            assert resources["accelerator"]["resourceCount"] == "1"
            assert placement["nodeSelector"]["labels"] == {"datadream.io/node-pool": "gpu"}
            assert placement["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert placement["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
            assert task["retryPolicy"]["maxRetryCount"] == 2
        else:
            assert "accelerator" not in resources and "nodeSelector" not in placement, name
            assert "tolerations" not in placement
        # Settings and secrets come from the cluster, optional, never as parameters.
        assert placement["configMapAsEnv"][0]["configMapName"] == "datadream-config"
        assert placement["secretAsEnv"][0]["secretName"] == "datadream-secrets"


def test_fan_out_follows_the_gpus_parameter(ir):
    spec = ir["spec"]
    tasks = _tasks(spec["root"]["dag"], spec["components"])
    loops = {n: t for n, t in tasks.items() if n.startswith("for-loop")}
    shard_loops = [t for t in loops.values() if t.get("parameterIterator", {}).get("items", {}).get("inputParameter")
                   and "shard_list" in json.dumps(t)]
    assert len(shard_loops) == 2  # class-wise adapt+generate, dataset-wise generate
    # (inside the exit handler's sub-DAG the pipeline input arrives as a channel of the same name)
    assert tasks["fewshot"]["inputs"]["parameters"]["shards"]["componentInputParameter"] == "pipelinechannel--gpus"
    branches = {n: t["triggerPolicy"]["condition"] for n, t in tasks.items()
                if "condition" in t.get("triggerPolicy", {})}
    assert sorted(branches.values()) == sorted([
        "inputs.parameter_values['pipelinechannel--mode'] == 'class'",
        "!(inputs.parameter_values['pipelinechannel--mode'] == 'class')"])


def test_an_exit_handler_closes_the_mlflow_run_whatever_happens(ir):
    root = ir["spec"]["root"]["dag"]["tasks"]
    assert sorted(root) == ["exit-handler-1", "finish"]  # every step runs inside the handler
    finish = root["finish"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # runs after a failure too
    assert finish["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert finish["cachingOptions"] == {}


def test_caching_and_parameter_defaults(ir):
    spec = ir["spec"]
    tasks = _tasks(spec["root"]["dag"], spec["components"])
    assert tasks["fewshot"]["cachingOptions"] == {}  # reads a mutable location: never cached
    assert tasks["register"]["cachingOptions"] == {} and tasks["register-2"]["cachingOptions"] == {}
    assert tasks["adapt"]["cachingOptions"] == {"enableCache": True}
    # adapt's cache key carries the content hash of the few-shot manifests, not a location.
    assert tasks["adapt"]["inputs"]["parameters"]["data_hash"] == {
        "componentInputParameter": "pipelinechannel--fewshot-data_hash"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    defaults = {k: v.get("defaultValue") for k, v in params.items()}
    assert defaults == {
        "dataset": "demo", "shots": 16, "seed": 1, "mode": "class", "images_per_class": 500,
        "train_on": ["synthetic"], "gpus": 1, "sd_model": "stabilityai/stable-diffusion-2-1-base",
        "clip_model": "ViT-B-16", "clip_pretrained": "openai", "preset": "paper", "config": "",
        "register_name": "datadream", "promote_margin": 0.0, "promote_floor": 0.0, "deploy": False}
    # The register step deploys (when `deploy` is on) with the pipeline's own image, in the serving namespace.
    register = tasks["register"]["inputs"]["parameters"]
    assert register["deploy"] == {"componentInputParameter": "pipelinechannel--deploy"}
    assert register["serving_image"]["runtimeValue"]["constant"] == components.image_reference()
    assert register["serving_namespace"]["runtimeValue"]["constant"] == ClusterSettings().serving_namespace
    assert "token" not in json.dumps(params).lower() and "secret" not in json.dumps(params).lower()
    # The Kubeflow UI shows each parameter's description from the IR (the pipeline's "Args:" docstring).
    assert params["mode"]["description"].startswith('"class": one Stable Diffusion LoRA adapter per class')
    assert all(len(p.get("description", "")) > 20 for p in params.values()), params


def test_compile_is_deterministic_and_takes_cluster_settings(tmp_path, ir):
    again = compile_pipeline(tmp_path / "again.yaml")
    assert again.read_bytes() == ir["path"].read_bytes()
    custom = compile_pipeline(tmp_path / "custom.yaml", ClusterSettings(
        image="registry.example/dd:1.2.3", gpu_node_selector=("pool", "g6"), gpu_toleration=("gpu", "NoExecute")))
    docs = list(yaml.safe_load_all(custom.read_text()))
    images = {e["container"]["image"] for e in docs[0]["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/dd:1.2.3"}
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    selectors = [e["nodeSelector"]["labels"] for e in k8s.values() if "nodeSelector" in e]
    assert selectors and all(s == {"pool": "g6"} for s in selectors)
    # Lightweight components: the image carries kfp, nothing is pip-installed at run time.
    command = " ".join(next(iter(docs[0]["deploymentSpec"]["executors"].values()))["container"]["command"])
    assert "pip install" not in command
    assert "defaultPipelineRoot" not in docs[0]  # the cluster's default unless asked


def test_cli_compile_with_an_s3_pipeline_root(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["-q", "pipeline", "compile", "-o", str(out), "--pipeline-root", "s3://dd-artifacts/kfp/"]) == 0
    assert yaml.safe_load_all(out.read_text()).__next__()["defaultPipelineRoot"] == "s3://dd-artifacts/kfp"
    assert main(["-q", "pipeline", "compile", "-o", str(out), "--pipeline-root", "/local/root"]) == 2
    assert "--pipeline-root '/local/root': expected s3://bucket/prefix" in capsys.readouterr().err


def test_cli_compile_bad_input(tmp_path, capsys):
    out = str(tmp_path / "p.yaml")
    assert main(["-q", "pipeline", "compile", "-o", out, "--param", "shotz=3"]) == 2
    assert "no parameter 'shotz'" in capsys.readouterr().err
    assert main(["-q", "pipeline", "compile", "-o", out, "--image", ""]) == 2
    assert "--image ''" in capsys.readouterr().err
    assert main(["-q", "pipeline", "compile", "-o", out, "--gpu-taint", "nvidia.com/gpu"]) == 2
    assert main(["-q", "pipeline", "compile", "-o", out, "--param", "shots=8"]) == 0
    params = next(yaml.safe_load_all(Path(out).read_text()))["root"]["inputDefinitions"]["parameters"]
    assert params["shots"]["defaultValue"] == 8


@pytest.fixture
def kfp_home(monkeypatch, tmp_path):
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-sa-token"))


def test_cli_upload_submit_schedule_against_a_kfp_api(tmp_path, capsys, caplog, kfp_home):
    with FakeKFP(token=TOKEN) as server:
        base = ["pipeline"]
        conn = ["--host", server.url, "--token", TOKEN]
        assert main([*base, "upload", *conn]) == 0
        uploads = server.find("POST", "/apis/v2beta1/pipelines/upload")
        assert len(uploads) == 1
        spec = next(yaml.safe_load_all(next(iter(uploads[0].files.values()))[1]))
        assert spec["pipelineInfo"]["name"] == "datadream"
        version = server.find("POST", "/apis/v2beta1/pipelines/upload_version")[0].query["name"]
        assert version.startswith("0.1.0")

        assert main([*base, "submit", *conn, "--experiment", "nightly", "--param", "shots=4",
                     "--param", "mode=dataset"]) == 0
        run = server.find("POST", "/apis/v2beta1/runs")[0].json
        assert run["runtime_config"]["parameters"] == {"shots": 4, "mode": "dataset"}
        # With Kubernetes settings the package has two documents; both reach the server.
        assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "datadream"
        assert "nodeSelector" in json.dumps(run["pipeline_spec"]["platform_spec"])

        assert main([*base, "schedule", *conn, "--cron", "0 0 3 * * 1", "--param", "gpus=4"]) == 0
        rr = server.find("POST", "/apis/v2beta1/recurringruns")[0].json
        assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
        assert rr["max_concurrency"] in (1, "1") and rr["no_catchup"] is True
        assert rr["runtime_config"]["parameters"] == {"gpus": 4}
        assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in server.requests)
        seen = len(server.requests)

        # Bad input: one line, exit 2, and a bad cron or parameter never reaches the server.
        assert main(["-q", *base, "schedule", *conn, "--cron", "0 3 * * 1"]) == 2
        assert "6 fields" in capsys.readouterr().err.strip()
        assert main(["-q", *base, "submit", *conn, "--param", "nope=1"]) == 2
        assert "no parameter 'nope'" in capsys.readouterr().err
        assert len(server.requests) == seen
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err and all(TOKEN not in r.getMessage() for r in caplog.records)


def test_cli_unreachable_host(capsys, kfp_home):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["-q", "pipeline", "submit", "--host", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach" in err[0]


@pytest.mark.slow
def test_local_run_class_wise_over_two_shards(tmp_path, capsys):
    fast = ["--param", "gpus=2", "--param", "shots=2", "--param", "images_per_class=2",
            "--param", "register_name=ptest",
            "--param", 'train_on=["synthetic+real", "zero-shot"]',
            "--param", "config=adapt: {max_steps: 2}\ngenerate: {steps: 2}\nclassify: {epochs: 1}\n"]
    assert main(["-q", "pipeline", "run", "--local", "--root", str(tmp_path), *fast]) == 0
    run = Path(capsys.readouterr().out.strip())
    assert run.parent == tmp_path
    fewshot = json.loads((run / "fewshot" / "fewshot_set" / "fewshot.json").read_text())
    assert fewshot["shots"] == 2 and fewshot["classes"] == 6
    # Two shards, each adapting and generating its own three classes.
    adapters = sorted(run.glob("for-loop-*/adapt/adapters/adapter.json"))
    assert len(adapters) == 2
    shard_classes = [set(json.loads(p.read_text())["classes"]) for p in adapters]
    assert len(shard_classes[0]) == len(shard_classes[1]) == 3 and not shard_classes[0] & shard_classes[1]
    synthetic = read_manifest(run / "gather" / "synthetic" / "manifest.jsonl")
    assert len(synthetic) == 6 * 2 and {r.cls for r in synthetic} == shard_classes[0] | shard_classes[1]
    settings = {json.loads(p.read_text())["label"] for p in run.glob("for-loop-*/evaluate/scores/setting.json")}
    assert settings == {"synthetic+real (class-wise)", "zero-shot"}
    for metrics in run.glob("for-loop-*/evaluate/scores/metrics.json"):
        m = json.loads(metrics.read_text())
        assert m["n"] == 96 and sum(map(sum, m["confusion"])) == 96
    report = (run / "report.html").read_text()  # the summary, with a name and mode a browser opens
    assert report == (run / "summarize" / "report").read_text()
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in [run / "report.html", *run.glob("**/evaluate/report.html")])
    assert "<td>nothing (zero-shot)</td>" in report and "data:image/png;base64," in report
    assert '<th>adaptation</th><td class="text">class-wise' in report and "<th>shots per class</th>" in report
    assert re.search(r'<td class="text promoted">promoted: no champion yet', report)  # the gate's decision
    # Registered in the MLflow store the steps inherit ($MLFLOW_TRACKING_URI): the first classifier
    # version passes the gate (no champion yet); both models carry lineage tags.
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    champion = client.get_model_version_by_alias("ptest-classifier", "champion")
    assert champion.tags["mode"] == "class" and "test_top1" in champion.tags
    lineage = mlflow.artifacts.load_dict(f"runs:/{champion.run_id}/lineage/ptest-classifier.json")
    assert lineage["shots"] == "2" and lineage["train_on"] in {"synthetic+real", "zero-shot"}
    adapters = client.get_model_version_by_alias("ptest-sd-lora", "candidate")
    assert champion.tags["adapter_version"] == str(adapters.version)
    # The adapters the champion classifier came from are the adapters' champion.
    assert client.get_model_version_by_alias("ptest-sd-lora", "champion").version == adapters.version

    # One parent MLflow run for the pipeline run, finished by the register step, with one child per
    # stage task (per shard, per classifier), each with its params, metrics and artifacts.
    experiment = client.get_experiment_by_name("ptest")
    parents = client.search_runs([experiment.experiment_id], "tags.`datadream.kind` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.info.run_name == f"datadream class-wise {parent.data.tags['kfp.run_id'][:8]}"
    assert set(parent.data.metrics) >= {f"test_{k}/{s}" for k in ("top1", "top5")
                                        for s in ("synthetic-real", "zero-shot")}  # the runs table's columns
    assert champion.tags["mlflow_run_id"] == parent.info.run_id
    assert parent.data.tags["kfp.run_id"] == champion.tags["kfp_run_id"] and len(parent.data.tags["data_hash"]) == 64
    assert parent.data.params["adapt.rank"] and parent.data.params["generate.images_per_class"] == "2"
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = {r.data.tags["datadream.stage"]: r
                for r in client.search_runs([experiment.experiment_id],
                                            f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(children) == {"fewshot", "adapt 0/2", "adapt 1/2", "generate 0/2", "generate 1/2", "gather",
                             "classify synthetic+real", "classify zero-shot",
                             "evaluate synthetic+real", "evaluate zero-shot", "register"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert all(r.data.tags["data_hash"] == parent.data.tags["data_hash"] for r in children.values())
    adapt = children["adapt 0/2"]
    assert adapt.data.params["adapt.max_steps"] == "2"
    loss = client.get_metric_history(adapt.info.run_id, "loss")
    assert [m.step for m in loss] == [1, 2, 3, 4, 5, 6]  # 3 classes × 2 steps on one axis
    assert {a.path for a in client.list_artifacts(children["generate 1/2"].info.run_id)} >= {"samples.png"}
    # The synthetic set's quality: per shard on generate, over all classes on gather and (two figures) the
    # parent run; the report's section.
    quality = json.loads((run / "gather" / "synthetic" / "quality.json").read_text())
    gathered = children["gather"].data.metrics
    assert gathered["class_agreement"] == pytest.approx(quality["overall"]["class_agreement"])
    assert parent.data.metrics["synthetic_class_agreement"] == gathered["class_agreement"]
    assert parent.data.metrics["synthetic_fd_clip"] == gathered["fd_clip"]
    assert "class_agreement" in children["generate 0/2"].data.metrics
    assert "Synthetic set quality" in report
    ev = children["evaluate synthetic+real"]
    assert 0 <= ev.data.metrics["test_top1"] <= 1
    assert {a.path for a in client.list_artifacts(ev.info.run_id)} >= {
        "confusion_matrix.png", "per_class_accuracy.png", "per_class.json", "metrics.json"}
    clf = children["classify synthetic+real"]
    assert [m.step for m in client.get_metric_history(clf.info.run_id, "val_top1")] == [0, 1]


def test_run_local_leaves_print_and_logging_alone(monkeypatch, tmp_path):
    # kfp.local's per-task print and root-logger swapping interleaves across parallel tasks; run_local
    # restores both.
    import builtins
    import io
    import logging

    import pipelines.pipeline as pp

    original = builtins.print
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def fake_pipeline(**_):
        builtins.print = lambda *a, **k: original("    ", *a, **k)  # what a lost swap leaves behind
        root.handlers[:] = [logging.StreamHandler(io.StringIO())]  # a handler on the run's stdout
        root.setLevel(logging.INFO)
        (tmp_path / "datadream-run").mkdir()
        # written after the run folder on a first run: neither is the run folder
        (tmp_path / "mlartifacts").mkdir()
        (tmp_path / "mlflow.db").write_text("")

    monkeypatch.setattr(pp, "build_pipeline", lambda settings=None: fake_pipeline)
    monkeypatch.setattr("kfp.local.init", lambda **_: None)
    assert pp.run_local(tmp_path, {}) == tmp_path / "datadream-run"
    assert builtins.print is original
    assert root.handlers == handlers and root.level == level
