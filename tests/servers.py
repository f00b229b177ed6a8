"""Real servers on loopback for tests: S3 (moto server mode), PostgreSQL databases, an MLflow server.

Context managers (usable from any script) plus pytest fixtures. Register the fixtures suite-wide with
`pytest_plugins = ["servers"]` in tests/conftest.py — that also turns on the autouse fixtures that keep
every test away from real AWS and from any MLflow server configured in the developer's shell. A test
module may instead import the fixtures it uses (`from servers import mlflow_pg_s3, moto_endpoint`).

Servers bind 127.0.0.1 on a free port and are started once per session where they are slow to start
(the MLflow server: database migrations on a fresh Postgres take seconds).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from datadream.serving.local import stop_process_group

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
ARTIFACTS_BUCKET = "mlflow-artifacts"
ARTIFACTS_PREFIX = "root"
# The session server accepts only this Host header, like a production server with --allowed-hosts set:
# clients must use the URL it yields (127.0.0.1); `localhost` gets the DNS-rebinding 403.
SESSION_ALLOWED_HOSTS = "127.0.0.1:*"

# Credentials moto accepts and AWS would reject; every process the tests start gets these.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Other ways botocore could find real credentials or a real endpoint.
AWS_ENV_TO_UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
)
MLFLOW_ENV_TO_UNSET = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
)


def free_port() -> int:
    """A port that was free a moment ago (the server binds it next; a clash fails loudly at start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url() -> str:
    """An http URL on loopback where nothing listens (connections are refused at once)."""
    return f"http://127.0.0.1:{free_port()}"


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AWS_ENV_TO_UNSET and not k.startswith("MLFLOW_")}
    env.update(FAKE_AWS_ENV)
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env.update(extra)
    return env


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before answering:\n{_tail(log)}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 60) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _bin(name: str) -> str:
    """A console script of this virtualenv (beside the running interpreter)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise RuntimeError(f"{path}: not found; install the test dependencies into this environment")
    return str(path)


@contextlib.contextmanager
def _server(cmd: list[str], env: dict[str, str], health_url: str, what: str, timeout_s: float) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="datadream-server-") as tmp:
        log = Path(tmp) / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        try:
            _wait_http(health_url, proc, log, timeout_s, what)
            yield log
        finally:
            stop_process_group(proc)


# --- context managers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def moto_s3(timeout_s: float = 30) -> Iterator[str]:
    """A moto S3 server (all of moto's services, really) on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with _server(cmd, _child_env(), f"{url}/moto-api/", "moto_server", timeout_s):
        yield url


def s3_client(endpoint: str):
    """A boto3 S3 client for the moto endpoint, with the fake credentials spelled out."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )


def ensure_bucket(endpoint: str, bucket: str) -> None:
    client = s3_client(endpoint)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    client = s3_client(endpoint)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _pg_admin():
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5)
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def postgres_db(prefix: str = "datadream_test") -> Iterator[str]:
    """A fresh database on the local PostgreSQL; yields its SQLAlchemy URL and drops it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = _pg_admin()
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    try:
        yield f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        conn = _pg_admin()
        try:
            with conn.cursor() as cur:
                # A server we started may still hold pooled connections: close them first.
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                    "pg_backend_pid()",
                    (name,),
                )
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            conn.close()


@contextlib.contextmanager
def mlflow_server(
    backend_uri: str,
    artifacts_destination: str,
    allowed_hosts: str | None = None,
    s3_endpoint: str | None = None,
    timeout_s: float = 60,
) -> Iterator[str]:
    """A real `mlflow server` (uvicorn, one worker) on 127.0.0.1 with proxied artifacts; yields its URL.

    For an `s3://bucket/...` destination, pass the moto endpoint: the bucket is created first and the
    server process gets MLFLOW_S3_ENDPOINT_URL and the fake credentials (clients need none).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # MLflow 3.17 turns job execution on by default (a job runner plus 7 huey consumers, ~50 threads);
    # nothing here uses it, and the reliability notes say keep it off (CVE-2026-0545).
    extra: dict[str, str] = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if artifacts_destination.startswith("s3://"):
        if not s3_endpoint:
            raise ValueError("an s3:// artifacts destination needs s3_endpoint (the moto server)")
        ensure_bucket(s3_endpoint, artifacts_destination[len("s3://") :].split("/", 1)[0])
        extra["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    cmd = [
        _bin("mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", artifacts_destination,
    ]  # fmt: skip
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    with _server(cmd, _child_env(**extra), f"{url}/health", "mlflow server", timeout_s):
        yield url


# --- pytest fixtures -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowServer:
    url: str  # http://127.0.0.1:PORT — the only Host header the server accepts
    backend_uri: str
    s3_endpoint: str
    bucket: str
    prefix: str  # artifacts land under s3://bucket/prefix/<experiment id>/<run id>/artifacts/
    allowed_hosts: str

    def list_keys(self, prefix: str = "") -> list[str]:
        """Object keys in the artifacts bucket, read straight from S3 (not through MLflow)."""
        return list_keys(self.s3_endpoint, self.bucket, prefix)


@pytest.fixture(scope="session", autouse=True)
def fake_aws_credentials(tmp_path_factory) -> Iterator[None]:
    """No test can reach real AWS: fake keys, no profiles, empty config files, no instance metadata."""
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    with pytest.MonkeyPatch.context() as mp:
        for key in AWS_ENV_TO_UNSET:
            mp.delenv(key, raising=False)
        for key, value in FAKE_AWS_ENV.items():
            mp.setenv(key, value)
        mp.setenv("AWS_CONFIG_FILE", str(empty))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        yield


@pytest.fixture(scope="session", autouse=True)
def isolated_mlflow_tracking(tmp_path_factory) -> Iterator[str]:
    """No test logs to the developer's MLflow: the default tracking store is a session SQLite file.

    Tests that need another store set MLFLOW_TRACKING_URI (monkeypatch) or pass a URI explicitly.
    """
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow-default') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        for key in MLFLOW_ENV_TO_UNSET:
            mp.delenv(key, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Endpoint URL of a moto S3 server shared by the session (use unique bucket names per test)."""
    with moto_s3() as url:
        yield url


@pytest.fixture(scope="session")
def mlflow_pg_s3(moto_endpoint) -> Iterator[MlflowServer]:
    """One MLflow server for the session: Postgres backend, artifacts proxied to S3 on moto."""
    destination = f"s3://{ARTIFACTS_BUCKET}/{ARTIFACTS_PREFIX}"
    with (
        postgres_db("datadream_mlflow") as backend,
        mlflow_server(backend, destination, allowed_hosts=SESSION_ALLOWED_HOSTS, s3_endpoint=moto_endpoint) as url,
    ):
        yield MlflowServer(url, backend, moto_endpoint, ARTIFACTS_BUCKET, ARTIFACTS_PREFIX, SESSION_ALLOWED_HOSTS)


@pytest.fixture
def mlflow_sqlite(tmp_path) -> str:
    """A fresh embedded tracking store for one test (`sqlite:////abs/path/mlflow.db`)."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
