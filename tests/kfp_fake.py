"""A fake Kubeflow Pipelines API server (v2beta1 REST) on loopback, for testing `pipelines.client`.

It speaks just enough of the API that kfp.Client 2.17 calls for upload, submit and schedule, keeps
state in memory (so a second upload finds the first pipeline), records every request for assertions,
and answers in the server's snake_case JSON (protojson with proto names).

    with FakeKFP(token="t") as kfp_api:
        client = connect(kfp_api.url, token="t")
        ...
        assert kfp_api.calls() == [("GET", "/apis/v2beta1/healthz"), ...]
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import yaml
from loopback import LoopbackAPI, Request

API = "/apis/v2beta1"
NOW = "2026-01-01T00:00:00Z"


class FakeKFP(LoopbackAPI):
    """Start with `start()` or `with`; `url` is http://127.0.0.1:<free port>."""

    def __init__(self, token: str | None = None, login_redirect: bool = False) -> None:
        super().__init__()
        self.token = token  # when set, a request without "Bearer <token>" gets 401 ...
        self.login_redirect = login_redirect  # ... or, like oauth2-proxy in front of Kubeflow, a 302 to a login page
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}

    def respond(self, req: Request) -> tuple:
        if self.token and req.headers.get("authorization") != f"Bearer {self.token}":
            error = _grpc_error(16, "Unauthenticated: missing or invalid bearer token")
            if self.login_redirect:
                return 302, error, {"Location": "/dex/auth?state=x", "Content-Type": "text/html"}
            return 401, error
        return self._route(req)

    def _route(self, r: Request) -> tuple[int, Any]:
        m, p = r.method, r.path
        if (m, p) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if (m, p) == ("POST", f"{API}/pipelines/upload"):
            return self._upload_pipeline(r)
        if (m, p) == ("POST", f"{API}/pipelines/upload_version"):
            return self._upload_version(r)
        if (m, p) == ("GET", f"{API}/pipelines"):
            return _listing("pipelines", self.pipelines.values(), r)
        if m == "GET" and (match := re.fullmatch(rf"{API}/pipelines/([^/]+)", p)):
            found = self.pipelines.get(match[1])
            return (200, found) if found else (404, _grpc_error(5, f"Pipeline {match[1]} not found"))
        if m == "GET" and (match := re.fullmatch(rf"{API}/pipelines/([^/]+)/versions", p)):
            mine = [v for v in self.versions.values() if v["pipeline_id"] == match[1]]
            return _listing("pipeline_versions", mine, r)
        if (m, p) == ("POST", f"{API}/experiments"):
            exp = {**r.json, "experiment_id": str(uuid.uuid4()), "created_at": NOW, "storage_state": "AVAILABLE"}
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if (m, p) == ("GET", f"{API}/experiments"):
            return _listing("experiments", self.experiments.values(), r)
        if (m, p) == ("POST", f"{API}/runs"):
            run = {**r.json, "run_id": str(uuid.uuid4()), "created_at": NOW, "state": "PENDING",
                   "storage_state": "AVAILABLE"}
            self.runs[run["run_id"]] = run
            return 200, run
        if (m, p) == ("POST", f"{API}/recurringruns"):
            rr = {**r.json, "recurring_run_id": str(uuid.uuid4()), "created_at": NOW, "updated_at": NOW,
                  "status": "ENABLED" if r.json.get("mode") == "ENABLE" else "DISABLED"}
            self.recurring_runs[rr["recurring_run_id"]] = rr
            return 200, rr
        if (m, p) == ("GET", f"{API}/recurringruns"):
            mine = [x for x in self.recurring_runs.values()
                    if not r.query.get("experiment_id") or x.get("experiment_id") == r.query["experiment_id"]]
            return _listing("recurringRuns", mine, r)  # sic: the proto field is camelCase
        return 404, _grpc_error(5, f"no route for {m} {p}")

    def _upload_pipeline(self, r: Request) -> tuple[int, Any]:
        filename, content = r.files["uploadfile"]
        name = r.query.get("name") or filename
        namespace = r.query.get("namespace", "")
        if any(x["name"] == name and x.get("namespace", "") == namespace for x in self.pipelines.values()):
            return 409, _upload_error("Failed to create a pipeline and a pipeline version")
        pipeline = {"pipeline_id": str(uuid.uuid4()), "name": name, "display_name": r.query.get("display_name") or name,
                    "description": r.query.get("description", ""), "created_at": NOW}
        if namespace:
            pipeline["namespace"] = namespace
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        self._add_version(pipeline["pipeline_id"], name, r, content)  # the server's default version
        return 200, pipeline

    def _upload_version(self, r: Request) -> tuple[int, Any]:
        pipeline_id = r.query.get("pipelineid", "")
        if pipeline_id not in self.pipelines:
            return 400, _upload_error("Failed to create a pipeline version")
        filename, content = r.files["uploadfile"]
        name = r.query.get("name") or filename
        if any(v["pipeline_id"] == pipeline_id and v["name"] == name for v in self.versions.values()):
            return 409, _upload_error("Failed to create a pipeline version")
        return 200, self._add_version(pipeline_id, name, r, content)

    def _add_version(self, pipeline_id: str, name: str, r: Request, content: bytes) -> dict:
        docs = list(yaml.safe_load_all(content))
        spec = docs[0] if len(docs) == 1 else {"pipeline_spec": docs[0], "platform_spec": docs[1]}
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()), "name": name,
                   "display_name": r.query.get("display_name") or name, "description": r.query.get("description", ""),
                   "created_at": NOW, "pipeline_spec": spec}
        self.versions[version["pipeline_version_id"]] = version
        return version


def _matches(item: dict, filter_json: str | None) -> bool:
    """The v2beta1 filter subset kfp.Client sends: EQUALS predicates (operation 1 or "EQUALS") on a string key."""
    if not filter_json:
        return True
    for pred in json.loads(filter_json).get("predicates", []):
        if pred.get("operation") not in (1, "EQUALS"):
            raise NotImplementedError(f"filter operation {pred.get('operation')}")
        wanted = pred.get("stringValue", pred.get("string_value"))
        if item.get(pred["key"]) != wanted:
            return False
    return True


def _listing(key: str, items: Any, r: Request) -> tuple[int, Any]:
    """A list response; like protojson, an empty repeated field is left out."""
    found = [x for x in items if _matches(x, r.query.get("filter"))]
    if r.query.get("namespace"):
        found = [x for x in found if x.get("namespace", "") == r.query["namespace"]]
    return 200, ({key: found, "total_size": len(found)} if found else {"total_size": 0})


def _grpc_error(code: int, message: str) -> dict:
    return {"error": message, "code": code, "message": message, "details": []}


def _upload_error(message: str) -> dict:
    return {"error_message": message, "error_details": message}
