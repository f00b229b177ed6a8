"""MLflow tracking for DataDream: one parent run per pipeline run, one child run per stage.

Where runs go: `check_tracking()` resolves the tracking URI — its argument, else $MLFLOW_TRACKING_URI,
else the embedded default `sqlite:///<absolute working dir>/mlflow.db` (MLflow's own default is the
relative `sqlite:///mlflow.db`; we make it absolute so every process of a local pipeline run writes the
same file even when they start in different folders). With a SQLite store, experiments we create keep
their artifacts beside the database, in `<db folder>/mlartifacts/`, instead of MLflow's `./mlruns`
relative to whatever the working dir happens to be. On a cluster, point MLFLOW_TRACKING_URI at the
MLflow server (Postgres backend, artifacts proxied to S3): clients then need no S3 credentials.

`check_tracking()` fails fast — before any GPU work — with a one-line `UserError` when the server is
unreachable, refuses our Host header (the DNS-rebinding 403 of MLflow ≥ 3.5) or our credentials.

Runs survive retries: `start_pipeline_run` re-attaches to the run tagged with the same `kfp.run_id`,
and `stage_run` to the child with the same parent and stage, so a retried KFP task continues its run
instead of leaving a duplicate behind. Children name their parent by id (`mlflow.parentRunId`), which
works across processes and pods.

The `log_*` helpers log to the given run, else to the active run (inside `stage_run`), else do
nothing: stages call them unconditionally and are tracked only when run inside a tracked context.

No credentials are ever logged or put into a message: `redact()` strips `user:password@` from URLs
and secrets from query strings, and is applied to messages, tags and parameter values.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from datadream.errors import UserError, redact

if TYPE_CHECKING:
    import mlflow
    from PIL import Image

    from datadream.config import Config

logger = logging.getLogger(__name__)

KIND_TAG = "datadream.kind"  # "pipeline" on parent runs, "stage" on children
STAGE_TAG = "datadream.stage"
ATTEMPT_TAG = "datadream.attempt"  # 1 on the first start, +1 on every re-attach
ERROR_TAG = "datadream.error"
KFP_RUN_TAG = "kfp.run_id"
# Parent tags copied onto each child, so stage runs can be filtered by them too.
INHERITED_TAGS = (KFP_RUN_TAG, "git_sha", "config_hash", "data_hash")

_PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
_MAX_PARAM_LEN = 6000  # MAX_PARAM_VAL_LENGTH
_MAX_TAG_LEN = 8000  # MAX_TAG_VAL_LENGTH

# --- credentials never leave this module -----------------------------------------------------------

# --- where runs go -------------------------------------------------------------------------------------


def default_tracking_uri() -> str:
    """The embedded store: `sqlite:///<absolute working dir>/mlflow.db`."""
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    return (uri or os.environ.get("MLFLOW_TRACKING_URI") or "").strip() or default_tracking_uri()


def check_tracking(uri: str | None = None, timeout_s: float = 10) -> str:
    """Resolve the tracking URI, fail fast if it cannot work, and make it this process's tracking URI.

    http(s): GET /health (is anything there?) then one cheap authenticated API call (search one
    experiment), without retries and with `timeout_s` per request, so a wrong URL, a server that
    rejects our Host header (403 "Invalid Host header", see --allowed-hosts) or bad credentials are a
    one-line UserError here rather than minutes of retries after the GPU work. sqlite: the database's
    folder is created. Other database URIs: one connection is opened. Returns the resolved URI.
    """
    import mlflow

    uri = resolve_tracking_uri(uri)
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_server(uri, timeout_s)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme == "file" or (not scheme and "://" not in uri):
        path = Path(unquote(urlsplit(uri).path) if scheme else uri)
        _mkdir(path, uri)
    elif "+" in scheme or scheme in ("postgresql", "postgres", "mysql", "mssql"):
        _check_database(uri, timeout_s)
    mlflow.set_tracking_uri(uri)
    logger.info("MLflow tracking: %s", redact(uri))
    return uri


def _server_error(uri: str, what: str) -> UserError:
    return UserError(f"MLflow tracking server {redact(uri)}: {what}")


def _reason(exc: BaseException, timeout_s: float) -> str:
    """A short, one-line, credential-free reason for a failed request."""
    import requests

    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer within {timeout_s:g} s"
    text = str(exc)
    errno = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return errno[-1].strip().rstrip(".")
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error: " + (text.splitlines()[0][:200] if text else type(exc).__name__)
    first = text.splitlines()[0] if text else type(exc).__name__
    return redact(first)[:200]


def _body(response) -> str:
    text = " ".join((response.text or "").split())
    with contextlib.suppress(ValueError, AttributeError):
        data = json.loads(response.text)
        text = str(data.get("message") or data.get("error_code") or text)
    return redact(text)[:200]


def _check_server(uri: str, timeout_s: float) -> None:
    import requests
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    base = uri.rstrip("/")
    creds = get_default_host_creds(base)
    # /health is exempt from MLflow's Host-header check and needs no auth: it tells "nothing there"
    # apart from "there but refusing us".
    try:
        health = requests.get(f"{base}/health", timeout=timeout_s, verify=creds.verify, allow_redirects=False)
    except requests.RequestException as e:
        raise _server_error(uri, f"unreachable ({_reason(e, timeout_s)})") from None
    if health.status_code != 200:
        logger.warning("MLflow tracking server %s: /health answered HTTP %s", redact(uri), health.status_code)

    # MLflow's own request path (its auth: MLFLOW_TRACKING_USERNAME/PASSWORD, _TOKEN, plugins), no retries.
    try:
        response = http_request(
            creds,
            "/api/2.0/mlflow/experiments/search",
            "POST",
            max_retries=0,
            backoff_factor=0,
            timeout=timeout_s,
            raise_on_status=False,
            json={"max_results": 1},
        )
    except Exception as e:
        cause = e.__cause__ or e
        raise _server_error(uri, f"unreachable ({_reason(cause, timeout_s)})") from None
    status = response.status_code
    if status == 200:
        try:
            response.json()
        except ValueError:
            raise _server_error(
                uri, "answered the API with something that is not JSON (a login page or a proxy? check the URL)"
            ) from None
        return
    body = _body(response)
    if status == 403 and "host header" in body.lower():
        host = urlsplit(base).netloc.rsplit("@", 1)[-1]
        raise _server_error(
            uri,
            f"HTTP 403 {body!r}: the server does not allow the Host header {host!r}; add it to the "
            "server's --allowed-hosts (MLFLOW_SERVER_ALLOWED_HOSTS) or use a URL with an allowed host name",
        )
    if status in (401, 403):
        raise _server_error(
            uri,
            f"HTTP {status} {body!r}: authentication failed; set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN",
        )
    raise _server_error(uri, f"HTTP {status} from the tracking API ({body!r}); is this an MLflow server?")


def _mkdir(path: Path, uri: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"MLflow tracking store {redact(uri)}: cannot create folder {path} ({e.strerror})") from None


def _sqlite_path(uri: str) -> Path | None:
    """The database file of `sqlite:///relative` or `sqlite:////absolute`; None for in-memory."""
    rest = uri[len("sqlite://") :]
    if not rest.startswith("/"):
        return None
    path = unquote(rest[1:].split("?", 1)[0])
    return Path(path) if path and path != ":memory:" else None


def _check_sqlite(uri: str) -> None:
    path = _sqlite_path(uri)
    if path is not None:
        _mkdir(path.parent, uri)


def _check_database(uri: str, timeout_s: float) -> None:
    try:
        import sqlalchemy

        args = {"connect_timeout": max(1, round(timeout_s))} if uri.startswith("postgres") else {}
        engine = sqlalchemy.create_engine(uri, connect_args=args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except ImportError as e:
        raise UserError(f"MLflow tracking store {redact(uri)}: database driver not installed ({e.name})") from None
    except Exception as e:
        first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"MLflow tracking store {redact(uri)}: unreachable ({redact(first)[:200]})") from None


def git_sha(repo_dir: str | os.PathLike[str]) -> str | None:
    """Short sha of HEAD, plus "-dirty" when tracked files changed (as `git describe --dirty`); None outside git."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git binary, or it hung
        return None
    sha = head.stdout.strip()
    return f"{sha}-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else sha


def code_version() -> str | None:
    """The code's git sha for lineage: $DATADREAM_GIT_SHA (set in the image at build time), else the
    checkout this package runs from, else None."""
    return os.environ.get("DATADREAM_GIT_SHA") or git_sha(Path(__file__).resolve().parent)


# --- runs ----------------------------------------------------------------------------------------------


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _quote(value: str, what: str) -> str:
    """A value for an MLflow search filter; quotes are refused rather than escaped."""
    if "'" in value or "\\" in value:
        raise UserError(f"{what} {value!r}: must not contain quotes or backslashes")
    return f"'{value}'"


def _artifact_root_beside_db(name: str) -> str | None:
    """For a SQLite store: `<db folder>/mlartifacts/<experiment name>` as a file URI."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:"):
        return None
    path = _sqlite_path(uri)
    if path is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    return (path.resolve().parent / "mlartifacts" / slug).as_uri()


# The experiment tag that marks a model-training (not GenAI) experiment. MLflow 3.17's UI ignores it: it
# picks its view from the URL's `?workflowType=machine_learning` (see UI_QUERY), else from the browser's
# last choice, else GenAI; other MLflow UIs read the tag.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_QUERY = "?workflowType=machine_learning"


def experiment_url(ui: str, experiment_id: str) -> str:
    """The page of an experiment's runs in the MLflow UI at `ui` (e.g. http://127.0.0.1:5000), in its
    model-training view (UI_QUERY)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs{UI_QUERY}"


def get_or_create_experiment(name: str) -> str:
    """The id of the experiment called `name`, created if absent (safe when several processes race) and
    tagged as a model-training experiment (EXPERIMENT_KIND)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_root_beside_db(name),
                                            tags=EXPERIMENT_KIND)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise UserError(f"MLflow experiment {name!r}: it is deleted; restore it or choose another experiment name")
    return experiment.experiment_id


def _oldest(runs: list) -> Any:
    return min(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _find_or_create(experiment_id: str, filter_string: str, run_name: str | None, tags: dict[str, str]) -> tuple:
    """(run, created): the oldest active run matching `filter_string`, else a new one with `tags`.

    Best-effort against races (MLflow has no unique constraint on tags): a creator that then finds an
    older match deletes its own run and uses that one. Retries are sequential, so in practice this
    only matters for two tasks started at once with the same key.
    """
    client = _client()
    found = client.search_runs([experiment_id], filter_string, max_results=50)
    if found:
        return _oldest(found), False
    try:
        from mlflow.tracking.context.registry import resolve_tags

        all_tags = resolve_tags(tags)  # source, user and git tags, as mlflow.start_run adds them
    except Exception:  # context providers are best-effort
        all_tags = dict(tags)
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    found = client.search_runs([experiment_id], filter_string, max_results=50)
    oldest = _oldest(found) if found else run
    if oldest.info.run_id != run.info.run_id:
        logger.info("MLflow: run %s lost a creation race to %s; deleting it", run.info.run_id, oldest.info.run_id)
        client.delete_run(run.info.run_id)
        return oldest, False
    return run, True


def _bump_attempt(run) -> None:
    try:
        attempt = int(run.data.tags.get(ATTEMPT_TAG, "1")) + 1
    except ValueError:
        attempt = 2
    _client().set_tag(run.info.run_id, ATTEMPT_TAG, str(attempt))


def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): redact(str(v))[:_MAX_TAG_LEN] for k, v in tags.items() if v is not None}


def start_pipeline_run(
    experiment: str, tags: Mapping[str, Any], params: Mapping[str, Any] | None = None, run_name: str | None = None,
    match_tag: str = KFP_RUN_TAG,
) -> str:
    """The id of the parent run of this pipeline run, created or re-attached; it is left RUNNING.

    `tags` should carry `kfp.run_id`, `git_sha`, `config_hash` and `data_hash`. An active run in
    `experiment` with the same `kfp.run_id` is reused (a retried or resumed pipeline run), its tags
    updated and only params it lacks added. Without `kfp.run_id` every call creates a new run.
    `params` may be nested; they are flattened to "section.key". End it with `finish_pipeline_run`.
    `match_tag` names the tag that identifies the run instead (a search campaign: `optuna.study`).
    """
    clean = _clean_tags(tags)
    clean[KIND_TAG] = "pipeline"
    experiment_id = get_or_create_experiment(experiment)
    key = clean.get(match_tag)
    if key:
        filter_string = f"tags.`{match_tag}` = {_quote(key, match_tag)} and tags.`{KIND_TAG}` = 'pipeline'"
        run, created = _find_or_create(experiment_id, filter_string, run_name, {**clean, ATTEMPT_TAG: "1"})
    else:
        logger.warning("MLflow: no %s tag; a new pipeline run is created that a retry cannot re-attach to", match_tag)
        run, created = _client().create_run(experiment_id, tags={**clean, ATTEMPT_TAG: "1"}, run_name=run_name), True
    run_id = run.info.run_id
    if not created:
        logger.info("MLflow: re-attached to pipeline run %s (%s=%s)", run_id, match_tag, key)
        _set_tags(run_id, clean)
        _bump_attempt(run)
    if params:
        _log_params(run_id, flatten(params))
    return run_id


def pipeline_run_name(mode: str, kfp_run_id: str | None) -> str:
    """The parent run's name in the runs table, e.g. "datadream class-wise 82384307"."""
    return " ".join(p for p in ("datadream", f"{mode}-wise" if mode else "", (kfp_run_id or "")[:8]) if p)


def result_metrics(results: list[Mapping[str, Any]]) -> dict[str, float]:
    """Each classifier's test accuracies as metrics of the parent run, so the runs table and charts
    compare runs: {"train_on": "synthetic+real", "top1": .., "top5": ..} -> `test_top1/synthetic-real`,
    `test_top5/synthetic-real` (MLflow metric names allow no '+'; the UI groups charts by the part before '/')."""
    out = {}
    for r in results:
        key = re.sub(r"[^\w.\- ]", "-", str(r["train_on"]))
        out.update({f"test_{m}/{key}": float(r[m]) for m in ("top1", "top5") if r.get(m) is not None})
    return out


def finish_pipeline_run(run_id: str, status: str = "FINISHED") -> None:
    """End the parent run: FINISHED, FAILED or KILLED."""
    _client().set_terminated(run_id, status)


@contextlib.contextmanager
def stage_run(
    parent_run_id: str,
    stage: str,
    config_section: Mapping[str, Any],
    tags: Mapping[str, Any] | None = None,
    prefix: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An active child run of `parent_run_id` for one stage (any process may open it, given the id).

    Params are `config_section` flattened under `prefix` (default: the stage name), e.g. the adapt
    section gives "adapt.rank". A child of the same parent with the same stage tag is re-attached to
    (a retry after a crash continues its run, adding only missing params), else created. The run ends
    FINISHED when the block succeeds, FAILED when it raises (KILLED on KeyboardInterrupt), and the
    exception propagates. Use a distinct stage name per shard, e.g. "adapt/shard-0", with prefix="adapt".
    """
    import mlflow

    client = _client()
    parent = client.get_run(parent_run_id)
    clean = {k: v for k, v in parent.data.tags.items() if k in INHERITED_TAGS}
    clean.update(_clean_tags(tags or {}))
    clean.update({KIND_TAG: "stage", STAGE_TAG: stage, "mlflow.parentRunId": parent_run_id})
    experiment_id = parent.info.experiment_id
    filter_string = (
        f"tags.mlflow.parentRunId = {_quote(parent_run_id, 'parent run id')} "
        f"and tags.`{STAGE_TAG}` = {_quote(stage, 'stage')}"
    )
    run, created = _find_or_create(experiment_id, filter_string, stage, {**clean, ATTEMPT_TAG: "1"})
    run_id = run.info.run_id
    had_error = ERROR_TAG in run.data.tags
    if not created:
        logger.info("MLflow: re-attached to %s run %s (was %s)", stage, run_id, run.info.status)
        _set_tags(run_id, {k: v for k, v in clean.items() if k != "mlflow.parentRunId"})
        _bump_attempt(run)
    _log_params(run_id, flatten(config_section, stage if prefix is None else prefix))

    active = mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
    try:
        yield active
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):  # the original error matters more than a logging failure
            first = (str(e).strip().splitlines() or [""])[0]
            client.set_tag(run_id, ERROR_TAG, redact(f"{type(e).__name__}: {first}")[:500])
        _end(run_id, status)
        raise
    if had_error:  # an earlier attempt failed; this one did not (ATTEMPT_TAG keeps the count)
        with contextlib.suppress(Exception):
            client.delete_tag(run_id, ERROR_TAG)
    _end(run_id, "FINISHED")


def _end(run_id: str, status: str) -> None:
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:  # the block ended our run itself or left another one open on top of it
        _client().set_terminated(run_id, status)


def tracked_stage(
    parent_run_id: str | None, stage: str, config_section: Mapping[str, Any], prefix: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager:
    """`stage_run(...)` when a parent run id is given (checking the tracking store first), else a no-op
    context: pipeline steps wrap their stage call in it whether or not the run is tracked."""
    if not parent_run_id:
        return contextlib.nullcontext()
    check_tracking()
    return stage_run(parent_run_id, stage, config_section, tags=tags, prefix=prefix)


# --- params --------------------------------------------------------------------------------------------


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"section.key": "value"}; lists, numbers, bools and None as JSON."""
    out: dict[str, str] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        elif isinstance(value, str):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def _set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    if tags:
        _client().log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _log_params(run_id: str, params: Mapping[str, str]) -> None:
    """Log the params the run lacks; a param already logged with another value is kept and warned about
    (MLflow params are immutable, and a retry must not fail on them)."""
    from mlflow.entities import Param

    client = _client()
    existing = client.get_run(run_id).data.params
    new = {k: redact(v)[:_MAX_PARAM_LEN] for k, v in params.items()}
    conflicts = sorted(k for k, v in new.items() if k in existing and existing[k] != v)
    if conflicts:
        logger.warning("MLflow run %s: params already logged with other values kept: %s", run_id, ", ".join(conflicts))
    missing = [Param(k, v) for k, v in new.items() if k not in existing]
    for i in range(0, len(missing), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=missing[i : i + _PARAMS_PER_BATCH])


# --- logging into a run ----------------------------------------------------------------------------------


def _target(run_id: str | None) -> str | None:
    if run_id:
        return run_id
    if "mlflow" not in sys.modules:  # no run can be active; spare untracked stages the import
        return None
    import mlflow

    active = mlflow.active_run()
    return active.info.run_id if active is not None else None


def log_step_metrics(metrics: Mapping[str, float], step: int, run_id: str | None = None) -> None:
    """Metrics of one training step (or epoch), e.g. {"loss": 0.3, "lr": 1e-4}; None values are skipped."""
    from mlflow.entities import Metric

    if (target := _target(run_id)) is None:
        return
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
    if batch:
        _client().log_batch(target, metrics=batch)


def set_tags(tags: Mapping[str, Any], run_id: str | None = None) -> None:
    """Set (or overwrite) tags on the run; values are redacted like every other tag."""
    if (target := _target(run_id)) is not None:
        _set_tags(target, _clean_tags(tags))


class StepMetrics:
    """Buffered step metrics for training loops: `add()` every step costs nothing; the buffer goes to
    the run in one `log_batch` call every `every_s` seconds (and at `flush()`/exit), so a remote
    tracking server never slows a GPU loop down. Without a target run it does nothing."""

    def __init__(self, run_id: str | None = None, every_s: float = 15.0, max_buffer: int = 900):
        self.run_id = _target(run_id)
        self.every_s, self.max_buffer = every_s, max_buffer
        self._buffer: list = []
        self._last = time.monotonic()

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        if len(self._buffer) >= self.max_buffer or time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.run_id is None or not self._buffer:
            return
        buffer, self._buffer, self._last = self._buffer, [], time.monotonic()
        client = _client()
        for i in range(0, len(buffer), 1000):  # MAX_METRICS_PER_BATCH
            client.log_batch(self.run_id, metrics=buffer[i : i + 1000])

    def __enter__(self) -> StepMetrics:
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            self.flush()
        except Exception:
            if exc_type is None:
                raise
            logger.warning("MLflow: could not log the last step metrics", exc_info=True)  # keep the real error


def log_final_metrics(metrics: Mapping[str, float], run_id: str | None = None) -> None:
    """Summary metrics of a stage (e.g. top1, top5); logged at step 0."""
    log_step_metrics(metrics, 0, run_id)


def log_artifact_file(path: str | os.PathLike, artifact_path: str | None = None, run_id: str | None = None) -> None:
    """Upload a file (or a whole folder) under `artifact_path` in the run's artifacts."""
    if (target := _target(run_id)) is None:
        return
    path = Path(path)
    if path.is_dir():
        _client().log_artifacts(target, str(path), artifact_path)
    else:
        _client().log_artifact(target, str(path), artifact_path)


def log_text(text: str, name: str, run_id: str | None = None) -> None:
    """`text` as the artifact `name` (e.g. "report.html")."""
    if (target := _target(run_id)) is not None:
        _client().log_text(target, text, name)


def log_json(obj: Any, name: str, run_id: str | None = None) -> None:
    """`obj` as the JSON artifact `name` (e.g. "results.json" or "eval/confusion.json")."""
    if (target := _target(run_id)) is None:
        return
    _client().log_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", name)


def log_config(config: Config, run_id: str | None = None) -> None:
    """The resolved config: `config.yaml` artifact plus every field as a "section.key" param."""
    import yaml

    if (target := _target(run_id)) is None:
        return
    data = config.to_dict()
    _client().log_text(target, redact(yaml.safe_dump(data, sort_keys=False)), "config.yaml")
    _log_params(target, flatten(data))


def log_table(columns: Mapping[str, list], name: str, run_id: str | None = None) -> None:
    """A table (column name -> values) as the JSON table artifact `name`, which the MLflow UI shows as a table."""
    if (target := _target(run_id)) is None:
        return
    _client().log_table(target, data=dict(columns), artifact_file=name)


def log_image(image: Image.Image, name: str, run_id: str | None = None) -> None:
    """A PIL image as the artifact `name` (its extension, e.g. .png, picks the format)."""
    if (target := _target(run_id)) is None:
        return
    _client().log_image(target, image, artifact_file=name)
