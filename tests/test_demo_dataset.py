"""The procedural demo dataset: layout, determinism, idempotence, and that its classes are learnable."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from datadream.data import demo
from datadream.data.demo import DEFAULT_PER_SPLIT, DEMO_CLASSES, make_demo_dataset
from datadream.data.images import load_rgb
from datadream.errors import UserError
from datadream.io import sha256_file

SMALL = {"train": 3, "val": 1, "test": 2}


def _hashes(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "shapes", seed=0)


def test_classes():
    slugs = [s for s, _ in DEMO_CLASSES]
    assert len(slugs) == 6 == len(set(slugs))
    assert {"circle", "square", "triangle", "cross", "checkerboard"} <= set(slugs)
    assert all(s.isidentifier() for s in slugs)


def test_layout_and_counts(default_root):
    root = default_root
    assert DEFAULT_PER_SPLIT == {"train": 24, "val": 8, "test": 16}
    assert sorted(p.name for p in root.iterdir()) == ["classnames.json", "demo.json", "test", "train", "val"]
    for split, count in DEFAULT_PER_SPLIT.items():
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(s for s, _ in DEMO_CLASSES)
        for slug, _ in DEMO_CLASSES:
            files = sorted(p.name for p in (root / split / slug).iterdir())
            assert files == [f"{slug}_{i:04d}.png" for i in range(count)]


def test_classnames_and_marker(default_root):
    names = json.loads((default_root / "classnames.json").read_text())
    assert names == dict(DEMO_CLASSES)
    assert names["hstripes"] == "horizontal stripes"
    marker = json.loads((default_root / "demo.json").read_text())
    assert marker["seed"] == 0 and marker["size"] == 64 and marker["per_split"] == DEFAULT_PER_SPLIT


def test_images_are_64px_rgb_png_and_pass_the_strict_loader(default_root):
    for path in list((default_root / "train").rglob("*.png"))[::7]:
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (64, 64))
        load_rgb(path)


def test_images_vary_and_have_noise(default_root):
    arrays = [np.asarray(Image.open(p)) for p in sorted((default_root / "train" / "circle").glob("*.png"))]
    assert len({a.tobytes() for a in arrays}) == len(arrays)
    corners = np.array([a[:4, :4].reshape(-1, 3).mean(0) for a in arrays])
    assert corners.std(0).min() > 20  # background colour differs from image to image
    assert all(a[:6, :6].std() > 0.5 for a in arrays)  # a flat background would mean no noise


def test_same_seed_is_byte_identical(tmp_path, default_root):
    again = make_demo_dataset(tmp_path / "again", seed=0)
    assert _hashes(again) == _hashes(default_root)


def test_other_seed_differs(tmp_path):
    a = _hashes(make_demo_dataset(tmp_path / "a", seed=1, per_split=SMALL))
    b = _hashes(make_demo_dataset(tmp_path / "b", seed=2, per_split=SMALL))
    pngs = [k for k in a if k.endswith(".png")]
    assert len(pngs) == 6 * 6
    assert all(a[k] != b[k] for k in pngs)
    assert a["classnames.json"] == b["classnames.json"]


def test_image_streams_do_not_depend_on_other_counts(tmp_path):
    a = _hashes(make_demo_dataset(tmp_path / "a", seed=5, per_split={"train": 2, "test": 1}))
    b = _hashes(make_demo_dataset(tmp_path / "b", seed=5, per_split={"train": 4}))
    assert a["train/cross/cross_0001.png"] == b["train/cross/cross_0001.png"]
    assert "test" not in {k.split("/")[0] for k in b}


def test_second_call_does_no_work(tmp_path, monkeypatch):
    root = make_demo_dataset(tmp_path / "d", seed=3, per_split=SMALL)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def boom(*a, **k):
        raise AssertionError("regenerated an existing dataset")

    monkeypatch.setattr(demo, "_write", boom)
    assert make_demo_dataset(tmp_path / "d", seed=3, per_split=dict(reversed(SMALL.items()))) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_different_parameters_are_refused(tmp_path):
    root = make_demo_dataset(tmp_path / "d", seed=3, per_split=SMALL)
    with pytest.raises(UserError, match="other parameters"):
        make_demo_dataset(root, seed=4, per_split=SMALL)
    with pytest.raises(UserError, match="other parameters"):
        make_demo_dataset(root, seed=3, size=32, per_split=SMALL)


def test_foreign_folder_is_refused_but_empty_one_is_used(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not a demo dataset"):
        make_demo_dataset(tmp_path / "busy", per_split=SMALL)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"

    (tmp_path / "empty").mkdir()
    root = make_demo_dataset(tmp_path / "empty", per_split=SMALL)
    assert (root / "classnames.json").is_file()


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_done(out, params):
        (out / "train").mkdir()
        raise RuntimeError("killed")

    monkeypatch.setattr(demo, "_write", half_done)
    with pytest.raises(RuntimeError):
        make_demo_dataset(tmp_path / "d", per_split=SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [
    {"seed": -1}, {"seed": 1.5}, {"size": 8}, {"per_split": {}}, {"per_split": {"../x": 1}},
    {"per_split": {"train": -1}}, {"per_split": {"train": "3"}},
])
def test_bad_parameters(tmp_path, kwargs):
    with pytest.raises(UserError):
        make_demo_dataset(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()


def test_other_size(tmp_path):
    root = make_demo_dataset(tmp_path / "d", size=32, per_split={"train": 1})
    with Image.open(root / "train" / "square" / "square_0000.png") as img:
        assert img.size == (32, 32)


def _features(root, split):
    xs, ys = [], []
    for label, (slug, _) in enumerate(DEMO_CLASSES):
        for p in sorted((root / split / slug).glob("*.png")):
            xs.append(np.asarray(Image.open(p), np.float32))
            ys.append(label)
    return np.stack(xs), np.array(ys)


def _knn_accuracy(train_x, train_y, test_x, test_y, k=5) -> float:
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    nearest = np.argsort(((b[:, None] - a[None]) ** 2).sum(-1), axis=1)[:, :k]
    pred = np.array([np.bincount(train_y[i], minlength=len(DEMO_CLASSES)).argmax() for i in nearest])
    return float((pred == test_y).mean())


def _edge_orientations(x: np.ndarray) -> np.ndarray:
    """Colour-blind shape cue: histogram of gradient orientations on contrast-normalised grey."""
    g = x.mean(-1)
    g = (g - g.mean((1, 2), keepdims=True)) / (g.std((1, 2), keepdims=True) + 1e-6)
    gy, gx = np.gradient(g, axis=(1, 2))
    mag = np.hypot(gx, gy)
    bins = (np.mod(np.arctan2(gy, gx), np.pi) / np.pi * 12).astype(int) % 12
    hist = np.stack([np.bincount(b.ravel(), m.ravel(), minlength=12) for b, m in zip(bins, mag, strict=True)])
    hist /= hist.sum(1, keepdims=True)
    # Raw bins tell stripes' direction; sorted bins are rotation-free; mean edge strength tells busy textures.
    return np.concatenate([hist, np.sort(hist, 1), np.log(mag.mean((1, 2)))[:, None]], 1)


def test_both_hue_and_shape_carry_the_class(default_root):
    train_x, train_y = _features(default_root, "train")
    test_x, test_y = _features(default_root, "test")
    chance = 1 / len(DEMO_CLASSES)
    # The most saturated pixels are foreground: their mean colour tells the class's hue.
    colour = _knn_accuracy(_saturated_colour(train_x), train_y, _saturated_colour(test_x), test_y)
    shape = _knn_accuracy(_edge_orientations(train_x), train_y, _edge_orientations(test_x), test_y)
    assert colour > chance + 0.4
    assert shape > chance + 0.3


def _saturated_colour(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1, 3).astype(np.float32)
    sat = flat.max(-1) - flat.min(-1)
    top = np.argsort(sat, axis=1)[:, -flat.shape[1] // 10 :]
    return np.take_along_axis(flat, top[..., None], axis=1).mean(1)
