"""S3 transfer speed of datadream.storage vs a plain sequential boto3 loop, on a local moto S3 server.

Starts `moto_server` (S3 API over HTTP on 127.0.0.1, fake credentials), writes --files small files
(--min-kb to --max-kb of random bytes each, the size of small PNGs) to a temporary folder, then times:

  baseline   boto3 `upload_file` one file after another, then list + `download_file` one after another
  ours       `storage.upload_folder` (parallel, marker last) then `storage.download_prefix` (parallel)
  cached     `storage.download_prefix` of the same prefix again (served from the mirror: 0 downloads)

Both paths move the same bytes through the same server; each gets a fresh prefix and a fresh local folder.
The figures are for this machine and a loopback server, where per-request overhead dominates: real S3
adds network latency per request, which parallel transfers hide even better.

    .venv/bin/python benchmarks/storage.py                  # table on stdout, JSON in benchmarks/results/
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("benchmarks.storage")

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
UNSET = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN",
         "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(log_path: Path, timeout_s: float = 30) -> Iterator[str]:
    """moto_server (beside this interpreter) on a free loopback port; yields its URL, stops it afterwards."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    binary = Path(sys.executable).parent / "moto_server"
    env = {k: v for k, v in os.environ.items() if k not in UNSET} | FAKE_AWS_ENV
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer within {timeout_s:.0f} s") from None
                time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def make_files(root: Path, n: int, min_kb: int, max_kb: int, seed: int = 0) -> int:
    """n files of random bytes in 20 class folders; returns the total size."""
    rng = random.Random(seed)
    total = 0
    for i in range(n):
        path = root / f"class_{i % 20:02d}" / f"img_{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(min_kb * 1024, max_kb * 1024))
        path.write_bytes(data)
        total += len(data)
    return total


def baseline(client, src: Path, bucket: str, prefix: str, dest: Path) -> tuple[float, float]:
    """Sequential boto3: upload_file per file, then list and download_file per object."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    t = time.perf_counter()
    for p in files:
        client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(src).as_posix()}")
    t_up = time.perf_counter() - t
    t = time.perf_counter()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
            for o in page.get("Contents", [])]
    for key in keys:
        target = dest / key[len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    return t_up, time.perf_counter() - t


def same_files(a: Path, b: Path) -> bool:
    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and not p.name.startswith(".s3-index")}

    return tree(a) == tree(b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000, help="how many files (default 2000)")
    parser.add_argument("--min-kb", type=int, default=2, help="smallest file, KiB (default 2)")
    parser.add_argument("--max-kb", type=int, default=8, help="largest file, KiB (default 8)")
    parser.add_argument("--workers", type=int, default=16, help="parallel transfers of ours (default 16)")
    parser.add_argument("--json", default=str(RESULTS / "storage.json"), help="where to write the figures")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("datadream.storage").setLevel(logging.INFO)

    with tempfile.TemporaryDirectory(prefix="datadream-bench-s3-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        nbytes = make_files(src, args.files, args.min_kb, args.max_kb)
        log.info("%d files, %.1f MiB in %s", args.files, nbytes / 2**20, src)
        with moto_server(tmp / "moto.log") as url:
            for key in UNSET:
                os.environ.pop(key, None)
            os.environ.update(FAKE_AWS_ENV)
            os.environ["AWS_ENDPOINT_URL"] = url
            os.environ["DATADREAM_CACHE"] = str(tmp / "cache")
            import boto3

            from datadream import storage

            bucket = "datadream-bench"
            plain = boto3.client("s3")
            plain.create_bucket(Bucket=bucket)
            storage.reset_client()
            storage.client()  # created outside the timings, like `plain`

            base_up, base_down = baseline(plain, src, bucket, "baseline", tmp / "baseline-out")
            log.info("baseline: upload %.2f s, download %.2f s", base_up, base_down)

            uri = f"s3://{bucket}/ours"
            (src / "DONE.json").write_text("{}")  # the marker, published last
            t = time.perf_counter()
            storage.upload_folder(src, uri, marker="DONE.json", workers=args.workers)
            ours_up = time.perf_counter() - t
            t = time.perf_counter()
            local = storage.download_prefix(uri, workers=args.workers)
            ours_down = time.perf_counter() - t
            log.info("ours: upload %.2f s, download %.2f s", ours_up, ours_down)

            gets = 0
            real_get = storage._get_to_file

            def counting(*a, **kw):
                nonlocal gets
                gets += 1
                return real_get(*a, **kw)

            storage._get_to_file = counting
            t = time.perf_counter()
            storage.download_prefix(uri, workers=args.workers)
            cached = time.perf_counter() - t
            storage._get_to_file = real_get
            (src / "DONE.json").unlink()
            (local / "DONE.json").unlink()
            ok = same_files(src, local) and same_files(src, tmp / "baseline-out")

    base, ours = base_up + base_down, ours_up + ours_down
    result = {
        "files": args.files, "mib": round(nbytes / 2**20, 1), "workers": args.workers,
        "baseline_upload_s": round(base_up, 2), "baseline_download_s": round(base_down, 2),
        "ours_upload_s": round(ours_up, 2), "ours_download_s": round(ours_down, 2),
        "ratio": round(base / ours, 2), "cached_download_s": round(cached, 3), "cached_downloads": gets,
        "bytes_equal": ok, "server": "moto_server on 127.0.0.1",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'path':<28} {'upload s':>9} {'download s':>11} {'total s':>8}")
    print(f"{'boto3, sequential':<28} {base_up:>9.2f} {base_down:>11.2f} {base:>8.2f}")
    print(f"{f'datadream.storage, {args.workers} workers':<28} {ours_up:>9.2f} {ours_down:>11.2f} {ours:>8.2f}")
    print(f"{'cached download_prefix':<28} {'':>9} {cached:>11.3f} {'':>8}  ({gets} files downloaded)")
    print(f"ratio sequential / ours: {result['ratio']}x over {args.files} files ({result['mib']} MiB); "
          f"bytes equal: {ok}; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
