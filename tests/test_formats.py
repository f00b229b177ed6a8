"""The paper's ten datasets in their download layouts (datadream/data/formats.py), on tiny fake trees."""

import json
import re
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from PIL import Image

from datadream.cli import main
from datadream.config import CONFIG_DIR, DataConfig, load_config
from datadream.data import formats
from datadream.data.manifest import read_classes, read_manifest
from datadream.errors import UserError


def _img(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value % 256, np.uint8)).save(path, format="JPEG")
    return path


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{ln}\n" for ln in lines))


def _scan(root: Path, fmt: str, domain: str = "", **kw):
    return formats.scan(root, DataConfig(format=fmt, domain=domain, **kw))


def _files(index, split: str) -> set[Path]:
    return {p for paths in index.splits[split].values() for p in paths}


def _check(index, n_classes: int, sizes: dict[str, int], test: set[Path] | None = None) -> None:
    assert len(index.classes) == n_classes
    assert [c.index for c in index.classes] == list(range(n_classes))
    assert {s: len(_files(index, s)) for s in ("train", "val", "test")} == sizes
    train, val, tst = (_files(index, s) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & tst) and not (val & tst)
    assert all(p.is_file() and p.is_relative_to(index.root) for p in train | val | tst)
    if test is not None:  # the test split is the dataset's own test split, nothing else
        assert tst == test


def _coop_json(root: Path, name: str, splits: dict[str, list[tuple[str, int, str]]]) -> None:
    (root / name).write_text(json.dumps({s: [list(e) for e in items] for s, items in splits.items()}))


# --- builders: the layouts as downloaded ------------------------------------------------------------


def _imagenet(root: Path, flat_val: bool = False) -> set[Path]:
    names = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great_white_shark"}
    test = set()
    for k, wnid in enumerate(names):
        for i in range(10):
            _img(root / "train" / wnid / f"{wnid}_{i}.JPEG", i)
        for i in range(2):
            name = f"ILSVRC2012_val_{k}{i}.JPEG"
            test.add(_img(root / "val" / name if flat_val else root / "val" / wnid / name))
    if flat_val:
        _write(root / "LOC_synset_mapping.txt", [f"{w} {n.replace('_', ' ')}, alias" for w, n in names.items()])
        _write(root / "LOC_val_solution.csv", ["ImageId,PredictionString"] + [
            f"ILSVRC2012_val_{k}{i},{w} 1 2 3 4" for k, w in enumerate(names) for i in range(2)])
    else:
        _write(root / "classnames.txt", [f"{w} {n}" for w, n in names.items()])
    return test


def _caltech(root: Path, coop: bool = False) -> set[Path]:
    cats = root / "101_ObjectCategories"
    for cls in ("accordion", "Faces", "BACKGROUND_Google", "Faces_easy"):
        for i in range(10):
            _img(cats / cls / f"image_{i:04d}.jpg", i)
    if not coop:
        return set()
    split = {"train": range(0, 5), "val": range(5, 7), "test": range(7, 10)}
    _coop_json(root, "split_zhou_Caltech101.json", {
        s: [(f"{c}/image_{i:04d}.jpg", lbl, n) for lbl, (c, n) in enumerate([("accordion", "accordion"),
                                                                         ("Faces", "face")]) for i in r]
        for s, r in split.items()})
    return {cats / c / f"image_{i:04d}.jpg" for c in ("accordion", "Faces") for i in range(7, 10)}


def _dtd(root: Path) -> set[Path]:
    for cls in ("banded", "zigzagged"):
        for i in range(6):
            _img(root / "images" / cls / f"{cls}_{i:04d}.jpg", i)
    for split, r in (("train", range(0, 2)), ("val", range(2, 4)), ("test", range(4, 6))):
        _write(root / "labels" / f"{split}1.txt", [f"{c}/{c}_{i:04d}.jpg" for c in ("banded", "zigzagged") for i in r])
    return {root / "images" / c / f"{c}_{i:04d}.jpg" for c in ("banded", "zigzagged") for i in range(4, 6)}


def _eurosat(root: Path, folder: str = "2750", coop: bool = False) -> set[Path]:
    for cls in ("AnnualCrop", "SeaLake"):
        for i in range(10):
            _img(root / folder / cls / f"{cls}_{i}.jpg", i)
    if not coop:
        return set()
    names = [("AnnualCrop", "Annual Crop Land"), ("SeaLake", "Sea or Lake")]
    split = {"train": range(0, 6), "val": range(6, 8), "test": range(8, 10)}
    _coop_json(root, "split_zhou_EuroSAT.json", {
        s: [(f"{c}/{c}_{i}.jpg", lbl, n) for lbl, (c, n) in enumerate(names) for i in r] for s, r in split.items()})
    return {root / folder / c / f"{c}_{i}.jpg" for c, _ in names for i in range(8, 10)}


def _aircraft(root: Path) -> set[Path]:
    data = root / "data"
    variants = ["707-320", "F/A-18", "Falcon 2000"]
    _write(data / "variants.txt", variants)
    test = set()
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        lines = []
        for k, v in enumerate(variants):
            for i in range(n):
                image_id = f"{split[:2]}{k}{i:04d}"
                p = _img(data / "images" / f"{image_id}.jpg", i)
                lines.append(f"{image_id} {v}")
                if split == "test":
                    test.add(p)
        _write(data / f"images_variant_{split}.txt", lines)
    return test


def _food(root: Path, as_json: bool = True) -> set[Path]:
    classes = ["apple_pie", "baby_back_ribs"]
    _write(root / "meta" / "classes.txt", classes)
    _write(root / "meta" / "labels.txt", ["Apple pie", "Baby back ribs"])
    test = set()
    for split, r in (("train", range(0, 8)), ("test", range(8, 11))):
        ids = {c: [f"{c}/{100 + i}" for i in r] for c in classes}
        for c in classes:
            for image_id in ids[c]:
                p = _img(root / "images" / f"{image_id}.jpg")
                if split == "test":
                    test.add(p)
        if as_json:
            (root / "meta" / f"{split}.json").write_text(json.dumps(ids))
        else:
            _write(root / "meta" / f"{split}.txt", [i for v in ids.values() for i in v])
    return test


def _flowers(root: Path, coop: bool = False) -> set[Path]:
    # 2 classes × (4 train + 2 val + 2 test) = 16 images, ids 1..16; class = (id - 1) % 2 + 1
    for i in range(1, 17):
        _img(root / "jpg" / f"image_{i:05d}.jpg", i * 9)
    label = {i: (i - 1) % 2 + 1 for i in range(1, 17)}
    split = {"train": range(1, 9), "val": range(9, 13), "test": range(13, 17)}
    names = {"1": "pink primrose", "2": "hard-leaved pocket orchid"}
    if coop:
        _coop_json(root, "split_zhou_OxfordFlowers.json", {
            s: [(f"image_{i:05d}.jpg", label[i] - 1, names[str(label[i])]) for i in r] for s, r in split.items()})
    else:
        import scipy.io

        (root / "cat_to_name.json").write_text(json.dumps(names))
        scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([[label[i] for i in range(1, 17)]])})
        scipy.io.savemat(root / "setid.mat", {"trnid": np.array([list(split["train"])]),
                                              "valid": np.array([list(split["val"])]),
                                              "tstid": np.array([list(split["test"])])})
    return {root / "jpg" / f"image_{i:05d}.jpg" for i in split["test"]}


def _pets(root: Path) -> set[Path]:
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2)]
    test = set()
    for split, fname, r in (("train", "trainval.txt", range(1, 9)), ("test", "test.txt", range(9, 12))):
        lines = ["#Image CLASS-ID SPECIES BREED ID"]
        for name, cid, species in breeds:
            for i in r:
                p = _img(root / "images" / f"{name}_{i}.jpg", i)
                lines.append(f"{name}_{i} {cid} {species} {cid}")
                if split == "test":
                    test.add(p)
        _write(root / "annotations" / fname, lines)
    return test


def _cars(root: Path, coop: bool = False) -> set[Path]:
    names = ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012"]
    files = {"train": [f"{i:05d}.jpg" for i in range(1, 17)], "test": [f"{i:05d}.jpg" for i in range(1, 7)]}
    for split, fs in files.items():
        for i, f in enumerate(fs):
            _img(root / f"cars_{split}" / f, i)
    label = lambda i: i % 2  # noqa: E731
    if coop:
        coop_names = ["2000 AM General Hummer SUV", "2012 Ram C/V Cargo Van Minivan"]
        train = [(f"cars_train/{f}", label(i), coop_names[label(i)]) for i, f in enumerate(files["train"])]
        _coop_json(root, "split_zhou_StanfordCars.json", {
            "train": train[:14], "val": train[14:],
            "test": [(f"cars_test/{f}", label(i), coop_names[label(i)]) for i, f in enumerate(files["test"])]})
    else:
        import scipy.io

        meta = np.empty((1, 2), dtype=object)
        meta[0, :] = names
        (root / "devkit").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": meta})
        for split, dest in (("train", root / "devkit" / "cars_train_annos.mat"),
                            ("test", root / "cars_test_annos_withlabels.mat")):
            annos = np.zeros((1, len(files[split])), dtype=[("bbox_x1", "O"), ("class", "O"), ("fname", "O")])
            for i, f in enumerate(files[split]):
                annos[0, i] = (np.array([[1]]), np.array([[label(i) + 1]], np.uint8), np.array([f]))
            scipy.io.savemat(dest, {"annotations": annos})
    return {root / "cars_test" / f for f in files["test"]}


def _sun(root: Path) -> set[Path]:
    keys = ["/a/abbey", "/b/balcony/exterior", "/a/airport_terminal"]
    _write(root / "SUN397" / "ClassName.txt", keys)
    test, train_lines, test_lines = set(), [], []
    for k in keys:
        for i in range(8):
            rel = f"{k}/sun_{k.count('/')}{i:03d}.jpg"
            p = _img(root / "SUN397" / rel.lstrip("/"), i)
            (test_lines if i >= 6 else train_lines).append(rel)
            if i >= 6:
                test.add(p)
    _img(root / "SUN397" / "a" / "abbey" / "sun_unlisted.jpg")  # in no partition: not used at all
    _write(root / "Partitions" / "Training_01.txt", train_lines)
    _write(root / "Partitions" / "Testing_01.txt", test_lines)
    return test


# --- one test per dataset ---------------------------------------------------------------------------


@pytest.mark.parametrize("flat_val", [False, True])
def test_imagenet(tmp_path, flat_val):
    test = _imagenet(tmp_path, flat_val)
    index = _scan(tmp_path, "imagenet")
    _check(index, 3, {"train": 27, "val": 3, "test": 6}, test)
    assert index.carved == ["val"]  # val from train; test = the official val set
    assert [c.slug for c in index.classes] == ["n01440764", "n01443537", "n01484850"]
    assert index.classes[2].name == "great white shark"


def test_caltech101_folders_and_coop(tmp_path):
    _caltech(tmp_path / "a")
    index = _scan(tmp_path / "a", "caltech101")
    assert [(c.slug, c.name) for c in index.classes] == [("faces", "face"), ("accordion", "accordion")]
    _check(index, 2, {"train": 14, "val": 2, "test": 4})
    assert index.carved == ["test", "val"]  # no official split: carved with data.split_seed
    assert _files(index, "test") == _files(_scan(tmp_path / "a", "caltech101"), "test")
    test = _caltech(tmp_path / "b", coop=True)
    index = _scan(tmp_path / "b", "caltech101")
    _check(index, 2, {"train": 10, "val": 4, "test": 6}, test)
    assert index.carved == [] and [c.name for c in index.classes] == ["accordion", "face"]


def test_dtd(tmp_path):
    test = _dtd(tmp_path)
    index = _scan(tmp_path, "dtd", domain="texture")
    _check(index, 2, {"train": 4, "val": 4, "test": 4}, test)
    assert index.carved == []
    config = load_config("paper", [CONFIG_DIR / "paper" / "dtd.yaml"])
    assert config.data.prompt(index.classes[1].name) == "a texture photo of a zigzagged"


@pytest.mark.parametrize("folder", ["2750", "EuroSAT_RGB"])
def test_eurosat(tmp_path, folder):
    _eurosat(tmp_path / "a", folder)
    index = _scan(tmp_path / "a", "eurosat")
    assert [c.name for c in index.classes] == ["Annual Crop Land", "Sea or Lake"]
    _check(index, 2, {"train": 14, "val": 2, "test": 4})
    test = _eurosat(tmp_path / "b", folder, coop=True)
    index = _scan(tmp_path / "b", "eurosat", domain="satellite")
    _check(index, 2, {"train": 12, "val": 4, "test": 4}, test)
    assert DataConfig(domain="satellite").prompt(index.classes[1].name) == "a satellite photo of a Sea or Lake"


def test_fgvc_aircraft(tmp_path):
    test = _aircraft(tmp_path)
    for root in (tmp_path, tmp_path / "data"):  # fgvc-aircraft-2013b/ or its data/ folder
        index = _scan(root, "fgvc_aircraft")
        _check(index, 3, {"train": 9, "val": 6, "test": 6}, test)
    assert [(c.slug, c.name) for c in index.classes] == [
        ("707-320", "707-320"), ("f_a-18", "F/A-18"), ("falcon_2000", "Falcon 2000")]
    assert DataConfig(domain="aircraft").prompt("F/A-18") == "a aircraft photo of a F/A-18"


@pytest.mark.parametrize("as_json", [True, False])
def test_food101(tmp_path, as_json):
    test = _food(tmp_path, as_json)
    index = _scan(tmp_path, "food101")
    _check(index, 2, {"train": 14, "val": 2, "test": 6}, test)
    assert index.carved == ["val"]  # Food-101 has no val split: carved from train only
    assert [(c.slug, c.name) for c in index.classes] == [("apple_pie", "Apple pie"),
                                                         ("baby_back_ribs", "Baby back ribs")]


@pytest.mark.parametrize("coop", [True, False])
def test_flowers102(tmp_path, coop):
    if not coop:
        pytest.importorskip("scipy")
    test = _flowers(tmp_path, coop)
    index = _scan(tmp_path, "flowers102", domain="flower")
    _check(index, 2, {"train": 8, "val": 4, "test": 4}, test)
    assert [c.name for c in index.classes] == ["pink primrose", "hard-leaved pocket orchid"]
    assert DataConfig(domain="flower").prompt(index.classes[0].name) == "a flower photo of a pink primrose"


def test_oxford_pets(tmp_path):
    test = _pets(tmp_path)
    index = _scan(tmp_path, "oxford_pets")
    _check(index, 2, {"train": 14, "val": 2, "test": 6}, test)
    assert [c.name for c in index.classes] == ["abyssinian", "american bulldog"]


@pytest.mark.parametrize("coop", [True, False])
def test_stanford_cars(tmp_path, coop):
    if not coop:
        pytest.importorskip("scipy")
    test = _cars(tmp_path, coop)
    index = _scan(tmp_path, "stanford_cars")
    _check(index, 2, {"train": 14, "val": 2, "test": 6}, test)
    assert [c.name for c in index.classes] == ["2000 AM General Hummer SUV", "2012 Ram C/V Cargo Van Minivan"]
    assert "/" not in index.classes[1].slug


def test_sun397(tmp_path):
    test = _sun(tmp_path)
    index = _scan(tmp_path, "sun397", domain="scene")
    _check(index, 3, {"train": 15, "val": 3, "test": 6}, test)
    assert [c.name for c in index.classes] == ["abbey", "exterior balcony", "airport terminal"]
    assert index.classes[1].slug == "balcony_exterior"


def test_imagefolder_is_the_default(tmp_path):
    for cls in ("x", "y"):
        for i in range(10):
            _img(tmp_path / cls / f"{i}.jpg")
    assert DataConfig().format == "imagefolder"
    _check(formats.scan(tmp_path, DataConfig()), 2, {"train": 14, "val": 2, "test": 4})


# --- errors ------------------------------------------------------------------------------------------


def test_missing_split_file(tmp_path):
    _dtd(tmp_path)
    (tmp_path / "labels" / "test1.txt").unlink()
    with pytest.raises(UserError, match=re.escape("test1.txt: split file not found")):
        _scan(tmp_path, "dtd")


def test_split_file_naming_a_missing_image(tmp_path):
    _dtd(tmp_path)
    (tmp_path / "images" / "banded" / "banded_0005.jpg").unlink()
    with pytest.raises(UserError, match=r"test split names a missing image .*banded_0005\.jpg"):
        _scan(tmp_path, "dtd")
    _flowers(tmp_path / "f", coop=True)
    (tmp_path / "f" / "jpg" / "image_00003.jpg").unlink()
    with pytest.raises(UserError, match=re.escape("train split names a missing image 'image_00003.jpg'")):
        _scan(tmp_path / "f", "flowers102")


def test_bad_coop_split_file(tmp_path):
    _flowers(tmp_path, coop=True)
    path = tmp_path / "split_zhou_OxfordFlowers.json"
    doc = json.loads(path.read_text())
    doc["train"][0] = ["../../etc/passwd", 0, "pink primrose"]
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="leaves the dataset folder"):
        _scan(tmp_path, "flowers102")
    doc["train"][0] = ["image_00001.jpg", 0]
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"train\[0\] is not \[relpath, label, classname\]"):
        _scan(tmp_path, "flowers102")


def test_wrong_layout_and_unknown_format(tmp_path):
    _dtd(tmp_path)
    with pytest.raises(UserError, match="Flowers102 jpg/ folder not found"):
        _scan(tmp_path, "flowers102")
    with pytest.raises(UserError, match=re.escape("neither split_zhou_StanfordCars.json nor devkit/cars_meta.mat")):
        _scan(tmp_path, "stanford_cars")
    with pytest.raises(UserError, match=re.escape("config key 'data.format'")):
        load_config("paper", overrides=["data.format=mnist"])
    with pytest.raises(UserError, match="unknown dataset format"):
        formats.scan(tmp_path, DataConfig.model_construct(format="mnist", domain=""))
    with pytest.raises(UserError, match="folder not found"):
        _scan(tmp_path / "nope", "dtd")


def test_flowers_mat_without_names(tmp_path):
    pytest.importorskip("scipy")
    _flowers(tmp_path)
    (tmp_path / "cat_to_name.json").unlink()
    with pytest.raises(UserError, match=re.escape("cat_to_name.json: not found")):
        _scan(tmp_path, "flowers102")


def test_sun397_without_partitions(tmp_path):
    _sun(tmp_path)
    (tmp_path / "Partitions" / "Testing_01.txt").unlink()
    with pytest.raises(UserError, match=re.escape("Testing_01.txt: not found")):
        _scan(tmp_path, "sun397")


# --- configs and CLI -----------------------------------------------------------------------------------


def test_formats_match_the_config_literal():
    assert set(get_args(DataConfig.model_fields["format"].annotation)) == set(formats.FORMATS)
    assert set(formats.DOMAINS) == set(formats.FORMATS)


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_dataset_configs_load(path):
    config = load_config("paper", [path])
    assert config.data.format == path.stem
    assert config.data.domain == formats.DOMAINS[path.stem]
    assert (config.fewshot.shots, config.adapt.mode) == (16, "class")
    assert "adapt.mode=dataset" in path.read_text()
    assert load_config("paper", [path], ["adapt.mode=dataset"]).adapt.mode == "dataset"


def test_paper_dataset_configs_cover_the_ten():
    assert {p.stem for p in (CONFIG_DIR / "paper").glob("*.yaml")} == set(formats.FORMATS) - {"imagefolder"}


def test_cli_fewshot_with_dataset_format(tmp_path):
    _flowers(tmp_path / "flowers", coop=True)
    out = tmp_path / "fs"
    assert main(["-q", "fewshot", "--dataset", str(tmp_path / "flowers"), "--dataset-format", "flowers102",
                 "--preset", "tiny", "--set", "data.domain=flower", "--out", str(out)]) == 0
    assert [c.name for c in read_classes(out / "classes.json")] == ["pink primrose", "hard-leaved pocket orchid"]
    assert len(read_manifest(out / "train.jsonl")) == 8  # tiny: 4 shots × 2 classes
    test = read_manifest(out / "test.jsonl")
    assert sorted(Path(r.path).name for r in test) == [f"image_{i:05d}.jpg" for i in range(13, 17)]
    summary = json.loads((out / "fewshot.json").read_text())
    assert summary["carved_splits"] == [] and summary["counts"] == {"train": 8, "val": 4, "test": 4}
    # the wrong format is a one-line error (exit 2), not a traceback
    assert main(["-q", "fewshot", "--dataset", str(tmp_path / "flowers"), "--dataset-format", "dtd",
                 "--preset", "tiny", "--out", str(tmp_path / "o2")]) == 2
