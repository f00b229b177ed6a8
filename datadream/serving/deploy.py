"""Apply the serving objects of datadream.serving.manifests through the Kubernetes API, and roll back.

    deploy(name)                  the version `champion` points to, rolled out and waited for
    promote_and_deploy(name, v)   registry.promote, then deploy; the alias moves back if the rollout fails
    rollback_and_deploy(name)     registry.rollback, then deploy; likewise undone on failure

Applying (kubernetes Python client, typed APIs; in-cluster config inside a pod, else kubeconfig):

- Service, HorizontalPodAutoscaler, PodDisruptionBudget first. They do not depend on the version, so
  re-applying them never disturbs the version being served.
- Then the Deployment: created (with the HPA's minimum replicas) or changed by a JSON patch (RFC 6902)
  of the fields it owns (pod template, strategy, timing, its labels and annotations), guarded by a
  `test` of the resourceVersion read just before. `spec.replicas` is never touched: the HPA owns it.
- Wait until the rollout completes as `kubectl rollout status` decides it (observed generation,
  updated, available, no old replicas left). If it does not within the timeout, or the Deployment
  reports ProgressDeadlineExceeded, the previous pod template is patched back (a first deploy's new
  objects are deleted instead), and the error names the newest pod's last event.

Errors: no such alias, RBAC refusal (403/401), missing namespace -> UserError (exit 2); the API server
unreachable, a failed rollout -> InfraError (exit 1). Each is one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from datadream.errors import InfraError, UserError
from datadream.serving import manifests
from datadream.serving.manifests import ServingSettings

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 900.0
REQUEST_TIMEOUT = (5, 30)  # connect, read (seconds) for every API call
FIELD_MANAGER = "datadream"


@dataclass(frozen=True)
class DeployResult:
    model: str  # NAME-classifier
    version: str
    namespace: str
    previous: str | None  # the version the Deployment served before, None for a first deploy
    change: str  # "created", "updated" or "unchanged"
    seconds: float

    def line(self) -> str:
        if self.change == "unchanged":
            return f"{self.model}: version {self.version} already serving in namespace {self.namespace}"
        before = f"was {self.previous}" if self.previous else "first deploy"
        return (f"{self.model}: version {self.version} serving in namespace {self.namespace} "
                f"({before}; rolled out in {self.seconds:.0f} s)")


# --- registry --------------------------------------------------------------------------------------------


def alias_version(name: str, alias: str = "champion", tracking_uri: str | None = None) -> str:
    """The NAME-classifier version that `alias` points to, or UserError."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from datadream.registry import classifier_name

    model = classifier_name(name)
    client = MlflowClient(tracking_uri=tracking_uri) if tracking_uri else MlflowClient()
    try:
        aliases = client.get_registered_model(model).aliases or {}
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"registered model {model!r} not found (tracking URI {client.tracking_uri})") from None
        raise
    if alias not in aliases:
        raise UserError(f"registered model {model!r} has no {alias!r} yet: nothing to deploy "
                        f"(promote a version first: datadream registry promote {name} VERSION)")
    return str(aliases[alias])


# --- the Kubernetes API ----------------------------------------------------------------------------------


def api_client(context: str | None = None):
    """An ApiClient for the cluster: the pod's ServiceAccount in a pod, else kubeconfig ($KUBECONFIG)."""
    from kubernetes import client, config

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and context is None:
            config.load_incluster_config()
        else:
            # $KUBECONFIG read now (the client reads it once, at import)
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), context=context)
    except (config.ConfigException, OSError) as e:
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise UserError(f"no usable Kubernetes configuration ({where}): {_one_line(str(e))}") from None
    return client.ApiClient()


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _api_message(e) -> str:
    import json

    try:
        return json.loads(e.body).get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        return e.reason or str(e.status)


@contextlib.contextmanager
def api_errors(host: str) -> Iterator[None]:
    """Kubernetes client failures as one-line UserError (refused, not found) or InfraError (unreachable)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as e:
        message = _one_line(_api_message(e))
        if e.status in (401, 403):
            raise UserError(f"Kubernetes API at {host} refused ({e.status}): {message}; "
                            "the deployer needs the datadream-deployer Role (infra/README.md)") from None
        if e.status == 404:
            raise UserError(f"Kubernetes API at {host}: {message}") from None
        if e.status == 422 or e.status == 400:
            raise UserError(f"Kubernetes API at {host} rejected the manifest: {message}") from None
        raise InfraError(f"Kubernetes API at {host} answered {e.status}: {message}") from None
    except urllib3.exceptions.HTTPError as e:
        reason = getattr(e, "reason", None) or e
        raise InfraError(f"cannot reach the Kubernetes API at {host}: {_one_line(str(reason))}") from None


class Cluster:
    """The few typed API calls `apply` needs, returning plain dicts (the API's JSON)."""

    def __init__(self, client) -> None:
        from kubernetes import client as k8s

        self.client = client
        self.host = client.configuration.host
        # urllib3 retries a refused connection (3 times) with a warning each; the one-line error says it.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        core, apps = k8s.CoreV1Api(client), k8s.AppsV1Api(client)
        hpa, policy = k8s.AutoscalingV2Api(client), k8s.PolicyV1Api(client)
        self._ops: dict[str, tuple[Callable, ...]] = {  # kind -> read, create, patch, delete
            "Deployment": (apps.read_namespaced_deployment, apps.create_namespaced_deployment,
                           apps.patch_namespaced_deployment, apps.delete_namespaced_deployment),
            "Service": (core.read_namespaced_service, core.create_namespaced_service,
                        core.patch_namespaced_service, core.delete_namespaced_service),
            "HorizontalPodAutoscaler": (
                hpa.read_namespaced_horizontal_pod_autoscaler, hpa.create_namespaced_horizontal_pod_autoscaler,
                hpa.patch_namespaced_horizontal_pod_autoscaler, hpa.delete_namespaced_horizontal_pod_autoscaler),
            "PodDisruptionBudget": (
                policy.read_namespaced_pod_disruption_budget, policy.create_namespaced_pod_disruption_budget,
                policy.patch_namespaced_pod_disruption_budget, policy.delete_namespaced_pod_disruption_budget),
        }
        self.core = core

    def _plain(self, obj) -> dict:
        return self.client.sanitize_for_serialization(obj)

    def read(self, kind: str, name: str, namespace: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._plain(self._ops[kind][0](name, namespace, _request_timeout=REQUEST_TIMEOUT))
        except ApiException as e:
            if e.status == 404 and not _namespace_missing(e):
                return None
            raise

    def create(self, obj: dict) -> dict:
        meta = obj["metadata"]
        return self._plain(self._ops[obj["kind"]][1](meta["namespace"], obj, field_manager=FIELD_MANAGER,
                                                     _request_timeout=REQUEST_TIMEOUT))

    def patch(self, kind: str, name: str, namespace: str, ops: list[dict]) -> dict:
        # A list body goes out as application/json-patch+json.
        return self._plain(self._ops[kind][2](name, namespace, ops, field_manager=FIELD_MANAGER,
                                              _request_timeout=REQUEST_TIMEOUT))

    def delete(self, kind: str, name: str, namespace: str) -> None:
        from kubernetes.client.exceptions import ApiException

        with contextlib.suppress(ApiException):
            self._ops[kind][3](name, namespace, propagation_policy="Background", _request_timeout=REQUEST_TIMEOUT)

    def last_pod_event(self, namespace: str, selector: dict[str, str]) -> str | None:
        """'pod P: Reason: message' for the newest pod matching `selector`, or None."""
        label_selector = ",".join(f"{k}={v}" for k, v in selector.items())
        pods = self._plain(self.core.list_namespaced_pod(namespace, label_selector=label_selector,
                                                         _request_timeout=REQUEST_TIMEOUT)).get("items") or []
        if not pods:
            return None
        pod = max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")["metadata"]["name"]
        events = self._plain(self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind=Pod,involvedObject.name={pod}",
            _request_timeout=REQUEST_TIMEOUT)).get("items") or []
        if not events:
            return f"pod {pod}: no events"
        last = max(events, key=lambda ev: ev.get("lastTimestamp") or ev.get("eventTime")
                   or ev.get("firstTimestamp") or "")
        return f"pod {pod}: {last.get('reason')}: {_one_line(last.get('message') or '', 200)}"


def _namespace_missing(e) -> bool:
    import json

    try:
        details = json.loads(e.body).get("details") or {}
    except (TypeError, ValueError, AttributeError):
        return False
    return details.get("kind") == "namespaces"


# --- applying --------------------------------------------------------------------------------------------


def _pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _map_ops(existing: dict, path: tuple[str, ...], wanted: dict[str, str]) -> list[dict]:
    """JSON-patch ops setting the keys of `wanted` in the map at `path`, keeping other keys (e.g. the
    revision annotation the Deployment controller writes)."""
    if not wanted:
        return []
    current = existing
    for p in path:
        current = (current or {}).get(p)
    if current is None:
        return [{"op": "add", "path": _pointer(*path), "value": wanted}]
    return [{"op": "add", "path": _pointer(*path, k), "value": v} for k, v in wanted.items() if current.get(k) != v]


# Fields of each kind that `apply` owns and sets on an existing object.
_OWNED_SPEC = {
    "Deployment": ("template", "strategy", "minReadySeconds", "progressDeadlineSeconds", "revisionHistoryLimit"),
    "Service": ("type", "selector", "ports"),  # never clusterIP & co, which the API server assigned
    "HorizontalPodAutoscaler": ("scaleTargetRef", "minReplicas", "maxReplicas", "metrics"),
    "PodDisruptionBudget": ("maxUnavailable", "selector"),
}


def _update_ops(existing: dict, wanted: dict) -> list[dict]:
    ops = _map_ops(existing, ("metadata", "labels"), wanted["metadata"].get("labels") or {})
    ops += _map_ops(existing, ("metadata", "annotations"), wanted["metadata"].get("annotations") or {})
    spec = existing.get("spec") or {}
    ops += [{"op": "add", "path": _pointer("spec", key), "value": wanted["spec"][key]}
            for key in _OWNED_SPEC[wanted["kind"]] if key in wanted["spec"] and spec.get(key) != wanted["spec"][key]]
    if ops:
        ops.insert(0, {"op": "test", "path": "/metadata/resourceVersion",
                       "value": existing["metadata"]["resourceVersion"]})
    return ops


def _served_version(dep: dict | None) -> str | None:
    if not dep:
        return None
    return (((dep.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels", {}).get(
        manifests.VERSION_LABEL)


def rollout_state(dep: dict) -> tuple[bool, str | None]:
    """(complete, failure) for a Deployment, decided as `kubectl rollout status` does."""
    spec, status = dep.get("spec") or {}, dep.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return False, _one_line(cond.get("message") or "progress deadline exceeded")
    if (status.get("observedGeneration") or 0) < (dep["metadata"].get("generation") or 0):
        return False, None
    want = spec.get("replicas", 1)
    updated = status.get("updatedReplicas") or 0
    if updated < want:
        return False, None
    if (status.get("replicas") or 0) > updated:
        return False, None  # old pods still terminating
    if (status.get("availableReplicas") or 0) < updated:
        return False, None
    return True, None


def apply(
    cluster: Cluster,
    objects: list[dict],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_s: float = 2.0,
    initial_replicas: int = 1,
) -> DeployResult:
    """Apply `objects` (manifests.render) and wait for the Deployment's rollout; see the module docstring."""
    start = time.monotonic()
    dep = next(o for o in objects if o["kind"] == "Deployment")
    name, namespace = dep["metadata"]["name"], dep["metadata"]["namespace"]
    version = dep["spec"]["template"]["metadata"]["labels"][manifests.VERSION_LABEL]
    created: list[tuple[str, str]] = []
    with api_errors(cluster.host):
        existing = {o["kind"]: cluster.read(o["kind"], o["metadata"]["name"], namespace) for o in objects}
        old = existing["Deployment"]
        if old and old["spec"]["selector"] != dep["spec"]["selector"]:
            raise UserError(f"Deployment {namespace}/{name} exists with selector {old['spec']['selector']}, "
                            f"not {dep['spec']['selector']} (immutable): delete it first")
        for obj in [o for o in objects if o["kind"] != "Deployment"] + [dep]:
            kind, current = obj["kind"], existing[obj["kind"]]
            if current is None:
                body = obj
                if kind == "Deployment":
                    body = {**obj, "spec": {**obj["spec"], "replicas": initial_replicas}}
                result = cluster.create(body)
                created.append((kind, obj["metadata"]["name"]))
            else:
                ops = _update_ops(current, obj)
                result = cluster.patch(kind, obj["metadata"]["name"], namespace, ops) if ops else current
            if kind == "Deployment":
                applied = result
    previous = _served_version(old)
    # The API server defaults fields we do not set, so compare generations, not templates: a patch that
    # changed nothing after defaulting leaves the generation as it was.
    change = ("created" if old is None else
              "unchanged" if applied["metadata"].get("generation") == old["metadata"].get("generation") else "updated")
    log.info("deploy: %s/%s version %s %s; waiting for the rollout", namespace, name, version, change)
    failure = _wait(cluster, name, namespace, applied, start + timeout_s, poll_s)
    if failure is None:
        return DeployResult(name, version, namespace, previous, change, time.monotonic() - start)
    # Not ready: put back what served before, and say why with the newest new pod's last event.
    with api_errors(cluster.host):
        event = cluster.last_pod_event(namespace, {**dep["spec"]["selector"]["matchLabels"],
                                                   manifests.VERSION_LABEL: version})
        if old is None:
            for kind, obj_name in reversed(created):
                cluster.delete(kind, obj_name, namespace)
            undone = "its objects were deleted (nothing served before)"
        else:
            now = cluster.read("Deployment", name, namespace)
            ops = [{"op": "add", "path": "/spec/template", "value": old["spec"]["template"]}]
            ops += _map_ops(now, ("metadata", "annotations"), {
                k: v for k, v in (old["metadata"].get("annotations") or {}).items() if k.startswith("datadream.io/")})
            cluster.patch("Deployment", name, namespace, ops)
            undone = f"rolled back to version {previous}, which keeps serving"
    raise InfraError(f"Deployment {namespace}/{name} version {version} {failure}; {undone}"
                     + (f"; {event}" if event else ""))


def _wait(cluster: Cluster, name: str, namespace: str, applied: dict, deadline: float,
          poll_s: float) -> str | None:
    """None once the rollout is complete, else why it is not (timeout or progress deadline)."""
    dep, pause = applied, min(0.2, poll_s)
    while True:
        done, failure = rollout_state(dep)
        if done:
            return None
        if failure:
            return f"failed: {failure}"
        if time.monotonic() >= deadline:
            status = dep.get("status") or {}
            return (f"not ready after the timeout ({status.get('updatedReplicas') or 0} updated, "
                    f"{status.get('availableReplicas') or 0} available of {dep['spec'].get('replicas', 1)})")
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(poll_s, pause * 2)  # quick rollouts are seen quickly, long ones polled every poll_s
        with api_errors(cluster.host):
            dep = cluster.read("Deployment", name, namespace) or applied


# --- commands --------------------------------------------------------------------------------------------


def deploy(
    name: str,
    *,
    alias: str = "champion",
    version: str | None = None,
    settings: ServingSettings | None = None,
    tracking_uri: str | None = None,
    dry_run: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_s: float = 2.0,
    client: Any = None,
    context: str | None = None,
) -> DeployResult | str:
    """Serve NAME-classifier at `version` (default: the version `alias` points to). With `dry_run`, the
    rendered YAML is returned and the cluster is not contacted."""
    settings = settings or ServingSettings()
    version = str(version) if version is not None else alias_version(name, alias, tracking_uri)
    objects = manifests.render(name, version, settings)
    if dry_run:
        return manifests.to_yaml(objects)
    cluster = Cluster(client if client is not None else api_client(context))
    return apply(cluster, objects, timeout_s=timeout_s, poll_s=poll_s, initial_replicas=settings.min_replicas)


def promote_and_deploy(name: str, version: str, *, tracking_uri: str | None = None, **deploy_args) -> tuple[dict, Any]:
    """registry.promote, then deploy the new champion; if the rollout fails, the alias moves back."""
    from datadream import registry

    result = registry.promote(name, version, tracking_uri=tracking_uri)
    return result, _deploy_or_undo(name, result, tracking_uri, deploy_args,
                                   undo=lambda: registry.rollback(name, tracking_uri=tracking_uri))


def rollback_and_deploy(name: str, *, tracking_uri: str | None = None, **deploy_args) -> tuple[dict, Any]:
    """registry.rollback, then deploy the restored champion; if the rollout fails, the alias moves back."""
    from datadream import registry

    result = registry.rollback(name, tracking_uri=tracking_uri)
    before = result["champion_before"]
    undo = (lambda: registry.promote(name, before, tracking_uri=tracking_uri)) if before else None
    return result, _deploy_or_undo(name, result, tracking_uri, deploy_args, undo=undo)


def deploy_after_gate(name: str, gate: dict, *, tracking_uri: str | None = None, **deploy_args) -> str:
    """The pipeline's register step with `deploy` on: serve the version the gate just promoted. Returns
    what happened as one line and never raises for a failed rollout (the champion moves back first):
    the step must not fail and be retried, which would register the models again."""
    from datadream import registry

    if gate["decision"] != "promoted":
        return "not deployed: the gate kept the champion"
    undo = (lambda: registry.rollback(name, tracking_uri=tracking_uri)) if gate["champion_before"] else None
    try:
        result = _deploy_or_undo(name, gate, tracking_uri, deploy_args, undo=undo)
    except (UserError, InfraError) as e:
        log.error("register: deploy failed: %s", e)
        return f"deploy failed: {e}"
    return f"deployed: {result.line()}"


def _deploy_or_undo(name: str, result: dict, tracking_uri: str | None, deploy_args: dict, undo) -> Any:
    try:
        return deploy(name, version=result["champion_after"], tracking_uri=tracking_uri, **deploy_args)
    except (UserError, InfraError) as e:
        if result["decision"] == "unchanged" or undo is None:
            raise
        undo()
        message = f"{e}; champion moved back to version {result['champion_before']}"
        raise type(e)(message) from None
