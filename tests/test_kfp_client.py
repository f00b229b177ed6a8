"""pipelines.client against a fake KFP v2beta1 API on loopback: what reaches the server, and what is refused first."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess

import kfp
import pytest
import yaml
from kfp import compiler
from kfp_fake import API, FakeKFP
from kfp_toy_pipeline import toy_pipeline

from datadream.errors import UserError
from datadream.tracking import git_sha
from pipelines import client as kc

TOKEN = "tok-3f9a-never-log-me"


@pytest.fixture(autouse=True)
def _isolated_kfp(monkeypatch, tmp_path):
    """kfp.Client reads ~/.config/kfp/context.json (namespace, auth header) and KF_PIPELINES_* env vars."""
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-sa-token"))
    for var in ("KFP_TOKEN", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
                "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME", "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def kfp_server():
    """A fake KFP API that requires the bearer token TOKEN."""
    with FakeKFP(token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    path = tmp_path_factory.mktemp("kfp") / "toy.yaml"
    compiler.Compiler().compile(toy_pipeline, str(path))
    return path


@pytest.fixture
def client(kfp_server):
    return kc.connect(kfp_server.url, token=TOKEN)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- versions


def test_version_name():
    assert kc.version_name("0.1.0", "1a2b3c4") == "0.1.0+g1a2b3c4"
    assert kc.version_name("0.1.0", "1a2b3c4-dirty") == "0.1.0+g1a2b3c4-dirty"
    assert kc.version_name("0.1.0", None) == "0.1.0"
    assert kc.version_name("0.1.0+cu121", "1a2b3c4") == "0.1.0+cu121.g1a2b3c4"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary")
def test_git_sha(tmp_path):
    assert git_sha(tmp_path) is None  # not a checkout
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    (repo / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-qm", "first")
    sha = git_sha(repo)
    assert sha and len(sha) >= 7 and all(c in "0123456789abcdef" for c in sha)
    (repo / "untracked.txt").write_text("x")
    assert git_sha(repo) == sha  # untracked files don't count, as with `git describe --dirty`
    (repo / "a.txt").write_text("2")
    assert git_sha(repo) == f"{sha}-dirty"


# --- connect


def test_connect_sends_token_from_env(kfp_server, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", TOKEN + "\n")  # a token file read into env keeps its newline
    kc.connect(kfp_server.url)
    assert kfp_server.requests
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in kfp_server.requests)


def test_connect_uses_the_pods_service_account_token(kfp_server, monkeypatch, tmp_path):
    # Multi-user Kubeflow projects a token into pods; kfp names its path KF_PIPELINES_SA_TOKEN_PATH.
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    kc.connect(kfp_server.url)
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in kfp_server.requests)


def test_connect_unreachable_host_is_one_line_user_error():
    host = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(UserError) as e:
        kc.connect(host, token=TOKEN)
    assert one_line_error(e) == f"--host {host}: cannot reach the Kubeflow Pipelines API (connection refused)"


@pytest.mark.parametrize("host", ["localhost:8080", "ftp://kfp.example.com", "http://", "kfp"])
def test_connect_host_must_be_http_url(host):
    with pytest.raises(UserError) as e:
        kc.connect(host)
    assert one_line_error(e).startswith(f"--host {host}: expected an http(s) URL")


def test_connect_wrong_token_and_wrong_path(kfp_server):
    with pytest.raises(UserError) as e:
        kc.connect(kfp_server.url, token="wrong-token")
    assert "refused the credentials (HTTP 401)" in one_line_error(e)
    assert "wrong-token" not in str(e.value)

    with pytest.raises(UserError) as e:
        kc.connect(kfp_server.url + "/not-kfp", token=TOKEN)
    assert "no Kubeflow Pipelines API there" in one_line_error(e) and "HTTP 404" in str(e.value)


def test_connect_login_redirect_is_not_followed():
    with FakeKFP(token=TOKEN, login_redirect=True) as server:
        with pytest.raises(UserError) as e:
            kc.connect(server.url)
        assert "answered HTTP 302" in one_line_error(e) and "needs --token" in str(e.value)
        assert server.calls() == [("GET", f"{API}/healthz")]


# --- upload


def test_upload_creates_pipeline_then_only_versions(client, kfp_server, package):
    compiled = yaml.safe_load(package.read_text())
    version = kc.version_name("0.1.0", "1a2b3c4")

    pipeline_id, version_id = kc.upload(client, package, "toy", version)

    [created] = kfp_server.find("POST", f"{API}/pipelines/upload")
    assert created.query["name"] == "toy"
    filename, content = created.files["uploadfile"]
    assert filename == "toy.yaml" and yaml.safe_load(content) == compiled
    [added] = kfp_server.find("POST", f"{API}/pipelines/upload_version")
    assert added.query == {"name": "0.1.0+g1a2b3c4", "pipelineid": pipeline_id}
    assert yaml.safe_load(added.files["uploadfile"][1]) == compiled
    assert kfp_server.versions[version_id]["name"] == version
    assert kfp_server.pipelines[pipeline_id]["name"] == "toy"

    # Second upload: a new version of the same pipeline, no new pipeline.
    again_pipeline_id, again_version_id = kc.upload(client, package, "toy", "0.1.1")
    assert again_pipeline_id == pipeline_id and again_version_id != version_id
    assert len(kfp_server.find("POST", f"{API}/pipelines/upload")) == 1
    assert [r.query["name"] for r in kfp_server.find("POST", f"{API}/pipelines/upload_version")] == [version, "0.1.1"]
    # KFP's default version (named after the pipeline) plus the two named ones.
    assert sorted(v["name"] for v in kfp_server.versions.values()) == ["0.1.0+g1a2b3c4", "0.1.1", "toy"]


def test_upload_existing_version_is_user_error(client, kfp_server, package):
    kc.upload(client, package, "toy", "0.1.0")
    with pytest.raises(UserError) as e:
        kc.upload(client, package, "toy", "0.1.0")
    assert "pipeline toy already has a version '0.1.0'" in one_line_error(e)
    assert len(kfp_server.find("POST", f"{API}/pipelines/upload_version")) == 1


def test_upload_missing_package(client, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        kc.upload(client, tmp_path / "missing.yaml", "toy", "0.1.0")


def test_namespace_reaches_uploads_and_experiments(kfp_server, package):
    client = kc.connect(kfp_server.url, token=TOKEN, namespace="team-a")
    kc.upload(client, package, "toy", "0.1.0")
    kc.submit(client, package, {}, "toy-exp", "r")
    assert kfp_server.find("POST", f"{API}/pipelines/upload")[0].query["namespace"] == "team-a"
    assert kfp_server.find("GET", f"{API}/pipelines")[0].query["namespace"] == "team-a"
    assert kfp_server.find("GET", f"{API}/experiments")[0].query["namespace"] == "team-a"
    assert kfp_server.find("POST", f"{API}/experiments")[0].json["namespace"] == "team-a"


# --- submit and schedule


def test_submit_creates_experiment_once_and_sends_typed_params(client, kfp_server, package):
    compiled = yaml.safe_load(package.read_text())
    params = kc.parse_params(["times=3", "scale=0.25", "loud=true", "message=a=b", 'tags=["x", "y"]'], package)

    first = kc.submit(client, package, params, "toy-exp", "run one")
    second = kc.submit(client, package, {}, "toy-exp", None)

    [exp] = kfp_server.find("POST", f"{API}/experiments")
    assert exp.json["display_name"] == "toy-exp"
    experiment_id = next(iter(kfp_server.experiments))
    runs = kfp_server.find("POST", f"{API}/runs")
    assert len(runs) == 2 and runs[0].json["display_name"] == "run one"
    assert runs[1].json["display_name"].startswith("toy-pipeline ")  # default: pipeline name + time
    body = runs[0].json
    assert body["experiment_id"] == experiment_id
    assert body["runtime_config"]["parameters"] == {"times": 3, "scale": 0.25, "loud": True, "message": "a=b",
                                                    "tags": ["x", "y"]}
    assert body["pipeline_spec"] == compiled
    assert runs[1].json["runtime_config"]["parameters"] == {}
    assert [first, second] == list(kfp_server.runs)


def test_schedule_uploaded_version(client, kfp_server, package):
    pipeline_id, version_id = kc.upload(client, package, "toy", "0.1.0")
    params = kc.parse_params(["times=5"], package)

    rr_id = kc.schedule(client, (pipeline_id, version_id), "0 0 3 * * 1", params, "nightly", "toy-weekly")

    [req] = kfp_server.find("POST", f"{API}/recurringruns")
    body = req.json
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["runtime_config"]["parameters"] == {"times": 5}
    assert body["pipeline_version_reference"] == {"pipeline_id": pipeline_id, "pipeline_version_id": version_id}
    assert "pipeline_spec" not in body
    assert body["display_name"] == "toy-weekly"
    assert body["experiment_id"] == next(iter(kfp_server.experiments))
    assert list(kfp_server.recurring_runs) == [rr_id]

    # The same schedule again would double the runs.
    with pytest.raises(UserError) as e:
        kc.schedule(client, (pipeline_id, version_id), "0 0 3 * * 1", params, "nightly", "toy-weekly")
    assert f"already has this recurring run (id {rr_id})" in one_line_error(e)
    assert len(kfp_server.find("POST", f"{API}/recurringruns")) == 1


def test_schedule_package_embeds_spec(client, kfp_server, package):
    kc.schedule(client, package, "0 30 2 * * *", {"loud": True}, "nightly", "toy-daily")
    [req] = kfp_server.find("POST", f"{API}/recurringruns")
    assert req.json["pipeline_spec"] == yaml.safe_load(package.read_text())
    assert req.json["runtime_config"]["parameters"] == {"loud": True}
    assert "pipeline_version_reference" not in req.json


@pytest.mark.parametrize("cron", ["0 3 * * 1", "every monday", "0 0 3 * * 1 2026"])
def test_schedule_validates_cron_before_any_request(client, kfp_server, package, cron):
    seen = len(kfp_server.requests)
    with pytest.raises(UserError) as e:
        kc.schedule(client, package, cron, {}, "nightly", "toy-weekly")
    assert one_line_error(e).startswith(f"--cron '{cron}': ")
    assert len(kfp_server.requests) == seen


# --- the token stays secret


def test_token_reaches_server_but_no_log_or_output(kfp_server, package, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    client = kc.connect(kfp_server.url, token=TOKEN)
    pipeline_id, version_id = kc.upload(client, package, "toy", "0.1.0")
    kc.submit(client, package, {"times": 1}, "toy-exp", "r")
    kc.schedule(client, (pipeline_id, version_id), "0 0 3 * * 1", {}, "toy-exp", "weekly")

    assert {r.path for r in kfp_server.requests} >= {f"{API}/healthz", f"{API}/pipelines/upload", f"{API}/runs",
                                                     f"{API}/recurringruns"}
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in kfp_server.requests)
    out, err = capfd.readouterr()
    assert TOKEN not in out + err
    assert out == ""  # kfp.Client prints UI links; they go to the log instead
    assert TOKEN not in caplog.text
    assert all(TOKEN not in record.getMessage() for record in caplog.records)
    messages = [r.getMessage() for r in caplog.records if r.name == "datadream.kfp"]
    assert any(pipeline_id in m and version_id in m for m in messages)
    assert any("Run details:" in r.getMessage() for r in caplog.records)  # kfp's UI link, logged


# --- parameters


def test_parse_params_types(package):
    assert kc.parse_params([], package) == {}
    assert kc.parse_params(
        ["message=", "times=-4", "scale=1e-3", "loud=False", "tags=[]", 'options={"a": [1, 2]}'], package
    ) == {"message": "", "times": -4, "scale": 0.001, "loud": False, "tags": [], "options": {"a": [1, 2]}}


def test_parse_params_unknown_name(package):
    with pytest.raises(UserError) as e:
        kc.parse_params(["foo=1"], package)
    assert one_line_error(e) == ("--param foo: the pipeline has no parameter 'foo' "
                                 "(it has: loud, message, options, scale, tags, times)")


@pytest.mark.parametrize(("pair", "expected"), [
    ("times=2.5", "--param times=2.5: expected an integer (NUMBER_INTEGER)"),
    ("scale=fast", "--param scale=fast: expected a number (NUMBER_DOUBLE)"),
    ("scale=nan", "--param scale=nan: expected a number (NUMBER_DOUBLE)"),
    ("loud=maybe", "--param loud=maybe: expected true or false (BOOLEAN)"),
    ("tags=a,b", "--param tags=a,b: expected a JSON list (LIST)"),
    ('options=["k"]', "--param options=[\"k\"]: expected a JSON object (STRUCT)"),
    ("times", "--param times: expected NAME=VALUE"),
])
def test_parse_params_bad_values(package, pair, expected):
    with pytest.raises(UserError) as e:
        kc.parse_params([pair], package)
    assert one_line_error(e) == expected


def test_parse_params_missing_package(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        kc.parse_params(["times=1"], tmp_path / "nope.yaml")


# --- cron


@pytest.mark.parametrize("cron", ["0 0 3 * * 1", "0 */15 * * * *", "30 0 9 ? * MON-FRI", "0 0 0 1,15 jan-jun *",
                                  "0 0 3 * * 0", "@daily", "@every 90m", "  0 0 3  * * 1 "])
def test_validate_cron_accepts(cron):
    assert kc.validate_cron(cron) == " ".join(cron.split())


def test_validate_cron_five_fields_says_how():
    with pytest.raises(UserError) as e:
        kc.validate_cron("0 3 * * 1")
    assert one_line_error(e) == "--cron '0 3 * * 1': KFP cron has 6 fields, seconds first, e.g. '0 0 3 * * 1'"


@pytest.mark.parametrize(("cron", "fragment"), [
    ("", "got 0"),
    ("0 0 3 * * 1 2026", "got 7"),
    ("0 0 24 * * *", "hour field '24': values must be within 0-23"),
    ("0 0 3 * * 7", "day of week field '7'"),
    ("0 0 3 0 * *", "day of month field '0'"),
    ("0 0 3 * * 1;rm", "'1;rm' is not a number"),
    ("0 */0 * * * *", "step '0'"),
    ("0 0 5-1 * * *", "runs backwards"),
    ("0 0 3 * foo *", "'foo' is not a number or a name"),
    ("@fortnightly", "unknown descriptor"),
])
def test_validate_cron_rejects(cron, fragment):
    with pytest.raises(UserError) as e:
        kc.validate_cron(cron)
    assert fragment in one_line_error(e)
