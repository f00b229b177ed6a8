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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datadream.errors import UserError
from datadream.io import atomic_write_json, atomic_write_jsonl, read_json

_SLUG_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def slugify(name: str) -> str:
    """A folder-safe name: display names like 'F/A-18' contain '/' (docs/method.md, Stage 0)."""
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", name.strip()).strip("._")
    return slug or "class"


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


def read_manifest(path: str | os.PathLike) -> list[Record]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: manifest not found") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise UserError(f"{path}:{n}: missing key(s) {', '.join(missing)}")
        p = row.pop("path")
        if not is_remote(p) and not Path(p).is_absolute():
            p = str(path.parent / p)
        records.append(Record(str(p), int(row.pop("label")), row.pop("class"), row.pop("sha256"),
                              bool(row.pop("is_real")), row))
    return records


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
        if not _SLUG_OK.match(c.slug):
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
