"""Crash-safe persistence: temp file + os.replace, folders published with their marker file last.

Also the rules every stage's output folder follows (`claim_output`): one writer at a time (an exclusive
lock taken before anything is written and held until the marker is published), a writability check
before any work, files created as the umask says (0644/0755 under umask 022, like any Unix tool), and
nothing left behind by a run that failed before doing any work.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_hash_cache: dict[tuple, str] = {}
_hash_lock = threading.Lock()


def sha256_cached(path: str | os.PathLike) -> str:
    """sha256 of a file, hashed once per process for the same (path, inode, size, mtime)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _hash_lock:
        found = _hash_cache.get(key)
    if found is None:
        found = sha256_file(path)
        with _hash_lock:
            _hash_cache[key] = found
    return found


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (sorted keys), for input fingerprints."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_umask: int | None = None


def umask() -> int:
    """The process's umask (read once, from /proc where possible: os.umask can only be read by setting it)."""
    global _umask
    if _umask is None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                _umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError):
            current = os.umask(0o022)
            os.umask(current)
            _umask = current
    return _umask


def mkstemp(**kw: Any) -> tuple[int, str]:
    """tempfile.mkstemp, but the file gets the mode a plain open() would (0644 under umask 022), not 0600."""
    fd, name = tempfile.mkstemp(**kw)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, name


def mkdtemp(**kw: Any) -> str:
    """tempfile.mkdtemp, but the folder gets the mode mkdir would (0755 under umask 022), not 0700."""
    name = tempfile.mkdtemp(**kw)
    os.chmod(name, 0o777 & ~umask())
    return name


def _with_path(e: OSError, path: str | os.PathLike) -> OSError:
    """`e` with the file it was about (a failed write() names none), so the message can say where."""
    if e.filename is None and e.errno is not None:
        return type(e)(e.errno, e.strerror or os.strerror(e.errno), str(path))
    return e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _with_path(e, path) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_json(path: str | os.PathLike) -> Any:
    from datadream.errors import UserError

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a JSON file") from None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A text file as UTF-8; a missing file or bad encoding is a one-line UserError naming it."""
    from datadream.errors import UserError

    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path}: not found") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path}: is a folder, expected a file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path}: not valid UTF-8 (byte {e.start}: {e.reason})") from None


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, shared_marker: str | None = None) -> Iterator[Path]:
    """Build a folder under a temporary sibling name and rename it into place only on success.

    Either the whole folder appears or nothing does: `final` must not exist (or be empty), and on any
    exception the temporary folder is removed. With `shared_marker`, the folder is a cache entry that
    any process builds identically: if another one published it first (its marker file is there),
    theirs is kept and ours discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        try:
            os.replace(tmp, final)
        except OSError:
            if shared_marker is None or not (final / shared_marker).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out: str | os.PathLike, marker: str, fingerprint: str) -> bool:
    """Decide what to do with a stage's output folder before running it.

    Returns True when `out` already holds a finished run with the same input fingerprint (the stage
    is a no-op). Returns False when the stage should run (absent, empty, or an unfinished run of the
    same inputs, which the stage resumes). Raises UserError when `out` holds something else.
    """
    from datadream.errors import UserError

    out = Path(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    done = out / marker
    if done.exists():
        meta = read_json(done)
        if meta.get("fingerprint") == fingerprint:
            return True
        raise UserError(
            f"--out {out}: holds a finished run with different inputs (fingerprint "
            f"{str(meta.get('fingerprint'))[:12]} != {fingerprint[:12]}); choose another folder"
        )
    started = out / ".fingerprint"
    if started.exists():
        if started.read_text().strip() != fingerprint:
            raise UserError(f"--out {out}: holds an unfinished run with different inputs; choose another folder")
        return False
    if any(out.iterdir()):
        raise UserError(f"--out {out}: folder is not empty and is not a DataDream stage output")
    return False


def mark_started(out: str | os.PathLike, fingerprint: str) -> None:
    """Record the input fingerprint of a resumable stage so a re-run can tell it may resume."""
    atomic_write_text(Path(out) / ".fingerprint", fingerprint + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on the file `path` (created, with its folder) across processes. flock: the kernel
    releases it if the holder dies. A no-op where fcntl is missing (not POSIX)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --- one writer per output folder ----------------------------------------------------------------------------

LOCK_SUFFIX = ".lock"
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST,
                errno.EISDIR, errno.ENAMETOOLONG, errno.EFBIG}


def oserror_message(e: OSError, where: str | os.PathLike | None = None) -> str | None:
    """One line for an OSError the user must act on (no space, read-only, permission, a file in the way),
    naming the path; None for other (possibly transient) faults, which stay retryable."""
    if e.errno not in _USER_ERRNOS:
        return None
    path = e.filename or where
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EFBIG: "file too large for this file system"}.get(
        e.errno, (e.strerror or os.strerror(e.errno or 0)).lower())
    hint = {errno.ENOSPC: "; free some space and re-run (finished work is kept)",
            errno.EDQUOT: "; free some space and re-run (finished work is kept)",
            errno.EACCES: "; choose a folder you can write", errno.EROFS: "; choose a writable folder",
            errno.EPERM: "; choose a folder you can write"}.get(e.errno, "")
    return f"{path}: {what}{hint}" if path else f"{what}{hint}"


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of an output folder: a hidden sibling, so the folder itself stays untouched until the
    lock is held (a folder that is renamed into place whole, like fewshot's, can be locked too)."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(h: dict) -> str:
    if not h:
        return "a process that has not said who it is yet"
    return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started {h.get('started', '?')}"


def _make_parent(out: Path) -> None:
    """Create the folder `out` will live in; UserError when a file is in the way or nothing may be written."""
    from datadream.errors import UserError

    for p in [out, *out.parents]:
        if p.exists() or p.is_symlink():
            if p != out and not p.is_dir():
                raise UserError(f"--out {out}: {p} is a file, not a folder")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--out {out}: a file is in the way of its folder {out.parent}") from None
    except OSError as e:
        raise UserError(f"--out {out}: cannot create its folder ({oserror_message(e, out.parent) or e})") from None


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of the output folder `out` for the block.

    The lock is an flock on a hidden sibling file (`.<name>.lock`), which records who holds it (host,
    pid, start time). A second writer fails at once with a UserError naming the holder. The kernel
    drops an flock when its holder dies, so a lock file left by a killed run is stale: the next writer
    takes it over (and says so). The file is removed on release, after the marker is published.
    """
    from datadream.errors import UserError

    out = Path(os.path.abspath(out))
    _make_parent(out)
    path = lock_path(out)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise UserError(f"--out {out}: cannot take the output lock "
                            f"({oserror_message(e, path) or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            for _ in range(100):  # the holder writes who it is right after taking the lock
                if holder:
                    break
                time.sleep(0.01)
                holder = _holder(fd)
            os.close(fd)
            raise UserError(f"--out {out}: another run is writing this folder ({describe_holder(holder)}); wait for "
                            "it to finish or choose another folder") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning("%s: this file system has no file locks; two runs into --out %s would not be stopped",
                        path, out)
            os.close(fd)
            yield
            return
        # The holder before us may have removed the file after we opened it: then our lock is on a
        # file nobody else will find; start again on the current one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        stale = _holder(fd)
        if stale:  # its holder ended without releasing it (killed): the kernel has dropped its flock
            log.warning("--out %s: taking over the lock of a run that ended without releasing it (%s)", out,
                        describe_holder(stale))
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it: whoever opened the old file retries (see above)
        os.close(fd)


def _probe_writable(folder: Path) -> None:
    from datadream.errors import UserError

    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"--out {folder}: cannot write here ({oserror_message(e, folder) or e})") from None


def _leftovers_only(out: Path) -> bool:
    """True when `out` holds nothing a later run could use: no files, or only the started-marker."""
    return out.is_dir() and all(p.name == ".fingerprint" for p in out.iterdir())


@contextlib.contextmanager
def claim_output(out: str | os.PathLike) -> Iterator[Path]:
    """Everything a stage does to its output folder happens inside this block.

    The folder's lock is held for the whole block (see `output_lock`); the location is checked to be
    writable before any work; and when the block fails before anything useful was written (only a
    `.fingerprint`, or nothing), that is removed again, so a corrected re-run is not refused.
    """
    from datadream.errors import UserError

    out = Path(out)
    with output_lock(out):
        existed = out.exists()
        if existed and not out.is_dir():
            raise UserError(f"--out {out}: exists and is not a folder")
        _probe_writable(out if existed else out.parent)
        try:
            yield out
        except BaseException:
            if _leftovers_only(out):
                with contextlib.suppress(OSError):
                    (out / ".fingerprint").unlink(missing_ok=True)
                    if not existed:
                        out.rmdir()
            raise


def writes_output(param: str) -> Callable[[F], F]:
    """Decorate a stage function whose argument `param` is its output folder: the body runs inside
    `claim_output(that folder)`."""

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with claim_output(sig.bind(*args, **kwargs).arguments[param]):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
