"""A fake Kubernetes API server on loopback, for testing datadream.serving.deploy with the real client.

It keeps Deployments, Services, HorizontalPodAutoscalers and PodDisruptionBudgets in memory and speaks
the calls the typed kubernetes client makes for them: GET, POST (create), PATCH with a JSON patch
(RFC 6902: add, replace, remove, test) and DELETE; LIST of pods and events. It answers like the API
server: Status objects with `reason`, `details.kind` and `code`, 404 for a missing namespace, 409 for
an existing name, 422 for a failed `test`.

A toy Deployment controller runs on every read: a pod template whose version label is in
`broken_versions` never becomes ready (one surge pod with a failing readiness probe and its event);
any other template is rolled out at once. `history(name)` lists the versions the pod template went
through, in order, so a test sees a roll-forward and a roll-back.

    with FakeKubernetes(namespaces={"serving"}, token="t") as api:
        write_kubeconfig(path, api.url, "t")
        ...
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from loopback import LoopbackAPI, Request

NOW = "2026-01-01T00:00:00Z"
VERSION_LABEL = "datadream.io/model-version"
# URL prefix and resource (plural) -> kind
RESOURCES = {
    ("/apis/apps/v1", "deployments"): "Deployment",
    ("/api/v1", "services"): "Service",
    ("/apis/autoscaling/v2", "horizontalpodautoscalers"): "HorizontalPodAutoscaler",
    ("/apis/policy/v1", "poddisruptionbudgets"): "PodDisruptionBudget",
}
GROUPS = {"/apis/apps/v1": "apps", "/api/v1": "", "/apis/autoscaling/v2": "autoscaling", "/apis/policy/v1": "policy"}
VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}
_PATH = re.compile(r"(?P<prefix>/api/v1|/apis/[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<res>[a-z]+)"
                   r"(?:/(?P<name>[^/]+))?")


def status(code: int, reason: str, message: str, kind: str | None = None, name: str | None = None) -> dict:
    out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
           "reason": reason, "code": code}
    if kind:
        out["details"] = {"name": name, "kind": kind}
    return out


def write_kubeconfig(path: Path, url: str, token: str, namespace: str = "default") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
    }))
    return path


class FakeKubernetes(LoopbackAPI):
    def __init__(self, namespaces: set[str], token: str = "token", user: str = "system:serviceaccount:ci:deployer"):
        super().__init__()
        self.namespaces = set(namespaces)
        self.token = token
        self.user = user
        self.objects: dict[tuple[str, str, str], dict] = {}  # (kind, namespace, name) -> object
        self.pods: dict[tuple[str, str], dict] = {}  # (namespace, name) -> pod
        self.events: list[dict] = []
        self.forbidden: set[tuple[str, str]] = set()  # (verb, resource) answered 403
        self.broken_versions: set[str] = set()
        self._templates: dict[tuple[str, str], list[str]] = {}  # (namespace, name) -> versions, in order
        self._rv = 100

    # --- helpers for tests

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return self.objects.get((kind, namespace, name))

    def history(self, namespace: str, name: str) -> list[str]:
        return list(self._templates.get((namespace, name), []))

    def served_version(self, namespace: str, name: str) -> str | None:
        dep = self.get("Deployment", namespace, name)
        return dep["spec"]["template"]["metadata"]["labels"].get(VERSION_LABEL) if dep else None

    def writes(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests if r.method != "GET"]

    # --- the API

    def respond(self, r: Request) -> tuple:
        if r.headers.get("authorization") != f"Bearer {self.token}":
            return 401, status(401, "Unauthorized", "Unauthorized")
        m = _PATH.fullmatch(r.path)
        if not m:
            return 404, status(404, "NotFound", f"the server could not find the requested resource ({r.path})")
        prefix, ns, res, name = m["prefix"], m["ns"], m["res"], m["name"]
        verb = VERBS[r.method] if name or r.method != "GET" else "list"
        if (verb, res) in self.forbidden:
            group = GROUPS.get(prefix, "")
            return 403, status(403, "Forbidden", f'{res}{"." + group if group else ""} "{name or ""}" is forbidden: '
                               f'User "{self.user}" cannot {verb} resource "{res}" in API group "{group}" in the '
                               f'namespace "{ns}"', kind=res, name=name)
        if ns not in self.namespaces:
            return 404, status(404, "NotFound", f'namespaces "{ns}" not found', kind="namespaces", name=ns)
        if (prefix, res) == ("/api/v1", "pods") and r.method == "GET":
            return 200, self._list("PodList", self._pods(ns, r.query.get("labelSelector", "")))
        if (prefix, res) == ("/api/v1", "events") and r.method == "GET":
            return 200, self._list("EventList", self._events(ns, r.query.get("fieldSelector", "")))
        kind = RESOURCES.get((prefix, res))
        if kind is None:
            return 404, status(404, "NotFound", f"the server could not find the requested resource ({r.path})")
        key = (kind, ns, name)
        if r.method == "POST":
            return self._create(kind, ns, r.json)
        current = self.objects.get(key)
        if current is None:
            group = GROUPS[prefix]
            return 404, status(404, "NotFound", f'{res}{"." + group if group else ""} "{name}" not found',
                               kind=res, name=name)
        if r.method == "GET":
            if kind == "Deployment":
                self._control(current)
            return 200, current
        if r.method == "DELETE":
            del self.objects[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
        if r.method == "PATCH":
            if r.headers.get("content-type") != "application/json-patch+json":
                return 415, status(415, "UnsupportedMediaType", f"this fake takes JSON patches, not "
                                   f"{r.headers.get('content-type')}")
            return self._patch(kind, current, r.json)
        return 405, status(405, "MethodNotAllowed", f"{r.method} not supported by the fake")

    def _list(self, kind: str, items: list[dict]) -> dict:
        return {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _create(self, kind: str, ns: str, body: dict) -> tuple:
        name = body["metadata"]["name"]
        if (kind, ns, name) in self.objects:
            return 409, status(409, "AlreadyExists", f'{kind.lower()}s "{name}" already exists', kind=kind, name=name)
        obj = copy.deepcopy(body)
        obj["metadata"].update(namespace=ns, uid=f"uid-{self._rv}", resourceVersion=self._next_rv(),
                               generation=1, creationTimestamp=NOW)
        if kind == "Service":
            obj["spec"]["clusterIP"] = "10.96.0.42"
        if kind == "Deployment":
            obj["spec"].setdefault("replicas", 1)
            obj["status"] = {}
            self._templates.setdefault((ns, name), []).append(self._version(obj))
        self.objects[(kind, ns, name)] = obj
        return 201, obj

    def _patch(self, kind: str, current: dict, ops: list[dict]) -> tuple:
        obj = copy.deepcopy(current)
        try:
            for op in ops:
                apply_op(obj, op)
        except PatchTestFailed as e:
            return 422, status(422, "Invalid", f"the server rejected our request due to an error in our request: {e}")
        except (KeyError, IndexError, ValueError) as e:
            return 422, status(422, "Invalid", f"invalid JSON patch: {e}")
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if obj.get("spec") != current.get("spec"):
            obj["metadata"]["generation"] = current["metadata"]["generation"] + 1
        obj["metadata"]["resourceVersion"] = self._next_rv()
        if kind == "Deployment" and self._version(obj) != self._version(current):
            self._templates.setdefault((ns, name), []).append(self._version(obj))
        self.objects[(kind, ns, name)] = obj
        return 200, obj

    @staticmethod
    def _version(dep: dict) -> str:
        return dep["spec"]["template"]["metadata"]["labels"].get(VERSION_LABEL, "")

    # --- the toy controller

    def _control(self, dep: dict) -> None:
        ns, name, n = dep["metadata"]["namespace"], dep["metadata"]["name"], dep["spec"].get("replicas", 1)
        version = self._version(dep)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        pod_name = f"{name}-v{version}-0"
        if (ns, pod_name) not in self.pods:
            self.pods[(ns, pod_name)] = {"apiVersion": "v1", "kind": "Pod",
                                         "metadata": {"name": pod_name, "namespace": ns, "labels": dict(labels),
                                                      "creationTimestamp": NOW}}
        gen = dep["metadata"]["generation"]
        if version in self.broken_versions:
            # maxSurge 1, maxUnavailable 0: one new pod that never gets ready, the old ones keep serving.
            if not any(e["involvedObject"]["name"] == pod_name for e in self.events):
                self.events.append({
                    "apiVersion": "v1", "kind": "Event",
                    "metadata": {"name": f"{pod_name}.1", "namespace": ns},
                    "involvedObject": {"kind": "Pod", "name": pod_name, "namespace": ns},
                    "reason": "Unhealthy", "type": "Warning", "lastTimestamp": NOW, "count": 12,
                    "message": 'Startup probe failed: Get "http://10.0.0.7:8080/ping": dial tcp 10.0.0.7:8080: '
                               "connect: connection refused"})
            dep["status"] = {"observedGeneration": gen, "replicas": n + 1, "updatedReplicas": 1,
                             "readyReplicas": n, "availableReplicas": n, "unavailableReplicas": 1,
                             "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                                             "message": "ReplicaSet is progressing."}]}
        else:
            dep["status"] = {"observedGeneration": gen, "replicas": n, "updatedReplicas": n, "readyReplicas": n,
                             "availableReplicas": n,
                             "conditions": [{"type": "Progressing", "status": "True",
                                             "reason": "NewReplicaSetAvailable", "message": "rolled out"}]}

    def _pods(self, ns: str, selector: str) -> list[dict]:
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        return [p for (pns, _), p in self.pods.items()
                if pns == ns and all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]

    def _events(self, ns: str, selector: str) -> list[dict]:
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        fields = {"involvedObject.kind": "kind", "involvedObject.name": "name"}
        return [e for e in self.events if e["metadata"]["namespace"] == ns
                and all(e["involvedObject"].get(fields[k]) == v for k, v in wanted.items())]


# --- RFC 6902 ---------------------------------------------------------------------------------------------


class PatchTestFailed(Exception):
    pass


def _tokens(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise ValueError(f"bad JSON pointer {pointer!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def apply_op(doc: Any, op: dict) -> None:
    *parents, last = _tokens(op["path"])
    target = doc
    for t in parents:
        target = target[int(t)] if isinstance(target, list) else target[t]
    kind = op["op"]
    if kind == "test":
        value = target[int(last)] if isinstance(target, list) else target.get(last)
        if value != op["value"]:
            raise PatchTestFailed(f"{op['path']} is {value!r}, not {op['value']!r}")
    elif kind in ("add", "replace"):
        if kind == "replace" and (last not in target if isinstance(target, dict) else int(last) >= len(target)):
            raise KeyError(op["path"])
        if isinstance(target, list) and kind == "replace":
            target[int(last)] = copy.deepcopy(op["value"])
        elif isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), copy.deepcopy(op["value"]))
        else:
            target[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del target[int(last) if isinstance(target, list) else last]
    else:
        raise ValueError(f"op {kind!r} not supported by the fake")
