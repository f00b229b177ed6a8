"""Stage 0 — few-shot sampling: a dataset -> train (k per class), val and test manifests.

Output folder (a `FewShotSet`):
  classes.json            index, slug, display name
  train/<slug>/<file>     copies of the k sampled real images, so the set is self-contained
  train.jsonl             the shots (paths relative to the folder), is_real = true
  val.jsonl, test.jsonl   every usable val / test image (absolute paths into the dataset)
  rejected.jsonl          files that failed to load, with the reason
  fewshot.json            summary and fingerprint, written last: its presence means complete
The whole folder is built under a temporary name and renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from datadream import storage
from datadream.artifacts import FEWSHOT_MARKER as MARKER
from datadream.config import Config
from datadream.data import formats
from datadream.data.imagefolder import DatasetIndex
from datadream.data.images import ImageRejected, RejectionCounts, verify_image
from datadream.data.manifest import Record, write_classes, write_manifest
from datadream.errors import UserError
from datadream.io import (
    atomic_write_json,
    atomic_write_jsonl,
    check_output_dir,
    sha256_file,
    sha256_json,
    staged_dir,
    writes_output,
)
from datadream.runtime import derive_seed

log = logging.getLogger(__name__)


def _check(path: Path, max_pixels: int) -> tuple[Path, str | None, ImageRejected | None]:
    """Load the image fully (rejecting bad files) and hash it; runs in a thread pool."""
    try:
        verify_image(path, max_pixels=max_pixels)
        return path, sha256_file(path), None
    except ImageRejected as e:
        return path, None, e


def _fingerprint(index: DatasetIndex, config: Config) -> str:
    listing = sorted(
        (str(p.relative_to(index.root)), p.stat().st_size, p.stat().st_mtime_ns)
        for split in index.splits.values() for paths in split.values() for p in paths
    )
    return sha256_json({"dataset": str(index.root.resolve()), "listing": listing,
                        "fewshot": config.fewshot.model_dump(mode="json"),
                        "data": config.data.model_dump(mode="json")})


@writes_output("out")
def run(config: Config, dataset: str | os.PathLike, out: str | os.PathLike) -> Path:
    out = Path(out)
    shots, seed = config.fewshot.shots, config.fewshot.seed
    max_px = config.data.max_image_pixels
    remote = None
    if storage.is_s3(dataset):  # mirrored into the cache (ETag-checked: a second run downloads nothing)
        remote, dataset = str(dataset).rstrip("/"), storage.localize(dataset)
    index = formats.scan(dataset, config.data)
    root = index.root.resolve()

    def source(path: Path) -> str:
        """Where an image lives for later stages: its s3:// URI for a dataset on S3, else its local path."""
        path = path.resolve()
        return f"{remote}/{path.relative_to(root).as_posix()}" if remote else str(path)

    fingerprint = _fingerprint(index, config)
    if check_output_dir(out, MARKER, fingerprint):
        log.info("fewshot: %s already holds this few-shot set; nothing to do", out)
        return out

    rejected: list[ImageRejected] = []
    counts = RejectionCounts()
    pool = ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2))

    # Shots: walk each class's train images in a seeded order and keep the first k that load.
    # Validating lazily keeps this cheap on big datasets; the order depends only on (seed, class).
    shots_by_class: dict[str, list[tuple[Path, str]]] = {}
    for c in tqdm(index.classes, desc="fewshot: sampling", unit="class", leave=False):
        order = list(index.splits["train"][c.slug])
        random.Random(derive_seed(seed, c.slug)).shuffle(order)
        chosen: list[tuple[Path, str]] = []
        bad = 0
        for start in range(0, len(order), shots):
            if len(chosen) == shots:
                break
            for path, digest, err in pool.map(lambda p: _check(p, max_px), order[start : start + shots]):
                if err is not None:
                    rejected.append(err)
                    counts.add(err)
                    bad += 1
                elif len(chosen) < shots:
                    chosen.append((path, digest))
        if len(chosen) < shots:
            raise UserError(
                f"class {c.slug!r}: {len(chosen)} usable train image(s) of {len(order)} "
                f"({bad} rejected), fewer than shots={shots}"
            )
        shots_by_class[c.slug] = chosen

    # Val and test: every image is checked once here, so later stages read only good files.
    eval_records: dict[str, list[Record]] = {}
    for split in ("val", "test"):
        records = []
        items = [(c, p) for c in index.classes for p in index.splits[split][c.slug]]
        results = pool.map(lambda item: _check(item[1], max_px), items)
        for (c, _), (path, digest, err) in tqdm(zip(items, results, strict=True), total=len(items),
                                                desc=f"fewshot: checking {split}", unit="img", leave=False):
            if err is not None:
                rejected.append(err)
                counts.add(err)
                continue
            records.append(Record(source(path), c.index, c.slug, digest, True))
        eval_records[split] = records
    pool.shutdown()

    with staged_dir(out) as tmp:
        write_classes(tmp / "classes.json", index.classes)
        train = []
        for c in index.classes:
            for path, digest in shots_by_class[c.slug]:
                dest = tmp / "train" / c.slug / path.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
                train.append(Record(str(dest), c.index, c.slug, digest, True, {"source": source(path)}))
        write_manifest(tmp / "train.jsonl", train)
        for split, records in eval_records.items():
            write_manifest(tmp / f"{split}.jsonl", records)
        atomic_write_jsonl(tmp / "rejected.jsonl", ({"path": str(e.path), "reason": e.reason} for e in rejected))
        summary = {
            "fingerprint": fingerprint,
            "dataset": remote or str(root),
            "shots": shots,
            "seed": seed,
            "classes": len(index.classes),
            "counts": {"train": len(train), **{s: len(r) for s, r in eval_records.items()}},
            "carved_splits": index.carved,
            "rejected": counts.to_dict(),
            "ignored_non_image_files": index.ignored_files,
            "manifest_sha256": {s: sha256_file(tmp / f"{s}.jsonl") for s in ("train", "val", "test")},
        }
        atomic_write_json(tmp / MARKER, summary)
    if counts.total:
        log.warning("fewshot: rejected %d unreadable image(s): %s (listed in %s)", counts.total,
                    counts.to_dict(), out / "rejected.jsonl")
    log.info("fewshot: %d classes × %d shots, %d val, %d test -> %s", len(index.classes), shots,
             summary["counts"]["val"], summary["counts"]["test"], out)
    return out
