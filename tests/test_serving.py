"""Serving the champion classifier on Kubernetes: the rendered manifests (schemas, checkov, agreement with
infra/terraform/modules/serving), `datadream registry deploy|promote --deploy|rollback --deploy` against a
fake Kubernetes API server on loopback (tests/k8s_fake.py), and the errors (no champion, cluster
unreachable, RBAC refusal, a rollout that never gets ready)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from k8s_fake import FakeKubernetes, write_kubeconfig
from mlflow import MlflowClient
from servers import closed_port_url

from datadream import cli, registry
from datadream.serving import manifests
from datadream.serving.manifests import ServingSettings

ROOT = Path(__file__).resolve().parents[1]
NS = manifests.DEFAULT_NAMESPACE
TOKEN = "deployer-token"
K8S_VERSION = "1.33.0"  # infra/terraform variables.tf kubernetes_version


# --- manifests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gpu", [False, True])
def test_rendered_manifests_validate_against_kubernetes_schemas(gpu):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = manifests.render("pets", "7", ServingSettings(image=manifests.EXAMPLE_IMAGE, gpu=gpu))
    assert [o["kind"] for o in objects] == ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises on unknown or mistyped fields
    # A wrong field really is caught (the validator is not a no-op).
    broken = json.loads(json.dumps(objects[0]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_pod_template_pins_the_version_and_serves_it_safely():
    dep, svc, hpa, pdb = manifests.render("pets", "7", ServingSettings(image="img:1"))
    pod = dep["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["command"] + container["args"] == manifests.server_command(
        "models:/pets-classifier/7", 8080, 1)
    assert pod["metadata"]["labels"][manifests.VERSION_LABEL] == "7"
    env = {e["name"]: e for e in container["env"]}
    assert env[manifests.MODEL_VERSION_ENV]["value"] == "7"
    from datadream.serving.classifier_model import MODEL_VERSION_ENV
    assert manifests.MODEL_VERSION_ENV == MODEL_VERSION_ENV
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "datadream-secrets", "key": key}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "datadream-config"
    # Rolling update that never drops below the serving pods; the HPA owns the replica count.
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert "replicas" not in dep["spec"]
    # Selectors never carry the version: old and new pods are one Service's endpoints.
    for selector in (dep["spec"]["selector"]["matchLabels"], svc["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert manifests.VERSION_LABEL not in selector
        assert selector.items() <= pod["metadata"]["labels"].items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"] == "pets-classifier"
    # Probes on the scoring server's health endpoints; non-root, read-only root filesystem.
    assert container["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    gpu = manifests.render("pets", "7", ServingSettings(image="img:1", gpu=True))[0]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] == {"datadream.io/node-pool": "gpu"}
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_serving_names_match_the_pipeline_and_registry_cli():
    from datadream import registry_cli
    from pipelines.pipeline import ClusterSettings

    s = ClusterSettings()
    assert (s.config_map, s.secret) == (manifests.CONFIG_MAP, manifests.SECRET)
    assert set(manifests.SECRET_KEYS) <= set(s.secret_keys)
    assert set(manifests.CONFIG_KEYS) <= set(s.config_map_keys)
    assert s.gpu_node_selector == ServingSettings.gpu_node_selector
    assert s.gpu_toleration == ServingSettings.gpu_toleration
    assert registry_cli.DEFAULT_NAMESPACE == NS


def test_bad_names_and_settings_are_user_errors():
    from datadream.errors import UserError

    with pytest.raises(UserError, match="Kubernetes object name"):
        manifests.render("x" * 60, "1", ServingSettings(image="img:1"))
    with pytest.raises(UserError, match="replicas"):
        manifests.render("pets", "1", ServingSettings(image="img:1", min_replicas=3, max_replicas=2))
    with pytest.raises(UserError, match="--image"):
        manifests.render("pets", "1", ServingSettings(image="bad image"))


def test_infra_example_is_current():
    path = ROOT / "infra" / "serving" / "classifier.yaml"
    assert path.read_text() == manifests.example(), \
        "regenerate: python -m datadream.serving.manifests > infra/serving/classifier.yaml"


def test_terraform_serving_module_matches_the_manifests():
    pytest.importorskip("hcl2")
    from test_infra import TF, blocks, local_values

    module = blocks("module", TF / "main.tf")["serving"]
    assert module["source"] == "./modules/serving"
    assert (module["service_account"], module["config_map"], module["secret"], module["port"]) == (
        manifests.SERVICE_ACCOUNT, manifests.CONFIG_MAP, manifests.SECRET, ServingSettings.port)
    assert local_values(TF / "main.tf")["serving_namespace"] == NS
    res = blocks("resource", TF / "modules" / "serving" / "main.tf")
    assert set(res["kubernetes_secret_v1"]["datadream"]["data"]) == set(manifests.SECRET_KEYS)
    assert set(res["kubernetes_config_map_v1"]["datadream"]["data"]) == set(manifests.CONFIG_KEYS)
    policy = res["kubernetes_network_policy_v1"]["serving"]["spec"][0]
    selected = policy["pod_selector"][0]["match_labels"]
    pod_labels = manifests.render("pets", "1", ServingSettings(image="img:1"))[0]["spec"]["template"]["metadata"]
    assert selected.items() <= pod_labels["labels"].items()
    # The deployer Role grants what deploy.py calls: every kind it applies, pods and events to explain failures.
    rules = res["kubernetes_role_v1"]["deployer"]["rule"]
    granted = {(g, r): set(rule["verbs"]) for rule in rules for g in rule["api_groups"] for r in rule["resources"]}
    for key in (("apps", "deployments"), ("", "services"), ("autoscaling", "horizontalpodautoscalers"),
                ("policy", "poddisruptionbudgets")):
        assert {"get", "create", "patch", "delete"} <= granted[key], key
    assert {"list"} <= granted[("", "pods")] and {"list"} <= granted[("", "events")]
    # The serving pods reach MLflow through its NetworkPolicy.
    assert "${local.serving_namespace}" in blocks("module", TF / "main.tf")["mlflow"]["client_namespaces"]


def _checkov_bin() -> Path:
    from test_infra import _checkov_bin as find

    return find()


def test_checkov_passes_the_serving_manifests():
    cmd = [str(_checkov_bin()), "-d", str(ROOT / "infra" / "serving"), "--framework", "kubernetes", "--quiet",
           "--compact", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}"
              for c in report.get("results", {}).get("failed_checks", [])]
    assert not failed and report["summary"]["failed"] == 0, "\n".join(failed)
    assert report["summary"]["passed"] >= 60, report["summary"]
    # Every accepted finding carries a reason.
    assert report["summary"]["skipped"] == len(manifests.CHECKOV_SKIPS)
    for skip in manifests.CHECKOV_SKIPS.values():
        assert re.fullmatch(r"CKV2?_K8S_\d+=.{30,}", skip), skip


# --- registry deploy against the fake cluster -------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_db(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('serving-registry') / 'mlflow.db'}"


@pytest.fixture
def store(registry_db, request, tmp_path, monkeypatch):
    """(tracking URI, NAME): a registered NAME-classifier with versions 1-3 and no champion, in a SQLite
    registry shared by the module (model files are never loaded here)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_db)
    name = "t" + hashlib.sha256(request.node.name.encode()).hexdigest()[:8]  # one registered model per test
    client = MlflowClient(tracking_uri=registry_db)
    client.create_registered_model(f"{name}-classifier")
    for _ in range(3):
        client.create_model_version(f"{name}-classifier", str(tmp_path))
    return registry_db, name


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    with FakeKubernetes(namespaces={NS}, token=TOKEN) as api:
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", api.url, TOKEN)))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield api


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout, stderr of `datadream registry ARGV` (-q: warnings and errors only)."""
    code = cli.main(["-q", "registry", *argv, "--image", "ghcr.io/x/datadream:1", "--timeout", "5"])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The failure is one line, the last one on stderr (warnings may come before it)."""
    lines = err.splitlines()
    errors = [x for x in lines if x.startswith("datadream registry: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def test_deploy_dry_run_prints_the_champion_manifests(store, capsys):
    uri, name = store
    registry.promote(name, "2", tracking_uri=uri)
    code, out, err = run_cli(capsys, "deploy", name, "--dry-run")
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    assert docs[0]["spec"]["template"]["spec"]["containers"][0]["args"][3] == f"models:/{name}-classifier/2"
    # --alias picks another alias; --gpu asks for a GPU.
    MlflowClient(tracking_uri=uri).set_registered_model_alias(f"{name}-classifier", "canary", "3")
    code, out, _ = run_cli(capsys, "deploy", name, "--dry-run", "--alias", "canary", "--gpu")
    dep = next(yaml.safe_load_all(out))
    assert dep["spec"]["template"]["metadata"]["labels"][manifests.VERSION_LABEL] == "3"
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_no_champion_is_one_line_exit_2(store, capsys):
    _, name = store
    code, out, err = run_cli(capsys, "deploy", name, "--dry-run")
    assert code == 2 and out == ""
    assert "has no 'champion' yet" in one_error_line(err)


def test_deploy_creates_then_promote_and_rollback_patch_the_pinned_version(store, cluster, capsys):
    uri, name = store
    registry.promote(name, "1", tracking_uri=uri)
    code, out, err = run_cli(capsys, "deploy", name, "--namespace", NS)
    assert code == 0, err
    assert "version 1 serving" in out and "first deploy" in out
    obj = f"{name}-classifier"
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert cluster.get(kind, NS, obj) is not None, kind
    dep = cluster.get("Deployment", NS, obj)
    assert dep["spec"]["replicas"] == ServingSettings.min_replicas  # a create starts at the HPA's minimum
    assert cluster.served_version(NS, obj) == "1"
    assert all(r.query.get("fieldManager") == "datadream" for r in cluster.requests if r.method in ("POST", "PATCH"))

    # The HPA scaled out meanwhile: deploys never touch spec.replicas.
    cluster.objects[("Deployment", NS, obj)]["spec"]["replicas"] = 5
    before = len(cluster.requests)
    code, out, err = run_cli(capsys, "promote", name, "2", "--deploy")
    assert code == 0, err
    assert "champion 1 -> 2" in out and "version 2 serving" in out and "was 1" in out
    patches = [r for r in cluster.requests[before:] if r.method == "PATCH"]
    assert [r.path.rsplit("/", 2)[1] for r in patches] == ["deployments"]  # the rest had nothing to change
    ops = patches[0].json
    assert ops[0]["op"] == "test" and ops[0]["path"] == "/metadata/resourceVersion"
    assert {"op": "add", "path": "/spec/template", "value": manifests.deployment(
        name, "2", ServingSettings(image="ghcr.io/x/datadream:1"))["spec"]["template"]} in ops
    assert not any(op["path"].startswith("/spec/replicas") for op in ops)
    dep = cluster.get("Deployment", NS, obj)
    assert dep["spec"]["replicas"] == 5 and cluster.served_version(NS, obj) == "2"
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"][3] == f"models:/{name}-classifier/2"

    code, out, err = run_cli(capsys, "rollback", name, "--deploy")
    assert code == 0, err
    assert "champion 2 -> 1 (rolled back)" in out and "version 1 serving" in out
    assert cluster.history(NS, obj) == ["1", "2", "1"]
    assert MlflowClient(tracking_uri=uri).get_registered_model(f"{name}-classifier").aliases["champion"] == 1

    # Deploying what already serves changes nothing.
    before = len(cluster.requests)
    code, out, _ = run_cli(capsys, "deploy", name)
    assert code == 0 and "already serving" in out
    assert [r.method for r in cluster.requests[before:]] == ["GET"] * (len(cluster.requests) - before)


def test_a_rollout_that_never_gets_ready_is_undone(store, cluster, capsys):
    uri, name = store
    registry.promote(name, "1", tracking_uri=uri)
    assert run_cli(capsys, "deploy", name)[0] == 0
    cluster.broken_versions.add("2")
    code, _, err = run_cli(capsys, "promote", name, "2", "--deploy", "--timeout", "1")
    assert code == 1
    err = one_error_line(err)
    assert "version 2 not ready after the timeout" in err and "rolled back to version 1" in err
    assert "Startup probe failed" in err and f"{name}-classifier-v2-0" in err  # the new pod's last event
    assert "champion moved back to version 1" in err
    obj = f"{name}-classifier"
    assert cluster.history(NS, obj) == ["1", "2", "1"] and cluster.served_version(NS, obj) == "1"
    dep = cluster.get("Deployment", NS, obj)
    assert dep["metadata"]["annotations"]["datadream.io/model-uri"] == f"models:/{name}-classifier/1"
    assert MlflowClient(tracking_uri=uri).get_registered_model(f"{name}-classifier").aliases["champion"] == 1


def test_a_first_deploy_that_never_gets_ready_leaves_nothing(store, cluster, capsys):
    uri, name = store
    registry.promote(name, "3", tracking_uri=uri)
    cluster.broken_versions.add("3")
    code, _, err = run_cli(capsys, "deploy", name, "--timeout", "0.5")
    assert code == 1 and "objects were deleted" in err
    assert not cluster.objects


def test_rbac_refusal_is_one_line_exit_2_and_changes_nothing(store, cluster, capsys):
    uri, name = store
    registry.promote(name, "1", tracking_uri=uri)
    assert run_cli(capsys, "deploy", name)[0] == 0
    cluster.forbidden.add(("patch", "deployments"))
    code, _, err = run_cli(capsys, "promote", name, "2", "--deploy")
    assert code == 2
    err = one_error_line(err)
    assert "refused (403)" in err and 'cannot patch resource "deployments"' in err
    assert cluster.served_version(NS, f"{name}-classifier") == "1"
    assert MlflowClient(tracking_uri=uri).get_registered_model(f"{name}-classifier").aliases["champion"] == 1


def test_missing_namespace_is_a_user_error(store, cluster, capsys):
    uri, name = store
    registry.promote(name, "1", tracking_uri=uri)
    code, _, err = run_cli(capsys, "deploy", name, "--namespace", "nowhere")
    assert code == 2 and 'namespaces "nowhere" not found' in one_error_line(err)


def test_unreachable_cluster_is_one_line_exit_1(store, tmp_path, monkeypatch, capsys):
    uri, name = store
    registry.promote(name, "1", tracking_uri=uri)
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kc", closed_port_url(), TOKEN)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code, _, err = run_cli(capsys, "deploy", name)
    assert code == 1 and "cannot reach the Kubernetes API at http://127.0.0.1:" in one_error_line(err)
    assert "Traceback" not in err


def test_no_kubeconfig_is_a_user_error(store, tmp_path, monkeypatch, capsys):
    uri, name = store
    registry.promote(name, "1", tracking_uri=uri)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code, _, err = run_cli(capsys, "deploy", name)
    assert code == 2 and "no usable Kubernetes configuration" in err


def test_registry_cli_imports_no_kubernetes_client():
    code = ("import sys, datadream.registry_cli; "
            "print(sorted(m for m in sys.modules if m == 'kubernetes' or m.startswith('kubernetes.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[]"


def test_the_register_steps_deploy_serves_a_promotion_and_undoes_a_failed_one(store, cluster):
    """components.stages.register with `deploy` on: deploy_after_gate after the gate's verdict."""
    from datadream.serving.deploy import deploy_after_gate

    uri, name = store
    client = MlflowClient(tracking_uri=uri)
    for version, top1 in (("1", 0.5), ("2", 0.6), ("3", 0.7)):
        client.set_model_version_tag(f"{name}-classifier", version, "test_top1", str(top1))
    settings = ServingSettings(image="ghcr.io/x/datadream:1")
    obj = f"{name}-classifier"

    gate = registry.promote_if_better(name, "1", tracking_uri=uri)
    outcome = deploy_after_gate(name, gate, tracking_uri=uri, settings=settings, timeout_s=5)
    assert outcome.startswith("deployed: ") and cluster.served_version(NS, obj) == "1"

    kept = registry.promote_if_better(name, "1", tracking_uri=uri)
    assert deploy_after_gate(name, kept, tracking_uri=uri, settings=settings) == \
        "not deployed: the gate kept the champion"

    cluster.broken_versions.add("2")
    gate = registry.promote_if_better(name, "2", tracking_uri=uri)
    outcome = deploy_after_gate(name, gate, tracking_uri=uri, settings=settings, timeout_s=0.5)
    assert outcome.startswith("deploy failed: ") and "champion moved back to version 1" in outcome
    assert cluster.served_version(NS, obj) == "1"
    assert client.get_registered_model(obj).aliases["champion"] == 1

    gate = registry.promote_if_better(name, "3", tracking_uri=uri)
    assert deploy_after_gate(name, gate, tracking_uri=uri, settings=settings, timeout_s=5).startswith("deployed")
    assert cluster.history(NS, obj) == ["1", "2", "1", "3"]
