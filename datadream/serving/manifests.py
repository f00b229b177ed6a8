"""The Kubernetes objects that serve one classifier version: Deployment, Service, HPA, PodDisruptionBudget.

`render(settings, name, version)` returns them as plain dicts (the API's JSON), `to_yaml` prints them.
`datadream registry deploy` applies them (datadream.serving.deploy); `infra/serving/classifier.yaml` is
one rendering, kept in sync by tests/test_serving.py and scanned by checkov there.

The pod runs `mlflow models serve -m models:/NAME-classifier/VERSION --env-manager local` in the pipeline
image (it holds datadream, mlflow and torch, so nothing is installed at start). The version is pinned in
the pod template (model URI, label, DATADREAM_MODEL_VERSION), so moving `champion` and deploying again is
a rolling update: with maxUnavailable 0, old pods answer until new ones pass their readiness probe.
Only the Deployment changes with the version; the Service, HPA and PDB select pods by name alone.

MLflow's tracking URI and credentials reach the pod from the `datadream-config` ConfigMap and the
`datadream-secrets` Secret (the names the pipeline uses, pipelines/pipeline.py ClusterSettings), which
infra/terraform/modules/serving creates in the serving namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from datadream.errors import UserError

# Environment variable that tells the pyfunc (classifier_model.py) which registry version it serves.
MODEL_VERSION_ENV = "DATADREAM_MODEL_VERSION"
VERSION_LABEL = "datadream.io/model-version"
APP_LABEL = "app.kubernetes.io/name"
PART_OF = "datadream"
DEFAULT_NAMESPACE = "datadream-serving"
SERVICE_ACCOUNT = "datadream-serving"
CONFIG_MAP = "datadream-config"   # same names as pipelines/pipeline.py ClusterSettings
SECRET = "datadream-secrets"
SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
CONFIG_KEYS = ("MLFLOW_TRACKING_URI", "AWS_DEFAULT_REGION")
RUN_AS = 10001  # any high UID: the image's files are world-readable and the pod writes only to /tmp
SCRATCH = "/tmp"
# Two checkov findings are accepted, each with its reason (checkov reads these annotations).
CHECKOV_SKIPS = {
    "checkov.io/skip1": "CKV_K8S_35=MLflow reads its tracking credentials from env vars only (as the pipeline pods do)",
    "checkov.io/skip2": "CKV2_K8S_6=the NetworkPolicy classifier-ingress comes from infra/terraform/modules/serving",
}
REQUEST_TIMEOUT_S = 120  # one /invocations request (a batch of images on CPU)


@dataclass(frozen=True)
class ServingSettings:
    """How the classifier is served; the defaults suit a ViT-B/16 classifier on CPU nodes."""

    namespace: str = DEFAULT_NAMESPACE
    image: str | None = None  # None = components.image_reference(), the pipeline's image
    port: int = 8080
    workers: int = 1  # uvicorn workers per pod; each loads its own copy of the model
    cpu: str = "2"
    memory: str = "4Gi"
    cpu_limit: str = "4"
    memory_limit: str = "6Gi"
    gpu: bool = False  # one NVIDIA GPU per pod, on the GPU node group (same label/taint as the pipeline)
    gpu_node_selector: tuple[str, str] = ("datadream.io/node-pool", "gpu")
    gpu_toleration: tuple[str, str] = ("nvidia.com/gpu", "NoSchedule")
    cpu_node_selector: tuple[str, str] | None = ("datadream.io/node-pool", "system")
    min_replicas: int = 2
    max_replicas: int = 6
    target_cpu_percent: int = 70
    # Model download + load can take minutes for a large model: the startup probe allows
    # startup_seconds before liveness counts; progressDeadlineSeconds marks the rollout as failed.
    startup_seconds: int = 600
    extra_labels: dict[str, str] = field(default_factory=dict)

    def resolved_image(self) -> str:
        if self.image:
            return self.image
        from components import image_reference

        return image_reference()


def model_name(name: str) -> str:
    """The registered model that is served, NAME-classifier (the Kubernetes objects carry this name)."""
    from datadream.registry import classifier_name

    full = classifier_name(name)
    # A DNS-1123 label: lower-case alphanumerics and '-', at most 63 characters.
    obj = full.lower().replace("_", "-").replace(".", "-")
    if len(obj) > 63 or not obj[0].isalpha():
        raise UserError(f"registry name {name!r}: {full!r} does not make a Kubernetes object name "
                        "(at most 52 characters, starting with a letter)")
    return obj


def model_uri(name: str, version: str | int) -> str:
    from datadream.registry import classifier_name

    return f"models:/{classifier_name(name)}/{version}"


def server_command(uri: str, port: int, workers: int = 1, host: str = "0.0.0.0") -> list[str]:
    """The serving command line, as the pod runs it (and the local end-to-end test and benchmark)."""
    return ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
            "-h", host, "-p", str(port), "-w", str(workers), "-t", str(REQUEST_TIMEOUT_S)]


def _labels(obj_name: str, s: ServingSettings) -> dict[str, str]:
    return {APP_LABEL: obj_name, "app.kubernetes.io/component": "classifier-server",
            "app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/managed-by": "datadream", **s.extra_labels}


def _metadata(obj_name: str, s: ServingSettings) -> dict:
    return {"name": obj_name, "namespace": s.namespace, "labels": _labels(obj_name, s)}


def _selector(obj_name: str) -> dict[str, str]:
    # Never the version: a Deployment's selector is immutable, and the Service must reach old and new pods.
    return {APP_LABEL: obj_name, "app.kubernetes.io/component": "classifier-server"}


def _probe(path: str, port: str, period: int, failures: int, timeout: int = 5) -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": timeout,
            "failureThreshold": failures}


def _env(version: str, s: ServingSettings) -> list[dict]:
    env: list[dict] = [{"name": MODEL_VERSION_ENV, "value": version}]
    env += [{"name": k, "valueFrom": {"configMapKeyRef": {"name": CONFIG_MAP, "key": k,
                                                          "optional": k != CONFIG_KEYS[0]}}}
            for k in CONFIG_KEYS]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": k}}} for k in SECRET_KEYS]
    env += [
        {"name": "HOME", "value": SCRATCH},  # MLflow downloads the model under the temp dir; caches go here
        {"name": "TMPDIR", "value": SCRATCH},
        {"name": "DATADREAM_CACHE", "value": f"{SCRATCH}/datadream-cache"},
        {"name": "HF_HOME", "value": f"{SCRATCH}/hf-home"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},  # serving never downloads weights: they ship with the model
    ]
    return env


def deployment(name: str, version: str | int, s: ServingSettings) -> dict:
    obj = model_name(name)
    version = str(version)
    labels = _labels(obj, s)
    pod_labels = {**labels, VERSION_LABEL: version}
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": s.cpu, "memory": s.memory, "ephemeral-storage": "2Gi"},
        "limits": {"cpu": s.cpu_limit, "memory": s.memory_limit, "ephemeral-storage": "8Gi"},
    }
    pod: dict[str, Any] = {
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 30,
        "containers": [{
            "name": "server",
            "image": s.resolved_image(),
            "imagePullPolicy": "Always",
            "command": server_command(model_uri(name, version), s.port, s.workers)[:1],
            "args": server_command(model_uri(name, version), s.port, s.workers)[1:],
            "ports": [{"name": "http", "containerPort": s.port, "protocol": "TCP"}],
            "env": _env(version, s),
            "resources": resources,
            # mlflow's scoring server listens only once the model is loaded: /ping answers 200 from then on.
            "startupProbe": _probe("/ping", "http", 10, max(1, s.startup_seconds // 10)),
            "readinessProbe": _probe("/ping", "http", 5, 3),
            "livenessProbe": _probe("/health", "http", 20, 3),
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}],
        }],
        "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "8Gi"}}],
    }
    if s.gpu:
        resources["limits"]["nvidia.com/gpu"] = 1
        pod["nodeSelector"] = {s.gpu_node_selector[0]: s.gpu_node_selector[1]}
        pod["tolerations"] = [{"key": s.gpu_toleration[0], "operator": "Exists", "effect": s.gpu_toleration[1]}]
    elif s.cpu_node_selector:
        pod["nodeSelector"] = {s.cpu_node_selector[0]: s.cpu_node_selector[1]}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": obj, "namespace": s.namespace, "labels": labels,
                     "annotations": {"datadream.io/model-uri": model_uri(name, version), **CHECKOV_SKIPS}},
        "spec": {
            # No `replicas`: the HPA owns it (a create starts at the HPA's minimum, see deploy.apply).
            "selector": {"matchLabels": _selector(obj)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "minReadySeconds": 5,
            "progressDeadlineSeconds": s.startup_seconds + 120,
            "revisionHistoryLimit": 5,
            "template": {"metadata": {"labels": pod_labels,
                                      "annotations": {"datadream.io/model-uri": model_uri(name, version)}},
                         "spec": pod},
        },
    }


def _object(api_version: str, kind: str, name: str, s: ServingSettings, spec: dict) -> dict:
    return {"apiVersion": api_version, "kind": kind, "metadata": _metadata(model_name(name), s), "spec": spec}


def service(name: str, s: ServingSettings) -> dict:
    return _object("v1", "Service", name, s, {
        "type": "ClusterIP", "selector": _selector(model_name(name)),
        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]})


def autoscaler(name: str, s: ServingSettings) -> dict:
    return _object("autoscaling/v2", "HorizontalPodAutoscaler", name, s, {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": model_name(name)},
        "minReplicas": s.min_replicas,
        "maxReplicas": s.max_replicas,
        "metrics": [{"type": "Resource", "resource": {
            "name": "cpu", "target": {"type": "Utilization", "averageUtilization": s.target_cpu_percent}}}]})


def disruption_budget(name: str, s: ServingSettings) -> dict:
    # Node drains (autoscaler scale-down, upgrades) keep at least one server answering.
    return _object("policy/v1", "PodDisruptionBudget", name, s, {
        "maxUnavailable": 1, "selector": {"matchLabels": _selector(model_name(name))}})


def validate_settings(s: ServingSettings) -> None:
    if not 1 <= s.min_replicas <= s.max_replicas:
        raise UserError(f"serving replicas: need 1 <= min ({s.min_replicas}) <= max ({s.max_replicas})")
    if not 1 <= s.port <= 65535:
        raise UserError(f"serving port {s.port}: expected 1-65535")
    image = s.resolved_image()
    if not image or any(c.isspace() for c in image):
        raise UserError(f"--image {image!r}: expected a container image reference")


def render(name: str, version: str | int, s: ServingSettings | None = None) -> list[dict]:
    """Deployment, Service, HorizontalPodAutoscaler and PodDisruptionBudget for NAME-classifier VERSION."""
    s = s or ServingSettings()
    validate_settings(s)
    return [deployment(name, version, s), service(name, s), autoscaler(name, s), disruption_budget(name, s)]


def to_yaml(objects: list[dict]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


EXAMPLE_IMAGE = "ghcr.io/datadream/datadream:0.1.0@sha256:" + "0" * 64  # a digest as production should pin


def example() -> str:
    """infra/serving/classifier.yaml: the objects for version 7 of `pets` (tests keep the file current)."""
    header = ("# The serving objects `datadream registry deploy` applies, rendered for version 7 of\n"
              "# registry name `pets` (the image digest is a placeholder). Generated by:\n"
              "#   python -m datadream.serving.manifests > infra/serving/classifier.yaml\n")
    return header + to_yaml(render("pets", "7", ServingSettings(image=EXAMPLE_IMAGE)))


if __name__ == "__main__":
    print(example(), end="")
