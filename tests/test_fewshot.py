import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datadream.data.manifest import read_classes, read_manifest
from datadream.errors import UserError
from datadream.stages import fewshot


def _png(path: Path, value: int = 128, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def _flat_dataset(root: Path, per_class: dict[str, int]) -> Path:
    for cls, n in per_class.items():
        for i in range(n):
            _png(root / cls / f"{i:03d}.png", (i * 7) % 255)
    return root


def test_manifests_and_classes(fewshot_set: Path, tiny):
    shots = tiny().fewshot.shots
    classes = read_classes(fewshot_set / "classes.json")
    train = read_manifest(fewshot_set / "train.jsonl")
    test = read_manifest(fewshot_set / "test.jsonl")
    val = read_manifest(fewshot_set / "val.jsonl")
    assert len(classes) == 6
    assert all(sum(r.cls == c.slug for r in train) == shots for c in classes)
    assert all(r.is_real and Path(r.path).is_file() for r in train)
    # Shots are copies inside the folder (self-contained), stored with relative paths.
    assert all(Path(r.path).is_relative_to(fewshot_set.resolve()) for r in train)
    assert '"path": "train/' in (fewshot_set / "train.jsonl").read_text()
    # Splits never mix: the shots come from train, val and test stay apart.
    sources = {r.extra["source"] for r in train}
    assert sources.isdisjoint({r.path for r in test}) and sources.isdisjoint({r.path for r in val})
    assert all("/test/" in r.path for r in test) and all("/val/" in r.path for r in val)
    summary = json.loads((fewshot_set / "fewshot.json").read_text())
    assert summary["counts"]["train"] == 6 * shots and summary["rejected"]["total"] == 0


def test_seeded_and_seed_sensitive(tmp_path, demo_dataset, tiny, fewshot_set):
    again = fewshot.run(tiny(), demo_dataset, tmp_path / "again")
    other = fewshot.run(tiny("fewshot.seed=5"), demo_dataset, tmp_path / "other")
    names = lambda d: sorted(r.extra["source"] for r in read_manifest(d / "train.jsonl"))  # noqa: E731
    assert names(again) == names(fewshot_set)
    assert names(other) != names(fewshot_set)
    # The test split does not depend on the few-shot seed.
    assert (other / "test.jsonl").read_text() == (fewshot_set / "test.jsonl").read_text()


def test_rerun_is_noop_and_foreign_out_is_refused(tmp_path, demo_dataset, tiny):
    out = fewshot.run(tiny(), demo_dataset, tmp_path / "fs")
    before = (out / "fewshot.json").stat().st_mtime_ns
    fewshot.run(tiny(), demo_dataset, out)
    assert (out / "fewshot.json").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="different inputs"):
        fewshot.run(tiny("fewshot.shots=2"), demo_dataset, out)


def test_flat_folder_carves_val_and_test(tmp_path, tiny):
    root = _flat_dataset(tmp_path / "flat", {"cat": 20, "dog": 20})
    (root / "classnames.json").write_text(json.dumps({"cat": "tabby cat"}))
    out = fewshot.run(tiny("fewshot.shots=3"), root, tmp_path / "fs")
    classes = read_classes(out / "classes.json")
    assert [(c.slug, c.name) for c in classes] == [("cat", "tabby cat"), ("dog", "dog")]
    counts = json.loads((out / "fewshot.json").read_text())["counts"]
    assert counts == {"train": 6, "val": 4, "test": 8}
    assert set(json.loads((out / "fewshot.json").read_text())["carved_splits"]) == {"val", "test"}


def test_empty_dataset_is_one_clear_error(tmp_path, tiny):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders found") as e:
        fewshot.run(tiny(), tmp_path / "empty", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="folder not found"):
        fewshot.run(tiny(), tmp_path / "nope", tmp_path / "out")


def test_too_few_usable_images_names_class_and_counts(tmp_path, tiny):
    root = _flat_dataset(tmp_path / "ds", {"cat": 12, "dog": 12})
    # Corrupt most of dog's train candidates: a truncated PNG and random bytes with a .jpg name.
    for p in sorted((root / "dog").glob("*.png"))[:10]:
        p.write_bytes(p.read_bytes()[:40])
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "fake.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(UserError) as e:
        fewshot.run(tiny("fewshot.shots=4", "data.test_fraction=0", "data.val_fraction=0"), root, tmp_path / "out")
    msg = str(e.value)
    assert "class 'dog'" in msg and "2 usable" in msg and "rejected" in msg and "shots=4" in msg
    assert not (tmp_path / "out").exists(), "a failed run must leave no partial artifact"


def test_bad_images_are_rejected_and_counted(tmp_path, tiny):
    root = tmp_path / "ds"
    _flat_dataset(root / "train", {"cat": 6, "dog": 6})
    _flat_dataset(root / "test", {"cat": 3, "dog": 3})
    bad = root / "test" / "cat" / "000.png"
    bad.write_bytes(bad.read_bytes()[:40])
    out = fewshot.run(tiny("fewshot.shots=2"), root, tmp_path / "out")
    test = read_manifest(out / "test.jsonl")
    assert len(test) == 5 and str(bad.resolve()) not in {r.path for r in test}
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert rejected == [{"path": str(bad), "reason": rejected[0]["reason"]}] and rejected[0]["reason"]
    assert json.loads((out / "fewshot.json").read_text())["rejected"]["total"] == 1
