"""Manifest records that point at objects on S3 (the val/test images of a dataset kept on S3).

`fewshot` copies the shots into its output but lists val/test images where they live; for a dataset
on S3 that is `s3://bucket/key`. Stages that read those records call `localize_records`, which maps
each object to the same cache file `storage.download_prefix` uses (`<cache>/s3/<bucket>/<key>`) and
downloads only what is missing or differs from the record's sha256, in parallel. Keys are validated
before they become paths.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from datadream import storage
from datadream.data.manifest import Record, is_remote
from datadream.errors import UserError
from datadream.io import atomic_write_bytes, sha256_file

log = logging.getLogger(__name__)


def cache_path(uri: str) -> Path:
    """The local file for `s3://bucket/key` in the object cache; UserError for a hostile key."""
    bucket, key = storage.parse_s3(uri)
    storage.check_key(key, bucket=bucket)
    return storage.cache_dir() / "s3" / bucket / key


def localize_records(records: list[Record], workers: int = 16) -> list[Record]:
    """`records` with every s3:// path replaced by a verified local copy (downloaded when needed)."""
    remote = [r for r in records if is_remote(r.path)]
    if not remote:
        return records
    local = {r.path: cache_path(r.path) for r in remote}

    def fresh(r: Record) -> bool:
        path = local[r.path]
        return path.is_file() and sha256_file(path) == r.sha256

    def fetch(r: Record) -> None:
        data = storage.read_bytes(r.path)
        if hashlib.sha256(data).hexdigest() != r.sha256:
            raise UserError(f"{r.path}: the object changed since the few-shot set listed it (sha256 differs); "
                            "re-run fewshot")
        atomic_write_bytes(local[r.path], data)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, (os.cpu_count() or 1) * 8))) as pool:
        stale = [r for r, ok in zip(remote, pool.map(fresh, remote), strict=True) if not ok]
        if stale:
            list(tqdm(pool.map(fetch, stale), total=len(stale), desc="download", unit="img", leave=False))
    log.info("storage: %d image(s) from S3: %d cached, %d downloaded", len(remote), len(remote) - len(stale),
             len(stale))
    return [replace(r, path=str(local[r.path])) if is_remote(r.path) else r for r in records]
