"""The CLIP LoRA classify stage on the tiny preset: modes, outputs, no-op re-runs, resume, loss weighting."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import colour_task
from safetensors.torch import load_file

from datadream.errors import UserError
from datadream.stages import classify

# The paper's augmentation chain and Mixup/CutMix on, whatever the tiny preset says.
FAST = ("classify.epochs=2", "classify.batch_size=8", "classify.warmup_steps=1", "classify.augment=true",
        "classify.mix_p=0.5")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return colour_task(tmp_path_factory.mktemp("classify-inputs"))


def _final_files(out: Path) -> list[Path]:
    return [out / classify.LORA_FILE, out / classify.HEAD_FILE, out / classify.MARKER]


@pytest.mark.parametrize("train_on", ["synthetic", "synthetic+real", "real"])
def test_each_mode_trains_and_writes_the_classifier_last(train_on, inputs, tiny, tmp_path):
    fewshot, synthetic = inputs
    out = classify.run(tiny(*FAST, f"classify.train_on={train_on}"), fewshot, synthetic, tmp_path / "clf")
    lora, head, marker = _final_files(out)
    assert lora.exists() and head.exists() and marker.exists()
    assert marker.stat().st_mtime_ns >= max(lora.stat().st_mtime_ns, head.stat().st_mtime_ns)
    assert not (out / classify.CHECKPOINTS).exists()

    meta = json.loads(marker.read_text())
    assert meta["train_on"] == train_on
    assert [c["slug"] for c in meta["classes"]] == ["class0", "class1", "class2"]
    assert [h["epoch"] for h in meta["history"]] == [0, 1, 2]
    assert 0 <= meta["best_epoch"] <= 2
    counts = meta["counts"]
    assert counts["real"] == (12 if "real" in train_on else 0)
    assert counts["synthetic"] == (18 if "synthetic" in train_on else 0)
    if train_on == "synthetic+real":
        assert counts["train_per_epoch"] == 18 + 12 * counts["real_repeats"]  # ≈1:1
        assert meta["real_weight"] == 0.8

    tensors = load_file(lora)
    assert tensors and all("lora_" in k for k in tensors)
    head_tensors = load_file(head)
    emb = head_tensors["text_embeddings"]
    assert emb.shape[0] == 3
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(head_tensors["logit_scale"]) == 100.0


def test_zero_epochs_is_zero_shot(inputs, tiny, tmp_path):
    fewshot, synthetic = inputs
    out = classify.run(tiny("classify.epochs=0"), fewshot, synthetic, tmp_path / "zs")
    meta = json.loads((out / classify.MARKER).read_text())
    assert meta["best_epoch"] == 0 and [h["epoch"] for h in meta["history"]] == [0]
    # peft's default init has B = 0: the saved adapter is the identity, the head is the zero-shot head.
    lora = load_file(out / classify.LORA_FILE)
    assert all(torch.count_nonzero(v) == 0 for k, v in lora.items() if "lora_B" in k)


def test_rerun_with_same_inputs_is_a_no_op(inputs, tiny, tmp_path, caplog):
    fewshot, synthetic = inputs
    config = tiny(*FAST)
    out = classify.run(config, fewshot, synthetic, tmp_path / "clf")
    before = {p: p.stat().st_mtime_ns for p in _final_files(out)}
    with caplog.at_level(logging.INFO, logger="datadream.stages.classify"):
        classify.run(config, fewshot, synthetic, out)
    assert "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in _final_files(out)} == before
    with pytest.raises(UserError, match="different inputs"):
        classify.run(tiny(*FAST, "classify.lr=0.01"), fewshot, synthetic, out)


KILL_AFTER_FIRST_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    from datadream.config import load_config
    from datadream.stages import classify

    real_save = classify.save_checkpoint
    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no cleanup code runs
    classify.save_checkpoint = save_then_die
    classify.run(load_config("tiny", overrides=sys.argv[4:]), sys.argv[1], sys.argv[2], sys.argv[3])
""")


def test_killed_run_resumes_to_the_same_adapter(inputs, tiny, tmp_path, caplog):
    fewshot, synthetic = inputs
    overrides = [*FAST, "classify.epochs=3", "classify.train_on=synthetic+real"]
    killed = tmp_path / "killed"
    argv = [str(fewshot), str(synthetic), str(killed), *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, *argv],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / classify.MARKER).exists()
    assert (killed / classify.CHECKPOINTS / "ckpt-1" / "COMMITTED.json").exists()

    with caplog.at_level(logging.INFO, logger="datadream.stages.classify"):
        classify.run(tiny(*overrides), fewshot, synthetic, killed)
    assert "resumed from epoch 1" in caplog.text
    straight = classify.run(tiny(*overrides), fewshot, synthetic, tmp_path / "straight")

    resumed_lora = load_file(killed / classify.LORA_FILE)
    straight_lora = load_file(straight / classify.LORA_FILE)
    assert resumed_lora.keys() == straight_lora.keys()
    assert all(torch.equal(resumed_lora[k], straight_lora[k]) for k in straight_lora)
    head_a, head_b = load_file(killed / classify.HEAD_FILE), load_file(straight / classify.HEAD_FILE)
    assert torch.equal(head_a["text_embeddings"], head_b["text_embeddings"])
    meta_a = json.loads((killed / classify.MARKER).read_text())
    meta_b = json.loads((straight / classify.MARKER).read_text())
    assert meta_a["history"] == meta_b["history"] and meta_a["best_epoch"] == meta_b["best_epoch"]


def test_loss_weights_real_and_synthetic_by_the_is_real_flag():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    is_real = torch.tensor([True, True, False, False, False, True])
    ce = torch.nn.functional.cross_entropy
    expected = 0.8 * ce(logits[is_real], targets[is_real]) + 0.2 * ce(logits[~is_real], targets[~is_real])
    assert torch.allclose(classify.classification_loss(logits, targets, is_real, 0.8), expected)
    # Same samples, flags swapped: the weights follow the flag, not the position or the path.
    swapped = 0.8 * ce(logits[~is_real], targets[~is_real]) + 0.2 * ce(logits[is_real], targets[is_real])
    assert torch.allclose(classify.classification_loss(logits, targets, ~is_real, 0.8), swapped)
    # A batch of one kind only keeps that kind's weight; without real_weight it is plain cross-entropy.
    all_syn = torch.zeros(6, dtype=torch.bool)
    only_synthetic = classify.classification_loss(logits, targets, all_syn, 0.8)
    assert torch.allclose(only_synthetic, 0.2 * ce(logits, targets))
    assert torch.allclose(classify.classification_loss(logits, targets, is_real, None), ce(logits, targets))
    soft = torch.nn.functional.one_hot(targets, 3).float()
    assert torch.allclose(classify.classification_loss(logits, soft, is_real, 0.8), expected)


def test_mixing_stays_within_real_and_synthetic_parts():
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(6)])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    is_real = torch.tensor([True, True, True, False, False, False])
    mixed, targets = classify.mix_batch(images, labels, is_real, 3, p=1.0, seed=0)
    assert not torch.equal(mixed, images)
    # Real images 0-2 have values in [0, 2], synthetic 3-5 in [3, 5]; mixing never crosses over.
    assert mixed[:3].max() <= 2 and mixed[3:].min() >= 3
    assert torch.allclose(targets.sum(-1), torch.ones(6))
    same, again = classify.mix_batch(images, labels, is_real, 3, p=1.0, seed=0)
    assert torch.equal(same, mixed) and torch.equal(again, targets)
    untouched, one_hot = classify.mix_batch(images, labels, is_real, 3, p=0.0, seed=0)
    assert torch.equal(untouched, images) and torch.equal(one_hot.argmax(-1), labels)


def test_missing_inputs_are_user_errors_naming_the_path(inputs, tiny, tmp_path):
    fewshot, _ = inputs
    with pytest.raises(UserError, match=r"manifest\.jsonl: not found"):
        classify.run(tiny(*FAST), fewshot, tmp_path / "no-synthetic", tmp_path / "out")
    with pytest.raises(UserError, match="needs a synthetic set"):
        classify.run(tiny(*FAST), fewshot, None, tmp_path / "out")
    with pytest.raises(UserError, match=r"classes\.json: not found"):
        classify.run(tiny(*FAST, "classify.train_on=real"), tmp_path / "nowhere", None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_synthetic_manifest_with_real_flags_is_refused(inputs, tiny, tmp_path):
    fewshot, _ = inputs
    # Pointing the synthetic input at the real shots must not silently train "synthetic-only" on them.
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "manifest.jsonl").write_text((fewshot / "train.jsonl").read_text())
    with pytest.raises(UserError, match="is_real=True"):
        classify.run(tiny(*FAST), fewshot, tmp_path / "wrong", tmp_path / "out")


def test_result_does_not_depend_on_worker_count(inputs, tiny, tmp_path):
    fewshot, synthetic = inputs
    # Each sample's augmentation is seeded by (seed, epoch, index), not by the worker that loads it.
    runs = [classify.run(tiny(*FAST, f"classify.num_workers={n}"), fewshot, synthetic, tmp_path / f"w{n}")
            for n in (0, 2)]
    a, b = (load_file(out / classify.LORA_FILE) for out in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    fingerprints = {json.loads((out / classify.MARKER).read_text())["fingerprint"] for out in runs}
    assert len(fingerprints) == 1  # where and how fast data loads is not part of the inputs


def test_without_val_images_the_last_epoch_is_kept(inputs, tiny, tmp_path, caplog):
    fewshot, synthetic = inputs
    no_val = tmp_path / "fewshot"
    shutil.copytree(fewshot, no_val)
    (no_val / "val.jsonl").write_text("")
    out = classify.run(tiny(*FAST), no_val, synthetic, tmp_path / "clf")
    meta = json.loads((out / classify.MARKER).read_text())
    assert meta["best_epoch"] == 2 and meta["best_val_top1"] is None
    assert "keeping the last epoch" in caplog.text
