"""The evaluate stage: consistent metrics, rejected images counted, a trained classifier beats chance."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import colour_task
from PIL import Image

from datadream.data.manifest import Record, read_manifest, write_manifest
from datadream.errors import UserError
from datadream.io import sha256_file
from datadream.stages import classify, evaluate


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Few-shot folder (train/val/test) and synthetic folder of an easy, separable colour task."""
    return colour_task(tmp_path_factory.mktemp("evaluate-toy"), shots=8, test=6, synthetic_per_class=8)


@pytest.fixture(scope="module")
def zero_shot(toy, tmp_path_factory, tiny):
    fewshot, synthetic = toy
    return classify.run(tiny("classify.epochs=0"), fewshot, synthetic, tmp_path_factory.mktemp("zs") / "clf")


def test_metrics_are_consistent_and_rejected_images_are_counted(toy, zero_shot, tiny, tmp_path, caplog):
    fewshot, _ = toy
    records = [dataclasses.replace(r, path=str(shutil.copy(r.path, tmp_path))) for r in
               read_manifest(fewshot / "test.jsonl")]
    broken = tmp_path / "broken.png"
    broken.write_bytes((fewshot / "test" / "c0_0.png").read_bytes()[:60])  # truncated PNG
    write_manifest(tmp_path / "test.jsonl", [*records, Record(str(broken), 1, "class1", sha256_file(broken), True)])

    metrics = evaluate.run(tiny(), zero_shot, tmp_path / "test.jsonl", tmp_path / "eval")
    out = tmp_path / "eval"
    assert sorted(p.name for p in out.iterdir()) == [evaluate.CONFUSION, evaluate.METRICS]
    assert json.loads((out / evaluate.METRICS).read_text()) == metrics

    assert metrics["n"] == len(records) and metrics["rejected"] == 1
    assert "could not be loaded and are not scored" in caplog.text
    with open(out / evaluate.CONFUSION, newline="") as f:
        rows = list(csv.reader(f))
    slugs = ["class0", "class1", "class2"]
    assert rows[0][1:] == slugs and [r[0] for r in rows[1:]] == slugs
    confusion = np.array([[int(x) for x in r[1:]] for r in rows[1:]])
    assert confusion.sum() == metrics["n"]
    assert metrics["top1"] == pytest.approx(np.trace(confusion) / metrics["n"])
    assert metrics["top5_k"] == 3 and metrics["top5"] >= metrics["top1"]
    assert metrics["top5"] == 1.0  # k = C: the true class is always among the top C
    for i, slug in enumerate(slugs):
        assert confusion[i].sum() == metrics["per_class_n"][slug] == 6
        assert metrics["per_class"][slug] == pytest.approx(confusion[i, i] / confusion[i].sum())


def test_rerun_returns_the_same_metrics_without_rewriting(toy, zero_shot, tiny, tmp_path):
    fewshot, _ = toy
    first = evaluate.run(tiny(), zero_shot, fewshot / "test.jsonl", tmp_path / "eval")
    mtime = (tmp_path / "eval" / evaluate.METRICS).stat().st_mtime_ns
    assert evaluate.run(tiny(), zero_shot, fewshot / "test.jsonl", tmp_path / "eval") == first
    assert (tmp_path / "eval" / evaluate.METRICS).stat().st_mtime_ns == mtime


def test_predict_proba_on_pilcolour_images(toy, zero_shot, tiny):
    fewshot, _ = toy
    clf = evaluate.load_classifier(zero_shot, tiny().models, device="cpu")
    assert [c.slug for c in clf.classes] == ["class0", "class1", "class2"]
    assert clf.preprocess["image_size"] == 32
    images = [Image.open(r.path) for r in read_manifest(fewshot / "test.jsonl")[:4]]
    proba = clf.predict_proba(images)
    assert proba.shape == (4, 3)
    assert torch.allclose(proba.sum(-1), torch.ones(4), atol=1e-5)


def test_trained_classifier_beats_chance_on_held_outcolour_images(toy, tiny, tmp_path):
    fewshot, synthetic = toy
    config = tiny("classify.epochs=8", "classify.batch_size=16", "classify.train_on=synthetic+real")
    out = classify.run(config, fewshot, synthetic, tmp_path / "classifier")
    metrics = evaluate.run(config, out, fewshot / "test.jsonl", tmp_path / "eval")
    assert metrics["n"] == 18
    assert metrics["top1"] >= 0.75  # chance is 1/3; the colours are trivially separable


def test_missing_inputs_are_user_errors(toy, zero_shot, tiny, tmp_path):
    fewshot, _ = toy
    with pytest.raises(UserError, match=r"no classifier\.json"):
        evaluate.run(tiny(), tmp_path, fewshot / "test.jsonl", tmp_path / "eval")
    with pytest.raises(UserError, match="test manifest not found"):
        evaluate.run(tiny(), zero_shot, tmp_path / "nope.jsonl", tmp_path / "eval")
