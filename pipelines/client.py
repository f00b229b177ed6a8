"""Cluster actions on a compiled pipeline package: upload, submit a run, schedule a recurring run.

Everything goes through `kfp.Client` (KFP v2beta1 REST API). Bad input — a host that is not a URL or
cannot be reached, an unknown or mistyped `--param`, a 5-field cron — raises `UserError` with one line
before anything is created. Server failures (HTTP 5xx) propagate, so a caller may retry.

The bearer token goes only to the KFP host (our healthz probe, then kfp): never logged, printed or in a message.
kfp.Client prints UI links to stdout; we capture those and log them instead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import math
import os
import re
import socket
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import certifi
import kfp
import kfp_server_api
import urllib3
import yaml

from datadream.errors import UserError

log = logging.getLogger("datadream.kfp")

TOKEN_ENV = "KFP_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp's own name for it
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 15.0
HEALTHZ_PATH = "/apis/v2beta1/healthz"


# --- connect -------------------------------------------------------------------------------------


def connect(host: str, token: str | None = None, namespace: str | None = None) -> kfp.Client:
    """A `kfp.Client` for `host` (http(s)://…), after checking the API answers within a few seconds.

    The token comes from `token`, else env `KFP_TOKEN`, else the pod's Kubeflow service-account token,
    else none: with an explicit host kfp sends no credentials of its own (it skips kube config), apart
    from a cookie/header saved in ~/.config/kfp/context.json. `namespace` is the user's profile
    namespace on multi-user Kubeflow.
    """
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--host {host}: expected an http(s) URL, e.g. http://localhost:8080")
    if parts.username or parts.password:
        raise UserError("--host: the URL must not carry credentials; pass --token or set KFP_TOKEN")
    host = host.rstrip("/")
    token, source = _token(token)
    _probe(host, token)

    kwargs: dict[str, Any] = {"host": host, "existing_token": token}
    if namespace:
        kwargs["namespace"] = namespace
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
            client = kfp.Client(**kwargs)
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise UserError(f"--host {host}: cannot reach the Kubeflow Pipelines API ({_reason(e)})") from None
    log.info("KFP API at %s%s%s", host, f", namespace {namespace}" if namespace else "",
             f", bearer token from {source}" if token else ", no token")
    return client


def _token(token: str | None) -> tuple[str | None, str]:
    """The bearer token and where it came from: --token, $KFP_TOKEN, or the Kubeflow service-account
    token projected into pods (multi-user Kubeflow; path from $KF_PIPELINES_SA_TOKEN_PATH)."""
    if token and token.strip():
        return token.strip(), "--token"
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip(), TOKEN_ENV
    path = Path(os.environ.get(SA_TOKEN_PATH_ENV) or SA_TOKEN_PATH)
    if path.is_file():
        return path.read_text().strip() or None, f"the service-account token at {path}"
    return None, ""


def _probe(host: str, token: str | None) -> None:
    """GET /healthz with short timeouts, so a wrong host fails in seconds with a reason, not a hang.

    kfp.Client itself has no timeout, and its constructor calls healthz and retries five times on an
    HTTP error. The probe uses urllib3 + certifi like kfp, so TLS behaves the same.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
    try:
        r = pool.request("GET", host + HEALTHZ_PATH, headers=headers,
                         timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
                         # a redirect is answered, not followed: it is a login page, and the token stays here
                         retries=urllib3.Retry(connect=0, read=0, redirect=0, status=0, raise_on_redirect=False))
    except urllib3.exceptions.HTTPError as e:
        raise UserError(f"--host {host}: cannot reach the Kubeflow Pipelines API ({_reason(e)})") from None
    finally:
        pool.clear()
    if r.status in (401, 403):
        raise UserError(f"--host {host}: the Kubeflow Pipelines API refused the credentials (HTTP {r.status}); "
                        f"pass --token or set {TOKEN_ENV}")
    if r.status >= 500:
        raise RuntimeError(f"{host}{HEALTHZ_PATH}: HTTP {r.status}")  # server trouble: retryable, not user input
    if r.status >= 300 or "json" not in (r.headers.get("Content-Type") or ""):
        what = f"HTTP {r.status}" if r.status >= 300 else f"a {r.headers.get('Content-Type') or 'non-JSON'} page"
        raise UserError(f"--host {host}: no Kubeflow Pipelines API there ({HEALTHZ_PATH} answered {what}; "
                        "a redirect to a login page needs --token; a dashboard URL may need the /pipeline suffix)")


def _reason(exc: BaseException) -> str:
    """One short line for a connection failure: 'connection refused', 'cannot resolve …', 'timed out …'."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve the host name: {cause.strerror}"
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return f"no reply within {READ_TIMEOUT_S:g} s"
    # after the cases above: urllib3's NewConnectionError is a subclass of ConnectTimeoutError
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    text = str(exc)
    if "): " in text:  # urllib3 prefixes "HTTPConnection(host=…, port=…): "
        text = text.split("): ", 1)[1]
    return " ".join(text.split())


@contextlib.contextmanager
def _kfp_call(what: str, conflict: str | None = None) -> Iterator[None]:
    """Log what kfp prints (UI links) instead of printing it; turn HTTP 4xx into one-line UserErrors.

    `conflict` is the message for HTTP 409 (the name is taken).
    """
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    except kfp_server_api.ApiException as e:
        if e.status is None or not 400 <= e.status < 500:
            raise
        if e.status == 409 and conflict:
            raise UserError(conflict) from None
        if e.status in (401, 403):
            raise UserError(f"{what}: the Kubeflow Pipelines API refused the credentials (HTTP {e.status}); "
                            f"pass --token or set {TOKEN_ENV}") from None
        raise UserError(f"{what}: the Kubeflow Pipelines API said HTTP {e.status}: {_api_message(e)}") from None
    finally:
        for line in out.getvalue().splitlines():
            if line.strip():
                log.info("%s", line.strip())


def _api_message(e: kfp_server_api.ApiException) -> str:
    try:
        body = json.loads(e.body)
        text = body.get("message") or body.get("error_message") or body.get("error") or e.reason
    except (TypeError, ValueError, AttributeError):
        text = e.body or e.reason
    text = " ".join(str(text).split())
    return text if len(text) <= 300 else text[:297] + "..."


# --- versions ------------------------------------------------------------------------------------


def version_name(package_version: str, git_sha: str | None) -> str:
    """The pipeline version name: "0.1.0+g1a2b3c4" (PEP 440 local label), or "0.1.0" without git."""
    if not git_sha:
        return package_version
    return f"{package_version}{'.' if '+' in package_version else '+'}g{git_sha}"


# --- package and parameters ----------------------------------------------------------------------


def _load_spec(package_path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(package_path)
    if not path.is_file():
        raise UserError(f"pipeline package {path}: no such file (compile the pipeline first)")
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"pipeline package {path}: expected a compiled pipeline .yaml")
    try:
        with path.open() as f:
            spec = next(yaml.safe_load_all(f), None)  # a second document, if any, is the platform spec
    except yaml.YAMLError as e:
        raise UserError(f"pipeline package {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(spec, dict) or "root" not in spec or "pipelineInfo" not in spec:
        raise UserError(f"pipeline package {path}: not a compiled KFP v2 pipeline (no root / pipelineInfo)")
    return spec


_TYPE_WORDS = {
    "STRING": "a string",
    "NUMBER_INTEGER": "an integer",
    "NUMBER_DOUBLE": "a number",
    "BOOLEAN": "true or false",
    "LIST": "a JSON list",
    "STRUCT": "a JSON object",
}
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_params(pairs: Sequence[str], package_path: str | os.PathLike[str]) -> dict[str, Any]:
    """`NAME=VALUE` strings → values typed by the pipeline's `root.inputDefinitions.parameters`.

    Parameters left out keep the defaults compiled into the package; one without a default is an error.
    """
    declared = _load_spec(package_path)["root"].get("inputDefinitions", {}).get("parameters", {})
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"--param {pair}: expected NAME=VALUE")
        if name not in declared:
            raise UserError(f"--param {name}: the pipeline has no parameter '{name}' (it has: {', '.join(declared)})")
        if name in params:
            raise UserError(f"--param {name}: given twice")
        ptype = declared[name].get("parameterType", "STRING")
        try:
            params[name] = _typed(text, ptype)
        except ValueError:
            raise UserError(f"--param {name}={text}: expected {_TYPE_WORDS.get(ptype, ptype)} ({ptype})") from None
    missing = [n for n, d in declared.items()
               if n not in params and "defaultValue" not in d and not d.get("isOptional")]
    if missing:
        raise UserError(f"--param: the pipeline needs {', '.join(missing)} (no default); pass --param NAME=VALUE")
    return params


def _typed(text: str, ptype: str) -> Any:
    """Raises ValueError when `text` is not a `ptype` value."""
    if ptype == "STRING":
        return text
    if ptype == "NUMBER_INTEGER":
        return int(text.strip())
    if ptype == "NUMBER_DOUBLE":
        value = float(text.strip())
        if not math.isfinite(value):  # JSON has no NaN or infinity
            raise ValueError(text)
        return value
    if ptype == "BOOLEAN":
        word = text.strip().lower()
        if word not in _BOOLS:
            raise ValueError(text)
        return _BOOLS[word]
    if ptype in ("LIST", "STRUCT"):
        value = json.loads(text)
        if not isinstance(value, list if ptype == "LIST" else dict):
            raise ValueError(text)
        return value
    raise ValueError(f"unsupported parameter type {ptype}")


# --- cron ----------------------------------------------------------------------------------------

# robfig/cron v1 (what KFP's ScheduledWorkflow controller parses with): seconds first, 6 fields; times UTC.
_CRON_FIELDS = (
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {m: i for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)}),
    ("day of week", 0, 6, {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}),
)
_CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_GO_DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")
_CRON_EXAMPLE = "e.g. '0 0 3 * * 1' (Mondays 03:00 UTC)"


def validate_cron(expr: str) -> str:
    """Check a KFP cron expression offline (6 fields, seconds first, as robfig/cron v1); return it stripped.

    A 5-field Unix expression is refused: robfig would read it as seconds-first with no day-of-week and
    silently run at the wrong times.
    """
    expr = " ".join(expr.split())
    if expr.startswith("@"):
        if expr in _CRON_DESCRIPTORS or (expr.startswith("@every ") and _GO_DURATION.fullmatch(expr[7:])):
            return expr
        raise UserError(f"--cron '{expr}': unknown descriptor; use 6 fields, {_CRON_EXAMPLE}")
    fields = expr.split(" ") if expr else []
    if len(fields) == 5:
        suggestion = " ".join(["0", *fields])
        raise UserError(f"--cron '{expr}': KFP cron has 6 fields, seconds first, e.g. '{suggestion}'")
    if len(fields) != 6:
        raise UserError(f"--cron '{expr}': KFP cron has 6 fields (second minute hour day-of-month month "
                        f"day-of-week), got {len(fields)}; {_CRON_EXAMPLE}")
    for text, (what, lo, hi, names) in zip(fields, _CRON_FIELDS, strict=True):
        problem = _cron_field_problem(text, lo, hi, names)
        if problem:
            raise UserError(f"--cron '{expr}': {what} field '{text}': {problem}; {_CRON_EXAMPLE}")
    return expr


def _cron_field_problem(text: str, lo: int, hi: int, names: dict[str, int]) -> str | None:
    """What is wrong with one field (comma list of `*`, `?`, `a`, `a-b`, each with optional `/step`), or None."""

    def number(s: str) -> int:
        if s.lower() in names:
            return names[s.lower()]
        if not s.isdigit():
            raise ValueError(f"'{s}' is not a number" + (" or a name" if names else ""))
        return int(s)

    try:
        for part in text.split(","):
            span, slash, step = part.partition("/")
            if slash and (not step.isdigit() or int(step) == 0):
                return f"step '{step}' must be a positive integer"
            if span in ("*", "?"):
                continue
            first, dash, last = span.partition("-")
            start = number(first)
            end = number(last) if dash else (hi if slash else start)
            if not lo <= start <= hi or not lo <= end <= hi:
                return f"values must be within {lo}-{hi}"
            if start > end:
                return f"range {span} runs backwards"
    except ValueError as e:
        return str(e)
    return None


# --- actions -------------------------------------------------------------------------------------


def _equals(key: str, value: str) -> str:
    """A v2beta1 list filter: key == value (operation 1 is EQUALS, as kfp.Client sends it)."""
    return json.dumps({"predicates": [{"operation": 1, "key": key, "stringValue": value}]})


def _namespace(client: kfp.Client) -> str | None:
    return client.get_user_namespace() or None


def _find_pipeline(client: kfp.Client, name: str) -> str | None:
    with _kfp_call(f"pipeline {name}"):
        found = client.list_pipelines(filter=_equals("display_name", name), namespace=_namespace(client)).pipelines
    if found and len(found) > 1:
        raise UserError(f"pipeline {name}: {len(found)} pipelines have this name; rename or delete all but one")
    return found[0].pipeline_id if found else None


def _find_version(client: kfp.Client, pipeline_id: str, version: str) -> str | None:
    with _kfp_call(f"pipeline version {version}"):
        found = client.list_pipeline_versions(pipeline_id, filter=_equals("display_name", version)).pipeline_versions
    return found[0].pipeline_version_id if found else None


def upload(client: kfp.Client, package_path: str | os.PathLike[str], pipeline_name: str,
           version: str) -> tuple[str, str]:
    """Upload the package as version `version` of pipeline `pipeline_name`; return (pipeline_id, version_id).

    A missing pipeline is created first; KFP then also creates a default version named after the pipeline
    (same spec), so a new pipeline ends with two versions, the newest named `version`. A version name
    that already exists is a UserError: a name stands for one spec, and a rebuilt package under the same
    name may differ (bump the version or commit, which changes the git sha in the name).
    """
    _load_spec(package_path)
    if not pipeline_name.strip() or not version.strip():
        raise UserError(f"upload: pipeline name '{pipeline_name}' and version '{version}' must not be empty")
    package = str(package_path)
    pipeline_id = _find_pipeline(client, pipeline_name)
    if pipeline_id is None:
        with _kfp_call(f"pipeline {pipeline_name}"):
            pipeline_id = client.upload_pipeline(package, pipeline_name=pipeline_name,
                                                 namespace=_namespace(client)).pipeline_id
        log.info("created pipeline %s (id %s)", pipeline_name, pipeline_id)
        if version == pipeline_name:  # KFP's default version already carries this name
            version_id = _find_version(client, pipeline_id, version)
            if version_id:
                return pipeline_id, version_id
    else:
        existing = _find_version(client, pipeline_id, version)
        if existing:
            raise UserError(f"pipeline {pipeline_name} already has a version '{version}' (id {existing}); "
                            "bump the package version or commit your changes")
    # 409: someone else uploaded this version between our check and the upload
    with _kfp_call(f"pipeline {pipeline_name} version {version}",
                   conflict=f"pipeline {pipeline_name} already has a version '{version}'"):
        v = client.upload_pipeline_version(package, pipeline_version_name=version, pipeline_id=pipeline_id)
    log.info("uploaded pipeline %s version %s (pipeline id %s, version id %s)",
             pipeline_name, version, pipeline_id, v.pipeline_version_id)
    return pipeline_id, v.pipeline_version_id


def _experiment_id(client: kfp.Client, name: str) -> str:
    """The id of experiment `name`, created when missing (kfp looks it up by name first)."""
    if not name.strip():
        raise UserError("--experiment: must not be empty")
    with _kfp_call(f"experiment {name}"):
        experiment = client.create_experiment(name=name, namespace=_namespace(client))
    log.info("experiment %s (id %s)", name, experiment.experiment_id)
    return experiment.experiment_id


def submit(client: kfp.Client, package_path: str | os.PathLike[str], params: dict[str, Any], experiment: str,
           run_name: str | None = None) -> str:
    """Start one run of the package in `experiment` (created if missing); return the run id."""
    spec = _load_spec(package_path)
    run_name = run_name or f"{spec['pipelineInfo']['name']} {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC"
    experiment_id = _experiment_id(client, experiment)
    with _kfp_call(f"run {run_name}"):
        run = client.run_pipeline(experiment_id=experiment_id, job_name=run_name,
                                  pipeline_package_path=str(package_path), params=params)
    log.info("started run %s (id %s) with %s", run_name, run.run_id, params or "the compiled defaults")
    return run.run_id


def schedule(client: kfp.Client, package_path_or_ids: str | os.PathLike[str] | tuple[str, str], cron: str,
             params: dict[str, Any], experiment: str, name: str) -> str:
    """Create an enabled recurring run; return its id.

    `package_path_or_ids` is a compiled package (its spec is embedded in the schedule) or
    (pipeline_id, version_id) of an uploaded version (preferred: the UI links the schedule to it).
    At most one run at a time, and no backfill of missed slots after a pause. A schedule of the same
    name in the experiment is a UserError, so re-running a deploy script does not double the runs.
    """
    cron = validate_cron(cron)
    if not name.strip():
        raise UserError("--name: the recurring run needs a name")
    source: dict[str, Any]
    if isinstance(package_path_or_ids, tuple):
        pipeline_id, version_id = package_path_or_ids
        if not pipeline_id or not version_id:
            raise UserError(f"schedule: need both a pipeline id and a version id, got {package_path_or_ids}")
        source = {"pipeline_id": pipeline_id, "version_id": version_id}
    else:
        _load_spec(package_path_or_ids)
        source = {"pipeline_package_path": str(package_path_or_ids)}
    experiment_id = _experiment_id(client, experiment)
    with _kfp_call(f"recurring run {name}"):
        existing = client.list_recurring_runs(experiment_id=experiment_id,
                                              filter=_equals("display_name", name)).recurring_runs
    if existing:
        raise UserError(f"--name {name}: experiment {experiment} already has this recurring run "
                        f"(id {existing[0].recurring_run_id}); delete or disable it first, or pick another name")
    with _kfp_call(f"recurring run {name}"):
        rr = client.create_recurring_run(experiment_id=experiment_id, job_name=name, cron_expression=cron,
                                         max_concurrency=1, no_catchup=True, params=params, enabled=True,
                                         **source)
    log.info("scheduled recurring run %s (id %s): cron '%s' (UTC), one run at a time, no catch-up",
             name, rr.recurring_run_id, cron)
    return rr.recurring_run_id
