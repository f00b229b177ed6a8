"""Manifests: the one list of images every stage reads (docs/method.md, Stage 0).

A manifest is JSON Lines, one image per line: path, label, class (slug), sha256, is_real, plus
free-form extras (prompt, seed, adapter for synthetic images). Paths are stored relative to the
manifest's folder when the image lies inside it, so artifact folders can be moved; absolute
otherwise. `classes.json` lists index, slug and display name.
"""

from __future__ import annotations

import json
import os
import re
import stat
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datadream.artifacts import FEWSHOT_MARKER, SYNTHETIC_MARKER
from datadream.errors import UserError
from datadream.io import atomic_write_json, atomic_write_jsonl, read_json, sha256_cached

_SLUG_PUNCT = frozenset("._+-")


def _slug_char(ch: str) -> bool:
    # Letters, marks and digits of any script (Unicode categories L*, M*, N*), and . _ + -
    return ch in _SLUG_PUNCT or unicodedata.category(ch)[0] in "LMN"


def slugify(name: str) -> str:
    """A folder-safe class name: NFKC-normalised and case-folded, keeping letters and digits of every
    script ('猫' stays '猫', 'Café' becomes 'café'); anything else ('/', spaces) becomes '_'. Display
    names like 'F/A-18' contain '/' (docs/method.md, Stage 0). An empty result is 'class'."""
    text = unicodedata.normalize("NFKC", name).casefold()
    slug = re.sub(r"_+", "_", "".join(ch if _slug_char(ch) else "_" for ch in text)).strip("._")
    return slug or "class"


def _slug_ok(slug: str) -> bool:
    return bool(slug) and not slug.startswith(".") and all(_slug_char(ch) for ch in slug)


def control_characters(name: str) -> bool:
    """Whether `name` holds a control or format character (a newline, a tab, a zero-width space…)."""
    return any(unicodedata.category(ch) in ("Cc", "Cf") for ch in name)


@dataclass(frozen=True)
class ClassInfo:
    index: int
    slug: str
    name: str


@dataclass(frozen=True)
class Record:
    path: str
    label: int
    cls: str  # the class slug; "class" in JSON
    sha256: str
    is_real: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, base: Path) -> dict:
        if is_remote(self.path):
            stored = self.path  # an object in a dataset on S3: the reader localizes it (storage.localize_records)
        else:
            p = Path(self.path)
            try:
                stored = p.resolve().relative_to(base.resolve()).as_posix()
            except ValueError:
                stored = str(p)
        return {"path": stored, "label": self.label, "class": self.cls, "sha256": self.sha256,
                "is_real": self.is_real, **self.extra}


_REQUIRED = ("path", "label", "class", "sha256", "is_real")


def is_remote(path: str | os.PathLike) -> bool:
    """True for an object URI (s3://bucket/key) rather than a file path."""
    return str(path).startswith("s3://")


def write_manifest(path: str | os.PathLike, records: list[Record]) -> None:
    path = Path(path)
    atomic_write_jsonl(path, (r.to_json(path.parent) for r in records))


def read_manifest(path: str | os.PathLike, verify: bool = True) -> list[Record]:
    """The records of a manifest. With `verify` (the default) every local image is checked before any
    work: it must lie inside the manifest's folder (or the dataset root its set's fewshot.json records),
    be a regular file, and have the sha256 the manifest records (see `verify_records`)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: manifest not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected a JSON object per line")
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise UserError(f"{path}:{n}: missing key(s) {', '.join(missing)}")
        p = row.pop("path")
        if not isinstance(p, str) or not p or "\x00" in p:
            raise UserError(f"{path}:{n}: path must be a non-empty string")
        if not is_remote(p) and not Path(p).is_absolute():
            p = str(path.parent / p)
        try:
            records.append(Record(str(p), int(row.pop("label")), str(row.pop("class")), str(row.pop("sha256")),
                                  bool(row.pop("is_real")), row))
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}:{n}: bad label ({e})") from None
    if verify:
        verify_manifest(path)
        verify_records(path, records)
    return records


_MARKERS = {FEWSHOT_MARKER: lambda summary, stem: summary.get("manifest_sha256", {}).get(stem),
            SYNTHETIC_MARKER: lambda summary, stem: summary.get("manifest_sha256") if stem == "manifest" else None}


def verify_manifest(path: str | os.PathLike) -> None:
    """A manifest of a finished few-shot or synthetic set must be the one its marker file recorded."""
    path = Path(path)
    for marker, recorded_of in _MARKERS.items():
        if not (path.parent / marker).is_file():
            continue
        summary = read_json(path.parent / marker)
        recorded = recorded_of(summary, path.stem) if isinstance(summary, dict) else None
        if isinstance(recorded, str) and sha256_cached(path) != recorded:
            raise UserError(f"{path}: changed since {marker} recorded it (sha256 differs); re-run the stage that "
                            f"made {path.parent}")


def allowed_roots(manifest: str | os.PathLike) -> list[Path]:
    """Where a manifest's images may live: its own folder, and the local dataset root that the few-shot
    set beside it (fewshot.json) was sampled from (its val/test records point into the dataset)."""
    folder = Path(manifest).parent
    roots = [folder]
    summary = folder / FEWSHOT_MARKER
    if summary.is_file():
        dataset = read_json(summary).get("dataset")
        if isinstance(dataset, str) and dataset and not is_remote(dataset):
            roots.append(Path(dataset))
    return roots


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def verify_records(manifest: str | os.PathLike, records: list[Record], workers: int = 8) -> None:
    """Check every local record against the manifest before a stage reads it; UserError naming the first
    file that fails: a path (after symlinks) outside `allowed_roots`, a missing file, anything but a
    regular file (a FIFO is refused, never opened), or content whose sha256 differs from the recorded one.

    Files are hashed once per process for the same (path, size, mtime) (`io.sha256_cached`); objects on
    S3 are checked where they are downloaded (`data.remote.localize_records`).
    """
    local = [r for r in records if not is_remote(r.path)]
    if not local:
        return
    roots = [os.path.realpath(r) for r in allowed_roots(manifest)]
    real = {}
    for r in local:
        resolved = os.path.realpath(r.path)
        if not _inside(resolved, roots):
            raise UserError(f"{manifest}: {r.path} lies outside {roots[0]}"
                            + (f" and {roots[1]}" if len(roots) > 1 else "")
                            + "; a manifest may only list images of its own set")
        try:
            st = os.stat(resolved)
        except FileNotFoundError:
            raise UserError(f"{r.path}: listed in {manifest} but missing; re-run the stage that made "
                            f"{Path(manifest).parent}") from None
        except OSError as e:
            raise UserError(f"{r.path}: listed in {manifest} but unreadable ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{r.path}: listed in {manifest} but not a regular file")
        real[r.path] = resolved

    def check(r: Record) -> tuple[Record, str | None]:
        try:
            return r, sha256_cached(real[r.path])
        except OSError:
            return r, None

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(local)))) as pool:
        for r, digest in pool.map(check, local):
            if digest != r.sha256:
                found = "unreadable" if digest is None else f"sha256 {digest[:12]}…, recorded {r.sha256[:12]}…"
                raise UserError(f"{r.path}: changed since {manifest} listed it ({found}); re-run the stage that "
                                f"made {Path(manifest).parent}")


def write_classes(path: str | os.PathLike, classes: list[ClassInfo]) -> None:
    atomic_write_json(path, [asdict(c) for c in classes])


def read_classes(path: str | os.PathLike) -> list[ClassInfo]:
    rows = read_json(path)
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a list of classes")
    try:
        classes = [ClassInfo(int(r["index"]), str(r["slug"]), str(r["name"])) for r in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: each class needs index, slug and name ({e})") from None
    if [c.index for c in classes] != list(range(len(classes))):
        raise UserError(f"{path}: class indices must be 0..{len(classes) - 1} in order")
    for c in classes:
        if not _slug_ok(c.slug):
            raise UserError(f"{path}: class slug {c.slug!r} is not folder-safe")
    return classes


def select_classes(classes: list[ClassInfo], shard: str | None) -> list[ClassInfo]:
    """`shard` 'I/N' picks classes I, I+N, I+2N, … (0-based), so shards balance; None = all."""
    if not shard:
        return classes
    m = re.fullmatch(r"(\d+)/(\d+)", shard.strip())
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise UserError(f"--shard {shard!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    i, n = int(m[1]), int(m[2])
    return classes[i::n]
