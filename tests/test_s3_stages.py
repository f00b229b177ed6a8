"""The stages on S3: a dataset under an s3:// prefix, every stage's input and output on S3 (moto server)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from servers import ensure_bucket, list_keys, s3_client

from datadream import storage
from datadream.cli import main
from datadream.data.manifest import read_manifest
from datadream.data.remote import localize_records
from datadream.errors import UserError

FAST = ["--preset", "tiny", "--set", "adapt.max_steps=2", "--set", "generate.images_per_class=2",
        "--set", "generate.steps=2", "--set", "classify.epochs=1"]


@pytest.fixture
def s3(moto_endpoint, monkeypatch, tmp_path):
    """A fresh bucket on the moto server, the client pointed at it, and an empty cache."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("DATADREAM_CACHE", str(tmp_path / "cache"))
    storage.reset_client()
    bucket = f"dd-{uuid.uuid4().hex[:12]}"
    ensure_bucket(moto_endpoint, bucket)
    yield bucket
    storage.reset_client()


def upload_tree(endpoint: str, folder: Path, bucket: str, prefix: str) -> None:
    client = s3_client(endpoint)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


@pytest.mark.slow
def test_every_stage_reads_and_writes_s3(s3, moto_endpoint, demo_dataset, capsys):
    upload_tree(moto_endpoint, demo_dataset, s3, "datasets/demo")
    root = f"s3://{s3}/runs/r1"
    steps = [
        ["fewshot", "--dataset", f"s3://{s3}/datasets/demo", "--out", f"{root}/fewshot"],
        ["adapt", "--fewshot", f"{root}/fewshot", "--out", f"{root}/adapters"],
        ["generate", "--fewshot", f"{root}/fewshot", "--adapters", f"{root}/adapters", "--out", f"{root}/synthetic"],
        ["classify", "--fewshot", f"{root}/fewshot", "--synthetic", f"{root}/synthetic", "--train-on", "synthetic+real",
         "--out", f"{root}/classifier"],
        ["evaluate", "--fewshot", f"{root}/fewshot", "--classifier", f"{root}/classifier", "--out", f"{root}/eval"],
    ]
    for argv in steps:
        assert main(["-q", *argv, *FAST]) == 0, (argv, capsys.readouterr().err)
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 96  # every test image of the S3 dataset was scored
    keys = set(list_keys(moto_endpoint, s3, "runs/r1/"))
    for marker in ("fewshot/fewshot.json", "adapters/adapter.json", "synthetic/generate.json",
                   "classifier/classifier.json", "eval/metrics.json"):
        assert f"runs/r1/{marker}" in keys
    # The few-shot set is portable: val/test point at the dataset's objects, not at this machine's cache.
    test = storage.read_bytes(f"{root}/fewshot/test.jsonl").decode().splitlines()
    assert all(json.loads(line)["path"].startswith(f"s3://{s3}/datasets/demo/") for line in test)

    # Re-running a finished stage is a no-op that sends nothing again.
    before = {k: v for k, v in _etags(moto_endpoint, s3, "runs/r1/fewshot/").items()}
    assert main(["-q", *steps[0], *FAST]) == 0
    assert _etags(moto_endpoint, s3, "runs/r1/fewshot/") == before


def _etags(endpoint: str, bucket: str, prefix: str) -> dict[str, tuple[str, object]]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}


def test_records_on_s3_are_localized_and_checked(s3, moto_endpoint, fewshot_set):
    client = s3_client(moto_endpoint)
    records = read_manifest(fewshot_set / "test.jsonl")[:3]
    remote = []
    for i, r in enumerate(records):
        key = f"data/img{i}.png"
        client.upload_file(r.path, s3, key)
        remote.append(type(r)(f"s3://{s3}/{key}", r.label, r.cls, r.sha256, r.is_real))
    local = localize_records(remote)
    assert [Path(r.path).read_bytes() for r in local] == [Path(r.path).read_bytes() for r in records]
    assert localize_records(local) == local  # local paths pass through

    client.put_object(Bucket=s3, Key="data/img0.png", Body=b"changed")
    Path(local[0].path).unlink()  # not cached any more: must be fetched, and no longer matches its sha256
    with pytest.raises(UserError, match=rf"s3://{s3}/data/img0.png: the object changed"):
        localize_records(remote)
    with pytest.raises(UserError):
        localize_records([type(r)(f"s3://{s3}/data/../../etc/passwd", 0, "x", "0" * 64, True)])


@pytest.mark.slow
def test_demo_on_an_s3_dataset_publishes_to_s3(s3, moto_endpoint, demo_dataset, capsys):
    upload_tree(moto_endpoint, demo_dataset, s3, "datasets/demo")
    out = f"s3://{s3}/demo-run"
    assert main(["-q", "demo", "--in-process", "--dataset", f"s3://{s3}/datasets/demo", "--out", out, *FAST]) == 0
    table = capsys.readouterr().out
    assert f"artifacts under {out}" in table and "synthetic+real (dataset-wise)" in table
    results = json.loads(storage.read_bytes(f"{out}/results.json"))
    assert len(results["rows"]) == 6 and all(r["n"] == 96 for r in results["rows"])
    keys = set(list_keys(moto_endpoint, s3, "demo-run/"))
    assert "demo-run/fewshot/fewshot.json" in keys and "demo-run/metrics/real/metrics.json" in keys
    assert not any(k.startswith("demo-run/dataset/") for k in keys)  # the dataset stays where it was


def test_models_load_from_s3_folders(s3, moto_endpoint, tiny, tmp_path):
    from datadream.models.clip import load_clip, tiny_clip_dir
    from datadream.models.sd import load_sd_pipeline, resolve_sd

    sd_local = Path(resolve_sd(tiny().models))  # the tiny SD, built into a folder like any mirrored model
    _, _, preprocess = load_clip(tiny().models)
    clip_local = tiny_clip_dir(tiny().models)
    upload_tree(moto_endpoint, sd_local, s3, "models/sd")
    upload_tree(moto_endpoint, clip_local, s3, "models/clip")

    cfg = tiny(f"models.sd=s3://{s3}/models/sd", f"models.clip=local-dir:s3://{s3}/models/clip")
    mirrored = Path(resolve_sd(cfg.models))
    assert mirrored.is_relative_to(storage.cache_dir() / "s3" / s3) and (mirrored / "model_index.json").is_file()
    pipe = load_sd_pipeline(cfg.models)
    assert pipe.unet.config.sample_size == load_sd_pipeline(tiny().models).unet.config.sample_size
    assert load_clip(cfg.models)[2] == preprocess
