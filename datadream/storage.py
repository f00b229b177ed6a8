"""S3 as a drop-in for local folders: every path argument may also be `s3://bucket/prefix`.

Stages work on local folders. This module moves folders between S3 and the local disk:

- Inputs: `localize(x)` returns a local path unchanged; an `s3://` URI is mirrored by `download_prefix()`
  into the cache, `cache_dir()/s3/<bucket>/<prefix>` ($DATADREAM_CACHE, else ~/.cache/datadream).
- Outputs: `with output_dir(x, marker=...) as out:` yields a local path unchanged; for an `s3://` URI it
  yields a staging folder, `cache_dir()/s3-out/<bucket>/<prefix>` (the same one on every run, so a
  re-run resumes), and publishes it with `upload_folder()` when the block succeeds (nothing on error).

Cache. A mirror holds `.s3-index.json`, written atomically, mapping each key (relative to the prefix) to
the `[etag, size]` it was downloaded at. A key whose listing ETag and size match its entry, and whose
local file still has that size, is not downloaded again, so a second call costs one listing (one
request per 1,000 keys). Changed objects are downloaded again; files of ours whose objects are gone are
removed; files we did not write are left alone. A lock file beside the index serialises processes
sharing the mirror. Every file is written under a temporary name in its folder and renamed into place:
a crash never leaves a half file under a real name. Known limit: a local edit that keeps a file's size
is not noticed.

Atomic publish. `upload_folder()` uploads every file but the marker (in parallel), then the marker
last, so "marker present" means "folder complete"; `exists(uri, marker)` tests exactly that. Re-publishing
a changed folder over a published one deletes the remote marker before the first changed file goes up.
Remote objects that the local folder lacks are left in place (logged), never deleted.

Resume. Before uploading, the prefix is listed; a file whose size and ETag match the local file is
skipped. For single-part uploads the ETag is the MD5 of the bytes; files of `MULTIPART_THRESHOLD` and
more go up in parts of `MULTIPART_CHUNKSIZE` (s3transfer, classic client) and their ETag is
`md5(md5(part 1) + … + md5(part N))-N`, computed locally with the same part size. So a re-run after an
interruption sends only what is missing or different. Buckets whose ETags are not MD5s (SSE-KMS) never
match: every file is sent again, which is slower but correct.

Key validation. Object keys become local paths only after `check_key()`: no `..` or `.` segment, no
empty segment (`//`, a leading or trailing `/`), no backslash, `#`, NUL or other control character. A
single bad key fails the whole download before anything is written; a symlink inside the destination
cannot redirect a file outside it either. Zero-byte "folder" objects (`key/`, made by consoles) are
skipped. The prefix of a URI obeys the same rules, since it becomes part of the cache path.

Retries and errors. One boto3 client per process, shared by the worker threads (clients are
thread-safe): adaptive retry mode, 10 retries ($AWS_MAX_ATTEMPTS, total attempts, overrides), connect/read timeouts,
a connection pool as large as the most workers allowed. Failures the user can fix become a one-line
`UserError` naming `s3://bucket/key`: no such bucket, no objects under the prefix, no such object,
access denied, unknown access key, wrong secret key, expired token, no credentials, unreachable
endpoint. Server-side failures that outlast the retries (5xx, throttling) propagate unchanged.

Credentials. boto3's default chain: environment, web identity (IRSA on EKS), ~/.aws, instance metadata.
$AWS_ENDPOINT_URL or $AWS_ENDPOINT_URL_S3 point the client at MinIO or moto (boto3 reads them itself;
MinIO without virtual-host buckets also wants `addressing_style = path` in the `s3` section of
~/.aws/config). No key, secret, token or presigned signature ever reaches a log line or a message:
messages name only bucket, key and error code, and endpoint URLs go through `errors.redact()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, TypeVar
from urllib.parse import urlsplit

from datadream.errors import UserError, redact
from datadream.io import atomic_write_json, file_lock, mkstemp

logger = logging.getLogger(__name__)

INDEX_NAME = ".s3-index.json"  # in a mirror: key -> [etag, size] at download
LOCK_NAME = ".s3-index.lock"
_BOOKKEEPING = (INDEX_NAME, LOCK_NAME)  # ours, never part of an artifact: not uploaded, refused as keys
LEASE_NAME = ".datadream-lease.json"  # under an output prefix while a run writes it (output_lease)
LEASE_TTL_S = 600  # a lease not renewed for this long is stale (its holder died): the next writer takes it
LEASE_RENEW_S = 60
_TMP_SUFFIX = ".s3-tmp"

MIB = 1 << 20
MULTIPART_THRESHOLD = 8 * MIB  # files this size and larger go up/down in parts, through s3transfer
MULTIPART_CHUNKSIZE = 8 * MIB  # part size; the local multipart ETag must use the same one
MAX_WORKERS = 64  # connection pool size of the shared client; `workers` is clamped to it
MAX_ATTEMPTS = 10  # retries after the first attempt (botocore's meaning)
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d+\.\d+\.\d+\.\d+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

T = TypeVar("T")
R = TypeVar("R")


# --- URIs and keys ---------------------------------------------------------------------------------------


def _s3_str(uri: str | os.PathLike) -> str | None:
    """`uri` as an `s3://` string, or None when it is a local path.

    A `Path("s3://b/p")` has collapsed the double slash to `s3:/b/p`; it is recognised too.
    """
    s = os.fspath(uri)
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    if s.startswith("s3://"):
        return s
    if isinstance(uri, PurePath) and s.startswith("s3:/"):
        return "s3://" + s[len("s3:/") :]
    return None


def is_s3(uri: str | os.PathLike) -> bool:
    """True for `s3://…` (str or PathLike), False for a local path."""
    return _s3_str(uri) is not None


def _show(text: str) -> str:
    """`text` on one line: control characters escaped."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _uri(bucket: str, key: str = "") -> str:
    return f"s3://{bucket}/{_show(key)}" if key else f"s3://{bucket}"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def _key_problem(key: str) -> str | None:
    if not key:
        return "empty key"
    if "\x00" in key:
        return "contains a NUL character"
    if _CONTROL.search(key):
        return "contains a control character"
    if key.startswith("/"):
        return "starts with '/'"
    if "\\" in key:
        return "contains a backslash"
    if "#" in key:
        return "contains '#'"
    for segment in key.split("/"):
        if segment == "":
            return "empty path segment ('//' or a trailing '/')"
        if segment == "..":
            return "'..' segment"
        if segment == ".":
            return "'.' segment"
    return None


def check_key(key: str, *, bucket: str, prefix: str = "") -> str:
    """Return `key` (relative to `prefix`) if it is safe to map to a local path below the destination.

    Refuses `..` and `.` segments, a leading `/`, empty segments, backslashes, `#`, NUL and other
    control characters, with a one-line UserError naming `s3://bucket/prefix/key` and what is wrong.
    """
    problem = _key_problem(key)
    if problem:
        raise UserError(f"{_uri(bucket, _join(prefix, key))}: unsafe object key ({problem}); refusing to map it to a "
                        "local path")
    return key


def parse_s3(uri: str | os.PathLike) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix"); UserError on anything else."""
    s = _s3_str(uri)
    if s is None:
        raise UserError(f"{redact(_show(os.fsdecode(os.fspath(uri))))}: not an s3:// URI")
    bucket, _, prefix = s[len("s3://") :].partition("/")
    if not bucket:
        raise UserError(f"{redact(_show(s))}: no bucket name (expected s3://bucket/prefix)")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IPV4.fullmatch(bucket):
        raise UserError(f"{redact(_show(s))}: invalid bucket name (3-63 characters: lowercase "
                        "letters, digits, '.', '-'; starting and ending with a letter or digit)")
    prefix = prefix.strip("/")
    if prefix and (problem := _key_problem(prefix)):
        raise UserError(f"{redact(_show(s))}: invalid prefix ({problem})")
    return bucket, prefix


# --- the client and its errors ---------------------------------------------------------------------------

_client_lock = threading.Lock()
_clients: dict[int, Any] = {}  # pid -> client: a forked child must not share its parent's connections


def client():
    """The process's boto3 S3 client (created once, thread-safe; shared by all worker threads)."""
    pid = os.getpid()
    with _client_lock:
        c = _clients.get(pid)
        if c is None:
            import boto3
            from botocore.config import Config

            # botocore's max_attempts counts retries; $AWS_MAX_ATTEMPTS counts attempts (as the AWS CLI does).
            retries: dict[str, Any] = {"max_attempts": MAX_ATTEMPTS, "mode": "adaptive"}
            if env := os.environ.get("AWS_MAX_ATTEMPTS", "").strip():
                if not env.isdigit() or int(env) < 1:
                    raise UserError(f"AWS_MAX_ATTEMPTS={env!r}: expected a whole number of attempts, 1 or more")
                retries = {"total_max_attempts": int(env), "mode": "adaptive"}
            config = Config(
                retries=retries,
                max_pool_connections=MAX_WORKERS,
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                tcp_keepalive=True,
            )
            # A session of our own: boto3's default session is not safe to create clients from in threads.
            c = _clients[pid] = boto3.session.Session().client("s3", config=config)
            logger.debug("S3 client for %s, retries %s", redact(c.meta.endpoint_url), retries)
        return c


def reset_client() -> None:
    """Forget the cached client (the next call re-reads the environment: endpoint, credentials, retries)."""
    with _client_lock:
        _clients.clear()


def _endpoint() -> str:
    try:
        parts = urlsplit(client().meta.endpoint_url)
        return redact(f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}")
    except Exception:  # the message matters more than the detail
        return "the S3 endpoint"


_AUTH_HINTS = {
    "InvalidAccessKeyId": "the endpoint does not know this access key id; check AWS_ACCESS_KEY_ID or the profile",
    "SignatureDoesNotMatch": "the secret key does not match the access key id; check AWS_SECRET_ACCESS_KEY",
    "ExpiredToken": "the session token has expired; refresh the credentials",
    "ExpiredTokenException": "the session token has expired; refresh the credentials",
    "TokenRefreshRequired": "the session token has expired; refresh the credentials",
    "InvalidToken": "the session token is not valid; check AWS_SESSION_TOKEN",
    "AccessDenied": "access denied; check the credentials and the bucket policy",
    "AllAccessDisabled": "access denied; all access to this object has been disabled",
    "AccountProblem": "access denied; a problem with the account",
}


def _as_user_error(exc: BaseException, bucket: str, key: str = "") -> UserError | None:
    """The one-line UserError for a failure the user can fix, or None (then `exc` propagates)."""
    from botocore import exceptions as bx

    where = _uri(bucket, key)
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = _status(exc)
        if code == "NoSuchBucket":
            return UserError(f"s3://{bucket}: no such bucket")
        if code in ("NoSuchKey", "404", "NotFound"):
            return UserError(f"{where}: no such object")
        if code in _AUTH_HINTS:
            return UserError(f"{where}: {_AUTH_HINTS[code]} ({code})")
        if code in ("403", "Forbidden") or status == 403:
            return UserError(f"{where}: access denied or bad credentials (HTTP 403 {_show(code)})")
        if code == "InvalidBucketName":
            return UserError(f"s3://{bucket}: invalid bucket name")
        return None
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return UserError(f"{where}: no usable AWS credentials (environment, web identity/IRSA, ~/.aws); set "
                         "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError):
        return UserError(f"{where}: cannot reach {_endpoint()} (check AWS_ENDPOINT_URL and the network)")
    return None


@contextlib.contextmanager
def _s3_errors(bucket: str, key: str = "") -> Iterator[None]:
    try:
        yield
    except Exception as e:
        user = _as_user_error(e, bucket, key)
        if user is None:
            raise
        raise user from None


# --- helpers ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Obj:
    key: str  # relative to the prefix
    etag: str  # without quotes
    size: int


def _list(bucket: str, prefix: str) -> dict[str, _Obj]:
    """Every object under `prefix/` (the whole bucket for ""), keyed by key relative to the prefix."""
    start = f"{prefix}/" if prefix else ""
    found: dict[str, _Obj] = {}
    with _s3_errors(bucket, prefix):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
            for o in page.get("Contents", ()):
                rel = o["Key"][len(start) :]
                found[rel] = _Obj(rel, o["ETag"].strip('"'), int(o["Size"]))
    return found


def _clamp(workers: int) -> int:
    return max(1, min(int(workers), MAX_WORKERS))


def _parallel(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn(item) on a thread pool, results as they complete; the first error cancels what has not started."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3")
    try:
        futures = [pool.submit(fn, item) for item in items]
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _transfer_config(workers: int):
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNKSIZE,
        max_concurrency=workers,
        use_threads=True,
        preferred_transfer_client="classic",  # not CRT: the part size must be ours for the local ETag
    )


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _human(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def local_etag(path: str | os.PathLike, size: int | None = None) -> str:
    """The ETag S3 gives `path` when `upload_folder()` uploads it (MD5, or the multipart form `…-N`)."""
    size = os.path.getsize(path) if size is None else size
    with open(path, "rb") as f:
        if size < MULTIPART_THRESHOLD:
            h = hashlib.md5(usedforsecurity=False)
            while block := f.read(MIB):
                h.update(block)
            return h.hexdigest()
        from s3transfer.utils import ChunksizeAdjuster

        chunk = ChunksizeAdjuster().adjust_chunksize(MULTIPART_CHUNKSIZE, size)
        digests = []
        while part := f.read(chunk):
            digests.append(hashlib.md5(part, usedforsecurity=False).digest())
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def cache_dir() -> Path:
    """The object cache's root: $DATADREAM_CACHE, else ~/.cache/datadream (mirrors live under s3/<bucket>/)."""
    from datadream.config import ModelsConfig, cache_root

    return cache_root(ModelsConfig())


# --- download ---------------------------------------------------------------------------------------------


def _read_index(path: Path, bucket: str, prefix: str) -> dict[str, list]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("%s: unreadable (%s); downloading everything again", path, e)
        return {}
    if not isinstance(data, dict) or data.get("bucket") != bucket or data.get("prefix") != prefix:
        return {}
    files = data.get("files")
    return dict(files) if isinstance(files, dict) else {}


def _write_index(path: Path, bucket: str, prefix: str, files: dict[str, list]) -> None:
    atomic_write_json(path, {"version": 1, "bucket": bucket, "prefix": prefix, "files": files})


def _get_to_file(bucket: str, prefix: str, obj: _Obj, target: Path, workers: int, bar) -> tuple[str, int]:
    """Download one object to `target` through a temporary file beside it; returns (etag, size) as fetched."""
    key = _join(prefix, obj.key)
    fd, tmp = mkstemp(prefix=f".{target.name[:64]}.", suffix=_TMP_SUFFIX, dir=target.parent)
    try:
        with _s3_errors(bucket, key):
            if obj.size < MULTIPART_THRESHOLD:
                resp = client().get_object(Bucket=bucket, Key=key)
                etag, size = resp["ETag"].strip('"'), int(resp["ContentLength"])
                with os.fdopen(fd, "wb") as f:
                    fd = -1
                    for chunk in resp["Body"].iter_chunks(MIB):
                        f.write(chunk)
                bar.update(size)
            else:
                os.close(fd)
                fd = -1
                client().download_file(bucket, key, tmp, Config=_transfer_config(workers), Callback=bar.update)
                etag, size = obj.etag, obj.size
        os.replace(tmp, target)
        return etag, size
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _check_layout(bucket: str, prefix: str, objects: dict[str, _Obj]) -> list[_Obj]:
    """The objects to mirror, each key validated; folder placeholders dropped; file/folder clashes refused."""
    keep = []
    for rel in sorted(objects):
        obj = objects[rel]
        if (rel == "" or rel.endswith("/")) and obj.size == 0:  # a console's "folder" object
            if rel.rstrip("/"):
                check_key(rel.rstrip("/"), bucket=bucket, prefix=prefix)
            continue
        if rel == LEASE_NAME:  # a writer's lease, not part of the artifact
            continue
        check_key(rel, bucket=bucket, prefix=prefix)
        if rel in _BOOKKEEPING:
            raise UserError(f"{_uri(bucket, _join(prefix, rel))}: {rel} is a name DataDream reserves for its cache")
        keep.append(obj)
    folders = {str(parent) for o in keep for parent in PurePath(o.key).parents if str(parent) != "."}
    for o in keep:
        if o.key in folders:
            raise UserError(f"{_uri(bucket, _join(prefix, o.key))}: is an object and also a folder of other objects; "
                            "cannot mirror both to a local folder")
    return keep


def download_prefix(uri: str | os.PathLike, dest: str | os.PathLike | None = None, *, workers: int = 16) -> Path:
    """Mirror every object under `s3://bucket/prefix/` into `dest` (default: the cache); returns the folder.

    Objects already mirrored at the same ETag and size are not downloaded again; see the module docstring.
    """
    bucket, prefix = parse_s3(uri)
    workers = _clamp(workers)
    where = _uri(bucket, prefix)
    dest = Path(dest) if dest is not None else cache_dir() / "s3" / bucket / prefix
    t0 = time.perf_counter()
    objects = _check_layout(bucket, prefix, _list(bucket, prefix))
    if not objects:
        raise UserError(f"{where}: no objects under this prefix")

    dest.mkdir(parents=True, exist_ok=True)
    real_dest = os.path.realpath(dest)
    index_path = dest / INDEX_NAME
    with file_lock(dest / LOCK_NAME):
        index = _read_index(index_path, bucket, prefix)
        todo: list[_Obj] = []
        for obj in objects:
            target = dest / obj.key
            entry = index.get(obj.key)
            try:
                fresh = entry == [obj.etag, obj.size] and target.stat().st_size == obj.size
            except OSError:
                fresh = False
            if not fresh:
                todo.append(obj)
                index.pop(obj.key, None)

        # Local files of ours whose objects are gone.
        listed = {o.key for o in objects}
        removed = 0
        for rel in [r for r in index if r not in listed]:
            if _key_problem(rel) is None:
                with contextlib.suppress(FileNotFoundError):
                    (dest / rel).unlink()
                    removed += 1
            del index[rel]

        parents = sorted({(dest / o.key).parent for o in todo})
        for parent in parents:
            real = os.path.realpath(parent)  # before mkdir, which would follow a symlink out of dest
            if real != real_dest and not real.startswith(real_dest + os.sep):
                raise UserError(f"{dest}: {parent.relative_to(dest)} leads outside the folder (a symlink?); "
                                f"refusing to write {where} there")
            parent.mkdir(parents=True, exist_ok=True)
            for stale in parent.glob(f".*{_TMP_SUFFIX}"):  # left by a download that was killed
                stale.unlink(missing_ok=True)

        nbytes = sum(o.size for o in todo)
        try:
            if todo:
                with _progress(nbytes, f"s3 get {bucket}/{prefix}") as bar:
                    _download_all(bucket, prefix, dest, todo, index, index_path, workers, bar)
        finally:
            if todo or removed:
                _write_index(index_path, bucket, prefix, index)
    logger.info("%s -> %s: %d cached, %d downloaded (%s), %d removed, %.1f s", redact(where), dest,
                len(objects) - len(todo), len(todo), _human(nbytes), removed, time.perf_counter() - t0)
    return dest


def _download_all(bucket, prefix, dest: Path, todo: list[_Obj], index: dict, index_path: Path, workers: int,
                  bar) -> None:
    small = [o for o in todo if o.size < MULTIPART_THRESHOLD]
    large = [o for o in todo if o.size >= MULTIPART_THRESHOLD]

    def one(obj: _Obj) -> tuple[str, tuple[str, int]]:
        return obj.key, _get_to_file(bucket, prefix, obj, dest / obj.key, workers, bar)

    last_save = time.monotonic()
    for rel, (etag, size) in _parallel(one, small, workers):
        index[rel] = [etag, size]
        if time.monotonic() - last_save > 5:  # so that a killed run keeps most of its work
            _write_index(index_path, bucket, prefix, index)
            last_save = time.monotonic()
    for obj in large:  # one at a time, each in parallel parts
        rel, (etag, size) = one(obj)
        index[rel] = [etag, size]


# --- upload -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    key: str  # relative POSIX path = key relative to the prefix
    path: Path
    size: int


def _local_files(src: Path, bucket: str, prefix: str) -> list[_File]:
    files = []
    for root, dirs, names in os.walk(src):
        dirs.sort()
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                logger.warning("%s: a symlinked folder; not uploaded", os.path.join(root, d))
        for name in sorted(names):
            path = Path(root, name)
            rel = path.relative_to(src).as_posix()
            if rel in _BOOKKEEPING or name.endswith(_TMP_SUFFIX):
                continue
            problem = _key_problem(rel)
            if problem:
                raise UserError(f"{path}: cannot be uploaded as {_uri(bucket, _join(prefix, rel))} ({problem})")
            files.append(_File(rel, path, path.stat().st_size))
    return files


def _differs(f: _File, remote: _Obj | None) -> bool:
    return remote is None or remote.size != f.size or local_etag(f.path, f.size) != remote.etag


def _put_file(bucket: str, key: str, f: _File, workers: int, bar) -> None:
    """Upload one file (single PUT below the multipart threshold, else parts through s3transfer)."""
    with _s3_errors(bucket, key):
        if f.size < MULTIPART_THRESHOLD:
            with open(f.path, "rb") as body:
                client().put_object(Bucket=bucket, Key=key, Body=body)
            bar.update(f.size)
        else:
            client().upload_file(str(f.path), bucket, key, Config=_transfer_config(workers), Callback=bar.update)


def upload_folder(src: str | os.PathLike, uri: str | os.PathLike, *, marker: str | None = None,
                  workers: int = 16) -> None:
    """Publish the folder `src` under `s3://bucket/prefix/`: every file, then `marker` (if given) last.

    Files already there with the same size and ETag are not sent again (resume); see the module docstring.
    """
    src = Path(src)
    bucket, prefix = parse_s3(uri)
    workers = _clamp(workers)
    where = _uri(bucket, prefix)
    if not src.is_dir():
        raise UserError(f"{src}: not a folder; nothing to upload to {redact(where)}")
    if marker is not None:
        check_key(marker, bucket=bucket, prefix=prefix)
        if not (src / marker).is_file():
            raise UserError(f"{src}: no marker file {marker}; refusing to publish an unfinished folder to {where}")
    t0 = time.perf_counter()
    files = _local_files(src, bucket, prefix)
    remote = _list(bucket, prefix)

    changed = set()  # hashing only the files whose size matches a remote object, in parallel
    for f, differs in _parallel(lambda f: (f, _differs(f, remote.get(f.key))), files, workers):
        if differs:
            changed.add(f.key)
    todo = [f for f in files if f.key in changed and f.key != marker]
    marker_file = next((f for f in files if f.key == marker), None)
    extra = sorted(set(remote) - {f.key for f in files} - {LEASE_NAME})
    if extra:
        logger.warning("%s: %d object(s) not in %s left in place (e.g. %s)", where, len(extra), src, _show(extra[0]))

    last = [marker_file] if marker_file is not None and marker_file.key in changed else []
    if todo and marker_file is not None and marker_file.key in remote:
        # Re-publishing: the folder stops counting as complete before its first file changes.
        logger.info("%s: replacing a published folder; removing its marker first", where)
        with _s3_errors(bucket, _join(prefix, marker_file.key)):
            client().delete_object(Bucket=bucket, Key=_join(prefix, marker_file.key))
        last = [marker_file]
    nbytes = sum(f.size for f in todo + last)
    if todo or last:
        with _progress(nbytes, f"s3 put {bucket}/{prefix}") as bar:

            def put(f: _File) -> None:
                _put_file(bucket, _join(prefix, f.key), f, workers, bar)

            for _ in _parallel(put, [f for f in todo if f.size < MULTIPART_THRESHOLD], workers):
                pass
            for f in todo:  # large files: one at a time, each in parallel parts
                if f.size >= MULTIPART_THRESHOLD:
                    put(f)
            for f in last:
                put(f)
    logger.info("%s -> %s: %d uploaded (%s), %d already there, %.1f s", src, redact(where), len(todo) + len(last),
                _human(nbytes), len(files) - len(todo) - len(last), time.perf_counter() - t0)


# --- single objects, markers, and the path-or-URI helpers for stages ---------------------------------------


def _object_key(uri: str | os.PathLike) -> tuple[str, str]:
    bucket, key = parse_s3(uri)
    if not key:
        raise UserError(f"{_uri(bucket)}: names a bucket, not an object")
    return bucket, key


def _status(e) -> int | None:
    return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def exists(uri: str | os.PathLike, marker: str) -> bool:
    """Whether the folder at `uri` is published: its `marker` object exists. UserError if the bucket doesn't."""
    from botocore.exceptions import ClientError

    bucket, prefix = parse_s3(uri)
    key = _join(prefix, check_key(marker, bucket=bucket, prefix=prefix))
    with _s3_errors(bucket, key):
        try:
            client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if _status(e) != 404:
                raise
    with _s3_errors(bucket):  # a HEAD's 404 does not say whether the bucket is there
        try:
            client().head_bucket(Bucket=bucket)
        except ClientError as e:
            if _status(e) == 404:
                raise UserError(f"s3://{bucket}: no such bucket") from None
            raise
    return False


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The content of one object."""
    bucket, key = _object_key(uri)
    with _s3_errors(bucket, key):
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write one object (a single PUT: readers see the old content or the new, never a part)."""
    bucket, key = _object_key(uri)
    with _s3_errors(bucket, key):
        client().put_object(Bucket=bucket, Key=key, Body=data)


def localize(path_or_uri: str | os.PathLike, *, workers: int = 16, marker: str | None = None) -> Path:
    """An input as a local folder: a local path unchanged, an `s3://` URI mirrored into the cache.

    With `marker`, an `s3://` input must be published (its marker object present), else UserError.
    """
    if not is_s3(path_or_uri):
        return Path(path_or_uri)
    if marker is not None and not exists(path_or_uri, marker):
        bucket, prefix = parse_s3(path_or_uri)
        raise UserError(f"{_uri(bucket, prefix)}: not a finished output (no {marker})")
    return download_prefix(path_or_uri, workers=workers)


@contextlib.contextmanager
def output_dir(path_or_uri: str | os.PathLike, *, marker: str, workers: int = 16) -> Iterator[Path]:
    """An output folder: a local path is yielded unchanged; for `s3://` a staging folder is yielded and
    published with `upload_folder(..., marker=marker)` when the block succeeds (nothing on an exception).

    The staging folder is the same for the same URI on every run, so an interrupted stage resumes from it.
    """
    if not is_s3(path_or_uri):
        yield Path(path_or_uri)
        return
    bucket, prefix = parse_s3(path_or_uri)
    staging = cache_dir() / "s3-out" / bucket / prefix
    with output_lease(path_or_uri):
        staging.mkdir(parents=True, exist_ok=True)
        yield staging
        upload_folder(staging, path_or_uri, marker=marker, workers=workers)


def _lease_body(expires: float) -> bytes:
    import datetime
    import socket

    now = datetime.datetime.now(datetime.UTC)
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": now.isoformat(timespec="seconds"),
                       "expires": expires}).encode()


def _precondition_failed(e) -> bool:
    code = str(e.response.get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or _status(e) in (409, 412)


@contextlib.contextmanager
def output_lease(uri: str | os.PathLike, ttl_s: float = LEASE_TTL_S, renew_s: float = LEASE_RENEW_S) -> Iterator[None]:
    """Hold the writer's lease of the output prefix `uri` for the block: one run writes a prefix at a time.

    The lease is the object `<prefix>/.datadream-lease.json` (holder host, pid, start, expiry), created
    with a conditional PUT (`If-None-Match: *`), so of two writers exactly one creates it; the other
    fails at once with a UserError naming the holder. The holder renews it every `renew_s` with
    `If-Match` on its ETag; a lease past its expiry was left by a run that died and is taken over
    (again with `If-Match`, so two writers cannot both take it over). It is deleted after the block.
    """
    from botocore.exceptions import ClientError

    bucket, prefix = parse_s3(uri)
    key = _join(prefix, LEASE_NAME)
    where = _uri(bucket, prefix)
    c = client()

    def put(**cond) -> str:
        with _s3_errors(bucket, key):
            body = _lease_body(time.time() + ttl_s)
            return c.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **cond)["ETag"]

    try:
        etag = put(IfNoneMatch="*")
    except ClientError as e:
        if not _precondition_failed(e):
            raise
        try:
            with _s3_errors(bucket, key):
                held = c.get_object(Bucket=bucket, Key=key)
            old_etag, holder = held["ETag"], json.loads(held["Body"].read() or b"{}")
        except (ClientError, UserError, ValueError):  # released in between, or unreadable: one more try
            old_etag, holder = None, {}
        from datadream.io import describe_holder

        if old_etag is not None and float(holder.get("expires", 0)) > time.time():
            raise UserError(f"{where}: another run is writing this prefix ({describe_holder(holder)}); wait for it "
                            "to finish or choose another prefix") from None
        try:
            etag = put(IfMatch=old_etag) if old_etag is not None else put(IfNoneMatch="*")
        except ClientError as e2:
            if not _precondition_failed(e2):
                raise
            raise UserError(f"{where}: another run took over this prefix first; wait for it to finish or choose "
                            "another prefix") from None
        if holder:
            logger.warning("%s: taking over the expired lease of %s", where, describe_holder(holder))

    stop = threading.Event()
    lost: list[str] = []

    def renew() -> None:
        nonlocal etag
        while not stop.wait(renew_s):
            try:
                etag = put(IfMatch=etag)
            except ClientError as e:
                if _precondition_failed(e):
                    lost.append("another run took the lease over")
                    logger.error("%s: lost the writer's lease (another run took it over)", where)
                    return
                logger.warning("%s: could not renew the writer's lease (%s); retrying", where, e)
            except Exception as e:  # network trouble: keep trying until the lease would expire
                logger.warning("%s: could not renew the writer's lease (%s); retrying", where, e)

    renewer = threading.Thread(target=renew, name="s3-lease", daemon=True)
    renewer.start()
    try:
        yield
        if lost:
            raise UserError(f"{where}: {lost[0]} while this run was writing; its upload may be mixed, re-run it")
    finally:
        stop.set()
        renewer.join()
        if not lost:
            try:
                c.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
            except ClientError as e:
                if not _precondition_failed(e):  # a store without conditional deletes: ours, delete it plainly
                    with contextlib.suppress(ClientError):
                        c.delete_object(Bucket=bucket, Key=key)


__all__ = [
    "check_key",
    "client",
    "download_prefix",
    "exists",
    "is_s3",
    "local_etag",
    "localize",
    "output_dir",
    "output_lease",
    "parse_s3",
    "read_bytes",
    "reset_client",
    "upload_folder",
    "write_bytes",
]
