"""Crash-safe persistence: temp file + os.replace, folders published with their marker file last."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (sorted keys), for input fingerprints."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
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
