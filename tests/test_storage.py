"""datadream.storage against the real S3 API: moto in server mode over HTTP on loopback.

Every test gets its own bucket (uuid), its own cache folder ($DATADREAM_CACHE) and a fresh client
pointed at the moto server through $AWS_ENDPOINT_URL, the way a user points it at MinIO. The secret
key is a recognisable string, and every error message is checked not to contain it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from servers import _bin, _child_env, _server, closed_port_url, ensure_bucket, free_port, list_keys, s3_client

from datadream import storage
from datadream.errors import UserError

SECRET = f"dd-secret-{uuid.uuid4().hex}"  # never in a message
ACCESS_KEY = "AKIADATADREAMTEST0001"


def _bucket_name() -> str:
    return f"dd-test-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def s3env(moto_endpoint, monkeypatch, tmp_path):
    """The moto endpoint in the environment, a cache of this test's own, a fresh client."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("DATADREAM_CACHE", str(tmp_path / "cache"))
    storage.reset_client()
    yield moto_endpoint
    storage.reset_client()


@pytest.fixture
def bucket(s3env) -> str:
    name = _bucket_name()
    ensure_bucket(s3env, name)
    return name


def _error(excinfo) -> str:
    """The message of a UserError, checked to be one line and free of credentials."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert SECRET not in msg and ACCESS_KEY not in msg, msg
    return msg


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (storage.INDEX_NAME, storage.LOCK_NAME)
    }


def _make_tree(root: Path, n: int = 6, size: int = 3000) -> dict[str, bytes]:
    files = {f"class_{i % 3}/img_{i:03d}.png": os.urandom(size + i) for i in range(n)}
    files["empty.txt"] = b""
    files["names with spaces/é.json"] = b'{"a": 1}'
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


@pytest.fixture
def count_gets(monkeypatch):
    """Counts the objects download_prefix fetches."""
    calls: list[str] = []
    real = storage._get_to_file
    lock = threading.Lock()

    def spy(bucket, prefix, obj, target, workers, bar):
        with lock:
            calls.append(obj.key)
        return real(bucket, prefix, obj, target, workers, bar)

    monkeypatch.setattr(storage, "_get_to_file", spy)
    return calls


# --- URIs and keys (no server) -------------------------------------------------------------------------


def test_is_s3_and_parse():
    assert storage.is_s3("s3://b/p") and storage.is_s3(Path("s3://bkt/p")) and not storage.is_s3("/data/s3/x")
    assert not storage.is_s3(Path("data")) and not storage.is_s3("s3:/not-a-uri-as-str")
    assert storage.parse_s3("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    assert storage.parse_s3("s3://my-bucket") == ("my-bucket", "")
    assert storage.parse_s3("s3://my-bucket/") == ("my-bucket", "")
    assert storage.parse_s3(Path("s3://my.bucket/x")) == ("my.bucket", "x")
    for bad, what in [
        ("s3:///p", "no bucket"),
        ("s3://My_Bucket/p", "invalid bucket name"),
        ("s3://ab/p", "invalid bucket name"),
        ("s3://a..b/p", "invalid bucket name"),
        ("s3://user:pw@bucket/p", "invalid bucket name"),
        ("s3://bucket/a/../b", "'..' segment"),
        ("s3://bucket/a//b", "empty path segment"),
        ("/local/path", "not an s3:// URI"),
    ]:
        with pytest.raises(UserError, match=what) as e:
            storage.parse_s3(bad)
        assert "pw@" not in _error(e)


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("../evil.txt", "'..' segment"),
        ("a/../../evil", "'..' segment"),
        ("/abs", "starts with '/'"),
        ("a//b", "empty path segment"),
        ("a/", "empty path segment"),
        ("a\\b", "backslash"),
        ("a#b", "'#'"),
        ("a\x00b", "NUL"),
        ("a\nb", "control character"),
        ("./a", "'.' segment"),
        ("", "empty key"),
    ],
)
def test_check_key_refuses(key, what):
    with pytest.raises(UserError, match=what) as e:
        storage.check_key(key, bucket="bkt", prefix="pre")
    msg = _error(e)
    assert msg.startswith("s3://bkt/pre/")


def test_check_key_accepts():
    for key in ["a.png", "class 1/img.png", "a/b/c..d/.hidden", "é/ü.json"]:
        assert storage.check_key(key, bucket="bkt") == key


def test_client_is_cached_shared_and_configured(s3env):
    seen = []
    with ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(lambda _: storage.client(), range(16)))
    assert all(c is seen[0] for c in seen)
    c = storage.client()
    assert c.meta.endpoint_url == s3env  # AWS_ENDPOINT_URL, read by boto3 itself
    assert c.meta.config.retries["mode"] == "adaptive"
    assert c.meta.config.retries["total_max_attempts"] == 11  # Config(retries={"max_attempts": 10}): 10 retries
    assert c.meta.config.max_pool_connections >= 16
    storage.reset_client()
    assert storage.client() is not c


# --- round trips -----------------------------------------------------------------------------------------


def test_round_trip_folder(bucket, s3env, tmp_path):
    src = tmp_path / "src"
    files = _make_tree(src)
    (src / "DONE.json").write_text("{}")
    files["DONE.json"] = b"{}"
    uri = f"s3://{bucket}/runs/r1"
    assert not storage.exists(uri, "DONE.json")

    storage.upload_folder(src, uri, marker="DONE.json")

    assert sorted(list_keys(s3env, bucket)) == sorted(f"runs/r1/{k}" for k in files)
    assert storage.exists(uri, "DONE.json")
    local = storage.download_prefix(uri)
    assert local == Path(os.environ["DATADREAM_CACHE"]) / "s3" / bucket / "runs" / "r1"
    assert _tree(local) == files
    assert (local / storage.INDEX_NAME).is_file()
    # A mirror uploaded elsewhere does not carry our bookkeeping files.
    storage.upload_folder(local, f"s3://{bucket}/copy")
    assert sorted(list_keys(s3env, bucket, "copy/")) == sorted(f"copy/{k}" for k in files)


def test_read_write_bytes(bucket):
    storage.write_bytes(f"s3://{bucket}/meta/a.json", b'{"x": 1}')
    assert storage.read_bytes(f"s3://{bucket}/meta/a.json") == b'{"x": 1}'
    with pytest.raises(UserError, match="no such object") as e:
        storage.read_bytes(f"s3://{bucket}/meta/missing.json")
    assert f"s3://{bucket}/meta/missing.json" in _error(e)
    with pytest.raises(UserError, match="names a bucket"):
        storage.read_bytes(f"s3://{bucket}")


def test_listing_over_1000_keys_is_paginated(bucket, s3env):
    raw = s3_client(s3env)
    keys = [f"many/{i // 100:02d}/{i:05d}.bin" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: raw.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))

    local = storage.download_prefix(f"s3://{bucket}/many", workers=16)

    got = _tree(local)
    assert len(got) == 1100
    assert all(got[k.removeprefix("many/")] == k.encode() for k in keys)


def test_second_download_is_served_from_the_cache(bucket, s3env, tmp_path, count_gets, caplog):
    src = tmp_path / "src"
    files = _make_tree(src)
    uri = f"s3://{bucket}/ds"
    storage.upload_folder(src, uri)
    caplog.set_level(logging.INFO, logger="datadream.storage")

    local = storage.download_prefix(uri)
    assert sorted(count_gets) == sorted(files)
    count_gets.clear()

    assert storage.download_prefix(uri) == local
    assert count_gets == []
    assert f"{len(files)} cached, 0 downloaded" in caplog.text

    # Same size, new content: a new ETag, so it is fetched again (and only it).
    raw = s3_client(s3env)
    changed = "class_1/img_001.png"
    new = os.urandom(len(files[changed]))
    raw.put_object(Bucket=bucket, Key=f"ds/{changed}", Body=new)
    # A file deleted locally is fetched again; a file the user put there is left alone.
    (local / "empty.txt").unlink()
    (local / "mine.txt").write_text("keep me")
    # An object deleted remotely disappears from the mirror.
    raw.delete_object(Bucket=bucket, Key="ds/class_0/img_000.png")

    storage.download_prefix(uri)
    assert sorted(count_gets) == sorted([changed, "empty.txt"])
    assert (local / changed).read_bytes() == new
    assert not (local / "class_0/img_000.png").exists()
    assert (local / "mine.txt").read_text() == "keep me"
    assert "removed" in caplog.text


def test_download_into_a_given_folder_skips_folder_objects(bucket, s3env, tmp_path):
    src = tmp_path / "src"
    files = _make_tree(src)
    storage.upload_folder(src, f"s3://{bucket}/x")
    for placeholder in ("x/", "x/empty-folder/"):  # what consoles create for "folders"
        s3_client(s3env).put_object(Bucket=bucket, Key=placeholder, Body=b"")
    dest = tmp_path / "dest"
    assert storage.download_prefix(f"s3://{bucket}/x", dest) == dest
    assert _tree(dest) == files
    assert not (dest / "empty-folder").exists()
    assert not list(dest.rglob(f"*{storage._TMP_SUFFIX}"))


def test_prefix_matches_whole_segments(bucket, s3env):
    storage.write_bytes(f"s3://{bucket}/data-old/a.txt", b"old")
    with pytest.raises(UserError, match="no objects under this prefix") as e:
        storage.download_prefix(f"s3://{bucket}/data")
    assert _error(e) == f"s3://{bucket}/data: no objects under this prefix"


# --- publish and resume ----------------------------------------------------------------------------------


def test_interrupted_upload_resumes_and_writes_the_marker_last(bucket, s3env, tmp_path, monkeypatch):
    src = tmp_path / "out"
    files = _make_tree(src, n=20)
    big = os.urandom(2 * storage.MULTIPART_CHUNKSIZE + 12345)  # 3 parts
    (src / "weights.bin").write_bytes(big)
    (src / "DONE.json").write_text('{"ok": true}')
    uri = f"s3://{bucket}/art"
    real = storage._put_file
    sent: list[str] = []
    lock = threading.Lock()

    def failing(bucket_, key, f, workers, bar):
        with lock:
            if len(sent) >= 8:
                raise ConnectionError("simulated network failure")
            sent.append(f.key)
        return real(bucket_, key, f, workers, bar)

    monkeypatch.setattr(storage, "_put_file", failing)
    with pytest.raises(ConnectionError):
        storage.upload_folder(src, uri, marker="DONE.json", workers=4)
    before = {k.removeprefix("art/") for k in list_keys(s3env, bucket, "art/")}
    assert before == set(sent) and len(before) == 8
    assert "DONE.json" not in before
    assert not storage.exists(uri, "DONE.json")

    resent: list[str] = []

    def recording(bucket_, key, f, workers, bar):
        with lock:
            resent.append(f.key)
        return real(bucket_, key, f, workers, bar)

    monkeypatch.setattr(storage, "_put_file", recording)
    storage.upload_folder(src, uri, marker="DONE.json", workers=4)

    everything = set(files) | {"weights.bin", "DONE.json"}
    assert set(resent) == everything - before  # nothing sent twice
    assert resent[-1] == "DONE.json"
    assert storage.exists(uri, "DONE.json")
    head = s3_client(s3env).head_object(Bucket=bucket, Key="art/weights.bin")
    assert head["ETag"].strip('"') == storage.local_etag(src / "weights.bin")
    assert head["ETag"].strip('"').endswith("-3")

    # Complete already: nothing at all is sent again, the multipart file included.
    resent.clear()
    storage.upload_folder(src, uri, marker="DONE.json", workers=4)
    assert resent == []
    assert _tree(storage.download_prefix(uri)) == {**files, "weights.bin": big, "DONE.json": b'{"ok": true}'}


def test_republishing_removes_the_marker_before_changing_files(bucket, s3env, tmp_path, monkeypatch):
    src = tmp_path / "out"
    _make_tree(src)
    (src / "DONE.json").write_text("{}")
    uri = f"s3://{bucket}/art"
    storage.upload_folder(src, uri, marker="DONE.json")
    assert storage.exists(uri, "DONE.json")

    (src / "class_0/img_000.png").write_bytes(b"changed")
    real = storage._put_file

    def broken(*args):
        raise ConnectionError("simulated")

    monkeypatch.setattr(storage, "_put_file", broken)
    with pytest.raises(ConnectionError):
        storage.upload_folder(src, uri, marker="DONE.json")
    assert not storage.exists(uri, "DONE.json")  # a half-replaced folder does not count as published
    monkeypatch.setattr(storage, "_put_file", real)
    storage.upload_folder(src, uri, marker="DONE.json")
    assert storage.exists(uri, "DONE.json")
    assert storage.read_bytes(f"{uri}/class_0/img_000.png") == b"changed"


def test_upload_refuses_a_folder_without_its_marker(bucket, s3env, tmp_path):
    src = tmp_path / "out"
    _make_tree(src)
    with pytest.raises(UserError, match=r"no marker file DONE\.json") as e:
        storage.upload_folder(src, f"s3://{bucket}/art", marker="DONE.json")
    _error(e)
    assert list_keys(s3env, bucket) == []


def test_output_dir_publishes_on_success_only(bucket, s3env, tmp_path):
    uri = f"s3://{bucket}/stage/out"
    with pytest.raises(RuntimeError, match="stage failed"), storage.output_dir(uri, marker="DONE.json") as out:
        (out / "partial.bin").write_bytes(b"half")
        raise RuntimeError("stage failed")
    assert list_keys(s3env, bucket) == []
    assert not storage.exists(uri, "DONE.json")

    with storage.output_dir(uri, marker="DONE.json") as out2:
        assert out2 == out  # the same staging folder: the stage can resume from what it left
        assert out == Path(os.environ["DATADREAM_CACHE"]) / "s3-out" / bucket / "stage" / "out"
        (out / "result.bin").write_bytes(b"full")
        (out / "DONE.json").write_text("{}")
    assert sorted(list_keys(s3env, bucket)) == [f"stage/out/{k}" for k in ("DONE.json", "partial.bin", "result.bin")]
    assert storage.exists(uri, "DONE.json")

    local = tmp_path / "local-out"
    with storage.output_dir(str(local), marker="DONE.json") as out3:
        assert out3 == local
    assert not local.exists()  # a local path is the caller's business


def test_localize(bucket, tmp_path):
    assert storage.localize(str(tmp_path)) == tmp_path
    assert storage.localize(tmp_path / "not-there") == tmp_path / "not-there"
    storage.write_bytes(f"s3://{bucket}/in/a.txt", b"a")
    local = storage.localize(f"s3://{bucket}/in")
    assert (local / "a.txt").read_bytes() == b"a"
    with pytest.raises(UserError, match="not a finished output") as e:
        storage.localize(f"s3://{bucket}/in", marker="DONE.json")
    _error(e)


# --- errors ----------------------------------------------------------------------------------------------


def test_missing_bucket(s3env, tmp_path):
    name = _bucket_name()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_text("a")
    calls = [
        lambda: storage.download_prefix(f"s3://{name}/p"),
        lambda: storage.exists(f"s3://{name}/p", "DONE.json"),
        lambda: storage.upload_folder(tmp_path / "src", f"s3://{name}/p"),
        lambda: storage.read_bytes(f"s3://{name}/p/a.json"),
        lambda: storage.write_bytes(f"s3://{name}/p/a.json", b"{}"),
    ]
    for call in calls:
        with pytest.raises(UserError) as e:
            call()
        assert _error(e) == f"s3://{name}: no such bucket"


def test_empty_prefix_and_missing_marker(bucket):
    with pytest.raises(UserError) as e:
        storage.download_prefix(f"s3://{bucket}/nothing/here")
    assert _error(e) == f"s3://{bucket}/nothing/here: no objects under this prefix"
    with pytest.raises(UserError, match="no objects under this prefix"):
        storage.download_prefix(f"s3://{bucket}")
    assert storage.exists(f"s3://{bucket}/nothing", "DONE.json") is False


@pytest.mark.parametrize(
    ("key", "uri_prefix", "what"),
    [
        ("p/../evil.txt", "p", "'..' segment"),
        ("p//evil.txt", "p", "starts with '/'"),  # relative to "p/" it is "/evil.txt"
        ("p/a//evil.txt", "p", "empty path segment"),
        ("p/a\\evil.txt", "p", "backslash"),
        ("p/a#evil.txt", "p", "'#'"),
        ("/evil.txt", "", "starts with '/'"),
        ("p/./evil.txt", "p", "'.' segment"),
    ],
)
def test_hostile_keys_are_refused_and_nothing_is_written(bucket, s3env, tmp_path, key, uri_prefix, what):
    raw = s3_client(s3env)
    raw.put_object(Bucket=bucket, Key="p/ok.txt", Body=b"ok")
    raw.put_object(Bucket=bucket, Key=key, Body=b"evil")
    assert key in list_keys(s3env, bucket)  # moto kept the key as given
    dest = tmp_path / "a" / "b" / "dest"
    before = sorted(tmp_path.rglob("*"))

    with pytest.raises(UserError, match="unsafe object key") as e:
        storage.download_prefix(f"s3://{bucket}/{uri_prefix}", dest)

    msg = _error(e)
    assert f"s3://{bucket}/{key}" in msg and what in msg
    assert sorted(tmp_path.rglob("*")) == before  # not dest, not evil.txt anywhere


def test_a_symlink_in_the_destination_cannot_lead_outside(bucket, tmp_path):
    storage.write_bytes(f"s3://{bucket}/p/sub/x.txt", b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(UserError, match="leads outside the folder") as e:
        storage.download_prefix(f"s3://{bucket}/p", dest)
    _error(e)
    assert list(outside.iterdir()) == []


def test_unreachable_endpoint_fails_fast_in_one_line(monkeypatch, tmp_path):
    url = closed_port_url()
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the default, 10 adaptive attempts, backs off for about a minute
    monkeypatch.setenv("DATADREAM_CACHE", str(tmp_path))
    storage.reset_client()
    try:
        t = time.monotonic()
        with pytest.raises(UserError) as e:
            storage.download_prefix("s3://some-bucket/p")
        assert time.monotonic() - t < 10
        assert _error(e) == f"s3://some-bucket/p: cannot reach {url} (check AWS_ENDPOINT_URL and the network)"
        with pytest.raises(UserError, match="cannot reach"):
            storage.exists("s3://some-bucket/p", "DONE.json")
    finally:
        storage.reset_client()


def test_no_credentials(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    storage.reset_client()
    try:
        with pytest.raises(UserError, match="no usable AWS credentials") as e:
            storage.read_bytes("s3://some-bucket/a.json")
        _error(e)
    finally:
        storage.reset_client()


@pytest.fixture(scope="module")
def moto_with_auth():
    """A moto server that checks credentials (IAM on): the first 3 requests are free, for the setup below.

    Yields (endpoint, bucket, access key id, its secret) of an IAM user without any policy.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with _server(cmd, _child_env(INITIAL_NO_AUTH_ACTION_COUNT="3"), f"{url}/moto-api/", "moto_server", 30):
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1")
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        name = _bucket_name()
        s3_client(url).create_bucket(Bucket=name)
        yield url, name, key["AccessKeyId"], key["SecretAccessKey"]


@pytest.mark.parametrize(
    ("who", "code"),
    [("unknown-key", "InvalidAccessKeyId"), ("wrong-secret", "SignatureDoesNotMatch"), ("no-policy", "AccessDenied")],
)
def test_rejected_credentials(moto_with_auth, monkeypatch, tmp_path, who, code):
    url, name, key_id, secret = moto_with_auth
    key_id = ACCESS_KEY if who == "unknown-key" else key_id
    secret = SECRET if who != "no-policy" else secret
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    monkeypatch.delenv("AWS_SECURITY_TOKEN")
    monkeypatch.setenv("DATADREAM_CACHE", str(tmp_path))
    storage.reset_client()
    try:
        with pytest.raises(UserError) as e:
            storage.download_prefix(f"s3://{name}/p")
        msg = _error(e)
        assert msg.startswith(f"s3://{name}/p: ") and f"({code})" in msg
        assert secret not in msg and key_id not in msg
        # A HEAD's 403 carries no error code.
        with pytest.raises(UserError, match=r"access denied or bad credentials \(HTTP 403") as e:
            storage.exists(f"s3://{name}/p", "DONE.json")
        assert secret not in _error(e)
    finally:
        storage.reset_client()


def test_output_lease_one_writer_per_prefix_and_expired_leases_are_taken_over(bucket, s3env):
    uri = f"s3://{bucket}/stage/out"
    key = f"stage/out/{storage.LEASE_NAME}"
    with storage.output_lease(uri):
        assert list_keys(s3env, bucket) == [key]
        holder = json.loads(s3_client(s3env).get_object(Bucket=bucket, Key=key)["Body"].read())
        assert holder["pid"] == os.getpid() and holder["expires"] > time.time()
        with pytest.raises(UserError, match=rf"another run is writing this prefix \(host .*, pid {os.getpid()}, "
                                            r"started 20"), storage.output_lease(uri):
            pass
    assert list_keys(s3env, bucket) == []  # released

    # A run that died left its lease behind: once expired, the next writer takes it over.
    stale = {"host": "gone", "pid": 1, "started": "2020-01-01T00:00:00+00:00", "expires": time.time() - 1}
    s3_client(s3env).put_object(Bucket=bucket, Key=key, Body=json.dumps(stale).encode())
    with storage.output_lease(uri):
        assert json.loads(s3_client(s3env).get_object(Bucket=bucket, Key=key)["Body"].read())["pid"] == os.getpid()
    assert list_keys(s3env, bucket) == []


def test_output_lease_is_renewed_while_held(bucket, s3env):
    uri = f"s3://{bucket}/renewed"
    key = f"renewed/{storage.LEASE_NAME}"
    with storage.output_lease(uri, ttl_s=2, renew_s=0.2):
        first = json.loads(s3_client(s3env).get_object(Bucket=bucket, Key=key)["Body"].read())["expires"]
        time.sleep(3)  # past the first expiry: still held, because it was renewed
        assert json.loads(s3_client(s3env).get_object(Bucket=bucket, Key=key)["Body"].read())["expires"] > first
        with pytest.raises(UserError, match="another run is writing this prefix"), storage.output_lease(uri):
            pass
