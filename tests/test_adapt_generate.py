"""SD LoRA adaptation and generation on the tiny preset: formats, resume, determinism, sharding."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datadream.data.manifest import read_manifest
from datadream.errors import UserError
from datadream.stages import adapt, generate

FAST = ("adapt.epochs=2", "generate.images_per_class=3", "generate.steps=2", "generate.batch_size=2")


@pytest.fixture(scope="module")
def class_adapters(tmp_path_factory, fewshot_set, tiny):
    return adapt.run(tiny(*FAST), fewshot_set, tmp_path_factory.mktemp("ad") / "class")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, fewshot_set, tiny, class_adapters):
    return generate.run(tiny(*FAST), fewshot_set, class_adapters, tmp_path_factory.mktemp("gen") / "syn")


def test_class_wise_writes_one_diffusers_adapter_per_class(class_adapters, fewshot_set):
    index = json.loads((class_adapters / "adapter.json").read_text())
    slugs = [c["slug"] for c in json.loads((fewshot_set / "classes.json").read_text())]
    assert index["mode"] == "class" and sorted(index["classes"]) == sorted(slugs)
    for slug in slugs:
        unit = class_adapters / slug
        meta = json.loads((unit / "adapter.json").read_text())
        assert meta["classes"] == [slug] and meta["rank"] == 4 and meta["steps"] == 2
        weights = load_file(unit / adapt.WEIGHTS)
        assert any(k.startswith("unet.") for k in weights) and any(k.startswith("text_encoder.") for k in weights)
        assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora.up" in k or "lora_B" in k)
    assert not (class_adapters / "checkpoints").exists()


def test_adapter_loads_with_diffusers_and_changes_the_output(class_adapters, tiny):
    from datadream.models.sd import load_sd_pipeline

    pipe = load_sd_pipeline(tiny().models)
    slug = json.loads((class_adapters / "adapter.json").read_text())["prompts"]
    slug, prompt = next(iter(slug.items()))

    def image():
        return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = image()
    pipe.load_lora_weights(class_adapters / slug, weight_name=adapt.WEIGHTS, adapter_name=slug)
    adapted = image()
    assert not torch.allclose(base, adapted, atol=1e-6)
    pipe.delete_adapters(slug)
    assert torch.allclose(base, image(), atol=1e-6)


def test_dataset_wise_is_one_adapter_for_all_classes(tmp_path, fewshot_set, tiny):
    out = adapt.run(tiny(*FAST, "adapt.mode=dataset", "adapt.max_steps=2"), fewshot_set, tmp_path / "ds")
    index = json.loads((out / "adapter.json").read_text())
    assert set(index["classes"].values()) == {adapt.DATASET_UNIT}
    meta = json.loads((out / adapt.DATASET_UNIT / "adapter.json").read_text())
    assert len(meta["classes"]) == 6 and meta["steps"] == 2 and len(meta["prompts"]) == 6


def test_adapt_rerun_is_noop(class_adapters, fewshot_set, tiny):
    before = (class_adapters / "adapter.json").stat().st_mtime_ns
    adapt.run(tiny(*FAST), fewshot_set, class_adapters)
    assert (class_adapters / "adapter.json").stat().st_mtime_ns == before


def _cli(*args):
    return [sys.executable, "-m", "datadream.cli", "-q", *args]


def test_adapt_killed_mid_run_resumes_to_the_same_weights(tmp_path, fewshot_set, tiny):
    settings = ["adapt.mode=dataset", "adapt.max_steps=12", "adapt.checkpoint_every=3"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli("adapt", "--preset", "tiny", "--fewshot", str(fewshot_set), "--out", str(killed),
             *[a for s in settings for a in ("--set", s)]),
        env={**os.environ}, stderr=subprocess.PIPE,
    )
    ckpts = killed / "checkpoints" / adapt.DATASET_UNIT
    deadline = time.time() + 120
    while not (ckpts.exists() and any(p.name.startswith("ckpt-") for p in ckpts.iterdir())):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter.json").exists()

    # Re-run in-process: it resumes from the checkpoint, and ends where an uninterrupted run ends.
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("datadream.stages.adapt")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        adapt.run(tiny(*settings), fewshot_set, killed)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any("resumed from step" in r.getMessage() for r in records)
    straight = adapt.run(tiny(*settings), fewshot_set, tmp_path / "straight")
    a = load_file(killed / adapt.DATASET_UNIT / adapt.WEIGHTS)
    b = load_file(straight / adapt.DATASET_UNIT / adapt.WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapt_sigterm_checkpoints_and_exits_143(tmp_path, fewshot_set):
    out = tmp_path / "term"
    proc = subprocess.Popen(
        _cli("adapt", "--preset", "tiny", "--fewshot", str(fewshot_set), "--out", str(out),
             "--set", "adapt.mode=dataset", "--set", "adapt.max_steps=400", "--set", "adapt.checkpoint_every=1000"),
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not (out / ".fingerprint").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(3)  # let it load and take a few steps
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert any(p.name.startswith("ckpt-") for p in (out / "checkpoints" / adapt.DATASET_UNIT).iterdir())


def test_generate_manifest_and_images(synthetic, fewshot_set):
    records = read_manifest(synthetic / "manifest.jsonl")
    assert len(records) == 6 * 3
    assert all(not r.is_real and Path(r.path).is_file() for r in records)
    assert {r.extra["adapter"] for r in records} == {r.cls for r in records}  # class-wise: own adapter
    assert len({r.extra["seed"] for r in records}) == len(records)  # no shared noise stream
    assert all(r.extra["prompt"].startswith("a photo of a ") for r in records)
    summary = json.loads((synthetic / "generate.json").read_text())
    assert summary["images"] == 18 and summary["resolution"] == 64


def test_generate_resumes_image_by_image_and_is_deterministic(tmp_path, synthetic, fewshot_set, class_adapters, tiny):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(synthetic, partial)
    (partial / "generate.json").unlink()
    (partial / "manifest.jsonl").unlink()
    victims = sorted(partial.glob("*/00001.png"))
    kept = {p: p.stat().st_mtime_ns for p in partial.glob("*/00000.png")}
    for p in victims:
        p.unlink()
    generate.run(tiny(*FAST), fewshot_set, class_adapters, partial)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "finished images must not be redone"
    # A redone image has the same seed, so it is the same image up to batch-size numerics (it was drawn
    # alone, not in a batch of two); everything else in the manifest is identical.
    import numpy as np
    from PIL import Image

    redone = {(r.cls, r.extra["index"]): r for r in read_manifest(partial / "manifest.jsonl")}
    original = {(r.cls, r.extra["index"]): r for r in read_manifest(synthetic / "manifest.jsonl")}
    assert redone.keys() == original.keys()
    for key, r in redone.items():
        o = original[key]
        assert (r.extra, r.label) == (o.extra, o.label)
        assert Path(r.path).relative_to(partial) == Path(o.path).relative_to(synthetic)
        diff = np.abs(np.asarray(Image.open(r.path), np.int16) - np.asarray(Image.open(o.path), np.int16))
        assert diff.max() <= 2, key


def test_generate_shards_match_the_full_run(tmp_path, synthetic, fewshot_set, class_adapters, tiny):
    full = {(r.cls, r.extra["index"]): r.sha256 for r in read_manifest(synthetic / "manifest.jsonl")}
    sharded = {}
    for i in range(2):
        out = generate.run(tiny(*FAST), fewshot_set, class_adapters, tmp_path / f"s{i}", shard=f"{i}/2")
        sharded |= {(r.cls, r.extra["index"]): r.sha256 for r in read_manifest(out / "manifest.jsonl")}
    assert sharded == full


def test_generate_needs_a_finished_adapter_folder(tmp_path, fewshot_set, tiny):
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="not a finished adapt output"):
        generate.run(tiny(*FAST), fewshot_set, tmp_path / "half", tmp_path / "out")
    with pytest.raises(UserError, match="--shard"):
        generate.run(tiny(*FAST), fewshot_set, tmp_path / "half", tmp_path / "out", shard="3/2")


@pytest.mark.slow
def test_compiled_class_wise_adapt_resumes_bit_for_bit(tmp_path, fewshot_set, tiny, monkeypatch):
    """run.compile=true (inductor; C++ kernels on this CPU, Triton on CUDA): a class-wise run stopped right
    after a checkpoint resumes to exactly the weights of an uninterrupted compiled run."""
    settings = ("adapt.max_steps=4", "adapt.checkpoint_every=2")
    shard = "0/3"  # 2 of the 6 classes: two units, so the second resumes while the first is finished
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    straight = adapt.run(tiny(*settings, "run.compile=true"), fewshot_set, tmp_path / "straight", shard=shard)
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile

    class Killed(Exception):
        pass

    save, saved = adapt.save_checkpoint, []

    def save_then_die(ckpt_dir, step, *args, **kwargs):
        save(ckpt_dir, step, *args, **kwargs)
        saved.append((Path(ckpt_dir).name, step))
        if len(saved) == 2:  # the second unit's checkpoint at step 2 of 4
            raise Killed

    monkeypatch.setattr(adapt, "save_checkpoint", save_then_die)
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        adapt.run(tiny(*settings, "run.compile=true"), fewshot_set, killed, shard=shard)
    monkeypatch.setattr(adapt, "save_checkpoint", save)
    assert not (killed / "adapter.json").exists()
    units = [u for u, _ in saved]
    assert len(set(units)) == 2 and (killed / units[0] / "adapter.json").exists()

    adapt.run(tiny(*settings, "run.compile=true"), fewshot_set, killed, shard=shard)
    for unit in units:
        a, b = load_file(killed / unit / adapt.WEIGHTS), load_file(straight / unit / adapt.WEIGHTS)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), unit

    # Compiled and eager kernels sum in different orders (fused reductions), so the weights agree to float
    # rounding, not bit for bit: eager and compiled runs are not interchangeable mid-unit for exact resume.
    eager = adapt.run(tiny(*settings), fewshot_set, tmp_path / "eager", shard=shard)
    for unit in units:
        a, b = load_file(eager / unit / adapt.WEIGHTS), load_file(straight / unit / adapt.WEIGHTS)
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), unit
