"""The paper's ten datasets in the layouts they are downloaded in, plus plain ImageFolder.

`scan(dataset, config.data)` dispatches on `config.data.format` and returns the same `DatasetIndex` as
`scan_imagefolder`. Every path lies under the folder given, so fewshot can mirror an s3:// dataset
and scan the local copy.

Splits (docs/method.md, Stage 0: the paper used the CoOp splits). Where CoOp publishes a
`split_zhou_<Name>.json` ({"train"|"val"|"test": [[relpath, label, classname], ...]}) and it lies in
the dataset folder, it is used; otherwise the dataset's official split files are. The test split is
always the dataset's own test split (docs/method.md, Stage 3: the reference code evaluated some
datasets on train). Val is carved out of train with `data.split_seed` only where no val split exists.
Caltech101 and EuroSAT have no official split at all: without the CoOp file their test (and val)
are carved with `data.split_seed` like an ImageFolder without splits, and `carved` says so.

Accepted layouts (the folder passed as --dataset):
  imagenet       train/<wnid>/*.JPEG; val/<wnid>/*.JPEG (class folders, as valprep.sh leaves them) or
                 flat val/*.JPEG + LOC_val_solution.csv; names: classnames.txt ("<wnid> <name>", CoOp)
                 or LOC_synset_mapping.txt ("<wnid> <name>, <alias>…"). Test = the official val set.
  caltech101     101_ObjectCategories/<class>/*.jpg (BACKGROUND_Google, Faces_easy dropped, as CoOp)
                 [+ split_zhou_Caltech101.json]
  dtd            images/<class>/*.jpg + labels/{train,val,test}1.txt (fold 1)
                 [or split_zhou_DescribableTextures.json]
  eurosat        2750/<class>/*.jpg or EuroSAT_RGB/<class>/*.jpg [+ split_zhou_EuroSAT.json]
  fgvc_aircraft  data/images/*.jpg + data/images_variant_{train,val,test}.txt + data/variants.txt
                 (the fgvc-aircraft-2013b folder, or its data/ folder)
  food101        images/<class>/*.jpg + meta/{train,test}.json or .txt [+ meta/labels.txt]
                 [or split_zhou_Food101.json]
  flowers102     jpg/image_XXXXX.jpg + split_zhou_OxfordFlowers.json, or + imagelabels.mat + setid.mat
                 + cat_to_name.json (the .mat files need scipy)
  oxford_pets    images/*.jpg + annotations/{trainval,test}.txt [or split_zhou_OxfordPets.json]
  stanford_cars  cars_train/, cars_test/ + split_zhou_StanfordCars.json, or + devkit/cars_meta.mat,
                 devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat (root or devkit/; scipy)
  sun397         SUN397/<l>/<class>/…/*.jpg + ClassName.txt + Training_01.txt, Testing_01.txt (in the
                 root, SUN397/ or Partitions/) [or split_zhou_SUN397.json]; the root may be SUN397/ itself

Display names are human-readable (underscores become spaces; CoOp's class names where CoOp renames).
`DOMAINS` holds each dataset's domain word (docs/method.md, Datasets); it is not applied implicitly:
datadream/presets/paper/<dataset>.yaml sets data.format and data.domain together.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from datadream.config import DataConfig
from datadream.data.imagefolder import SPLITS, DatasetIndex, carve_splits, scan_imagefolder
from datadream.data.images import IMAGE_SUFFIXES
from datadream.data.manifest import ClassInfo, control_characters, slugify
from datadream.errors import UserError
from datadream.io import read_json

log = logging.getLogger(__name__)

# Domain word per dataset (docs/method.md, Datasets); "" = none.
DOMAINS: dict[str, str] = {
    "imagefolder": "", "imagenet": "", "caltech101": "", "dtd": "texture", "eurosat": "satellite",
    "fgvc_aircraft": "aircraft", "food101": "food", "flowers102": "flower", "oxford_pets": "pet",
    "stanford_cars": "car", "sun397": "scene",
}
# CoOp's split file per dataset (docs/method.md, Stage 0).
COOP_SPLITS: dict[str, str] = {
    "caltech101": "split_zhou_Caltech101.json", "dtd": "split_zhou_DescribableTextures.json",
    "eurosat": "split_zhou_EuroSAT.json", "food101": "split_zhou_Food101.json",
    "flowers102": "split_zhou_OxfordFlowers.json", "oxford_pets": "split_zhou_OxfordPets.json",
    "stanford_cars": "split_zhou_StanfordCars.json", "sun397": "split_zhou_SUN397.json",
}
# CoOp's EuroSAT class names (its split file uses them too).
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}
CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}

Entries = dict[str, list[tuple[Path, int]]]  # split -> [(image path under root, label)]


def _display(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path) -> tuple[list[Path], int]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, len(files) - len(images)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    return path


def _lines(path: Path) -> list[str]:
    _need(path, "split file")
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def _first(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def _loadmat(path: Path) -> dict:
    _need(path, ".mat file")
    try:
        import scipy.io
    except ImportError:
        raise UserError(f"{path}: reading .mat files needs scipy (pip install scipy), or use CoOp's "
                        "split_zhou_*.json") from None
    try:
        return scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises several types for a corrupt file
        raise UserError(f"{path}: not a readable .mat file ({type(e).__name__}: {e})") from None


def _mat_key(mat: dict, key: str, path: Path):
    if key not in mat:
        raise UserError(f"{path}: no variable {key!r} (found {sorted(k for k in mat if not k.startswith('__'))})")
    return mat[key]


def _scalar(x):
    """Unwrap the 1×1 arrays scipy.io.loadmat nests values in."""
    while hasattr(x, "shape") and getattr(x, "size", 0) == 1 and x.shape != ():
        x = x.ravel()[0]
    return x.item() if hasattr(x, "item") else x


def _build(root: Path, names: list[tuple[str, str]], entries: Entries, data: DataConfig, source: str, *,
           check: bool = True, carve_test: bool = False, ignored: int = 0) -> DatasetIndex:
    """An index from classes [(slug source, display name)] by label and per-split (path, label) lists."""
    classes, used = [], set()
    for i, (key, name) in enumerate(names):
        if control_characters(name) or control_characters(key):
            raise UserError(f"{source}: class {key!r} ({name!r}) has a control character in its name; fix the "
                            "class-name file")
        slug = slugify(key)
        if slug in used:  # e.g. two display names that differ only in '/' vs ' '
            slug = f"{slug}-{i}"
        used.add(slug)
        classes.append(ClassInfo(i, slug, name))
    if "test" not in entries and not carve_test:
        raise UserError(f"{source}: no test split")
    splits: dict[str, dict[str, list[Path]]] = {}
    for split, items in entries.items():
        per: dict[str, list[Path]] = {c.slug: [] for c in classes}
        for path, label in items:
            if not 0 <= label < len(classes):
                raise UserError(f"{source}: {split} entry {path.name!r} has label {label}, "
                                f"outside 0..{len(classes) - 1}")
            if check and not path.is_file():
                raise UserError(f"{source}: {split} split names a missing image {path}")
            per[classes[label].slug].append(path)
        splits[split] = {k: sorted(set(v)) for k, v in per.items()}
    if not any(splits.get("train", {}).values()):
        raise UserError(f"{source}: the train split is empty")
    carved = carve_splits(splits, classes, data)
    return DatasetIndex(root, classes, {s: splits[s] for s in SPLITS}, ignored, carved)


def _under(root: Path, *parts: str) -> Path:
    """root/parts…, refusing paths that climb out of root (a split file is input, not trusted)."""
    rel = os.path.normpath(os.path.join(*parts))
    if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
        raise UserError(f"{root}: split file path {os.path.join(*parts)!r} leaves the dataset folder")
    return root / rel


def _coop(root: Path, split_file: Path, image_dir: Path, data: DataConfig) -> DatasetIndex:
    """CoOp's split_zhou_<Name>.json: {split: [[relpath (to the image folder), label, classname], …]}."""
    doc = read_json(split_file)
    if not isinstance(doc, dict) or not {"train", "test"} <= set(doc):
        raise UserError(f"{split_file}: expected an object with 'train', 'val' and 'test' lists")
    names: dict[int, str] = {}
    entries: Entries = {}
    for split in SPLITS:
        if split not in doc:
            continue
        items = doc[split]
        if not isinstance(items, list):
            raise UserError(f"{split_file}: {split!r} is not a list")
        out = entries[split] = []
        for n, item in enumerate(items):
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                    and isinstance(item[1], int) and isinstance(item[2], str)):
                raise UserError(f"{split_file}: {split}[{n}] is not [relpath, label, classname]")
            rel, label, cname = item
            if names.setdefault(label, cname) != cname:
                raise UserError(f"{split_file}: label {label} is named both {names[label]!r} and {cname!r}")
            path = _under(image_dir, rel)
            if not path.is_file() and image_dir != root:
                path = _under(root, rel) if _under(root, rel).is_file() else path
            if not path.is_file():
                raise UserError(f"{split_file}: {split} split names a missing image {rel!r} (looked in {image_dir})")
            out.append((path, label))
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{split_file}: labels are not 0..{len(names) - 1}")
    classes = [(names[i], _display(names[i])) for i in range(len(names))]
    return _build(root, classes, entries, data, str(split_file), check=False)


def _folders(root: Path, image_dir: Path, data: DataConfig, source: str, *, skip: tuple[str, ...] = (),
             rename: Callable[[str], str] = _display) -> DatasetIndex:
    """<image_dir>/<class>/… with no split files: test and val carved with data.split_seed."""
    dirs = [d for d in _class_dirs(image_dir) if d.name not in skip]
    if not dirs:
        raise UserError(f"{image_dir}: no class folders")
    train, ignored = [], 0
    for label, d in enumerate(dirs):
        images, skipped = _files(d)
        ignored += skipped
        train += [(p, label) for p in images]
    log.warning("%s: no official split; test and val are carved from all images with data.split_seed=%d",
                source, data.split_seed)
    return _build(root, [(d.name, rename(d.name)) for d in dirs], {"train": train}, data, source,
                  check=False, carve_test=True, ignored=ignored)


# --- the ten datasets -------------------------------------------------------------------------------


def scan_imagenet(root: Path, data: DataConfig) -> DatasetIndex:
    train_dir = _need(root / "train", "ImageNet train/ folder")
    val_dir = _need(root / "val", "ImageNet val/ folder (the official val set is the test split)")
    names_file = _first(root / "classnames.txt", root / "LOC_synset_mapping.txt")
    if names_file is None:
        raise UserError(f"{root}: no class-name map (classnames.txt as in CoOp, or LOC_synset_mapping.txt)")
    wnid_names = {}
    for line in _lines(names_file):
        wnid, _, name = line.partition(" ")
        wnid_names[wnid] = _display(name.split(",")[0]) if names_file.name.startswith("LOC") else _display(name)
    dirs = _class_dirs(train_dir)
    if not dirs:
        raise UserError(f"{train_dir}: no class folders (expected train/<wnid>/*.JPEG)")
    missing = [d.name for d in dirs if d.name not in wnid_names]
    if missing:
        raise UserError(f"{names_file}: no name for class folder(s) {missing[:5]}")
    label_of = {d.name: i for i, d in enumerate(dirs)}
    entries: Entries = {"train": [], "test": []}
    ignored = 0
    for d in dirs:
        images, skipped = _files(d)
        ignored += skipped
        entries["train"] += [(p, label_of[d.name]) for p in images]
    val_dirs = _class_dirs(val_dir)
    if val_dirs:
        for d in val_dirs:
            if d.name not in label_of:
                raise UserError(f"{val_dir}: class folder {d.name!r} is not in train/")
            images, skipped = _files(d)
            ignored += skipped
            entries["test"] += [(p, label_of[d.name]) for p in images]
    else:
        solution = _first(root / "LOC_val_solution.csv")
        if solution is None:
            raise UserError(f"{val_dir}: images are not in class folders and {root}/LOC_val_solution.csv is missing "
                            "(run ImageNet's valprep.sh, or add the Kaggle solution file)")
        with open(solution, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                wnid = (row.get("PredictionString") or "").split(" ")[0]
                if wnid not in label_of:
                    raise UserError(f"{solution}: image {row.get('ImageId')!r} has unknown class {wnid!r}")
                entries["test"].append((val_dir / f"{row['ImageId']}.JPEG", label_of[wnid]))
    names = [(d.name, wnid_names[d.name]) for d in dirs]
    return _build(root, names, entries, data, str(root), check=not val_dirs, ignored=ignored)


def scan_caltech101(root: Path, data: DataConfig) -> DatasetIndex:
    image_dir = _need(root / "101_ObjectCategories", "Caltech101 101_ObjectCategories/ folder")
    if (root / COOP_SPLITS["caltech101"]).exists():
        return _coop(root, root / COOP_SPLITS["caltech101"], image_dir, data)
    return _folders(root, image_dir, data, str(root), skip=CALTECH_IGNORED,
                    rename=lambda n: _display(CALTECH_NAMES.get(n, n)))


def scan_dtd(root: Path, data: DataConfig) -> DatasetIndex:
    image_dir = _need(root / "images", "DTD images/ folder")
    if (root / COOP_SPLITS["dtd"]).exists():
        return _coop(root, root / COOP_SPLITS["dtd"], image_dir, data)
    dirs = _class_dirs(image_dir)
    label_of = {d.name: i for i, d in enumerate(dirs)}
    entries: Entries = {}
    for split in SPLITS:
        split_file = root / "labels" / f"{split}1.txt"
        entries[split] = []
        for line in _lines(split_file):
            cls = line.split("/")[0]
            if cls not in label_of:
                raise UserError(f"{split_file}: {line!r} names class {cls!r}, which has no folder in {image_dir}")
            entries[split].append((_under(image_dir, line), label_of[cls]))
    return _build(root, [(d.name, _display(d.name)) for d in dirs], entries, data, str(root / "labels"))


def scan_eurosat(root: Path, data: DataConfig) -> DatasetIndex:
    image_dir = _first(root / "2750", root / "EuroSAT_RGB", root / "EuroSAT")
    if image_dir is None:
        raise UserError(f"{root}: EuroSAT folder not found (expected {root}/2750/<class>/ "
                        f"or {root}/EuroSAT_RGB/<class>/)")
    if (root / COOP_SPLITS["eurosat"]).exists():
        return _coop(root, root / COOP_SPLITS["eurosat"], image_dir, data)
    return _folders(root, image_dir, data, str(root), rename=lambda n: EUROSAT_NAMES.get(n, _display(n)))


def scan_fgvc_aircraft(root: Path, data: DataConfig) -> DatasetIndex:
    data_dir = root / "data" if (root / "data" / "images").is_dir() else root
    _need(data_dir / "images", "FGVC-Aircraft data/images/ folder")
    variants = _lines(data_dir / "variants.txt")
    label_of = {v: i for i, v in enumerate(variants)}
    entries: Entries = {}
    for split in SPLITS:
        split_file = data_dir / f"images_variant_{split}.txt"
        entries[split] = []
        for line in _lines(split_file):
            image_id, _, variant = line.partition(" ")
            if variant not in label_of:
                raise UserError(f"{split_file}: image {image_id} has variant {variant!r}, not in variants.txt")
            entries[split].append((_under(data_dir / "images", f"{image_id}.jpg"), label_of[variant]))
    return _build(root, [(v, v) for v in variants], entries, data, str(data_dir))


def scan_food101(root: Path, data: DataConfig) -> DatasetIndex:
    image_dir = _need(root / "images", "Food-101 images/ folder")
    if (root / COOP_SPLITS["food101"]).exists():
        return _coop(root, root / COOP_SPLITS["food101"], image_dir, data)
    meta = _need(root / "meta", "Food-101 meta/ folder")
    classes = (_lines(meta / "classes.txt") if (meta / "classes.txt").exists()
               else [d.name for d in _class_dirs(image_dir)])
    labels = _lines(meta / "labels.txt") if (meta / "labels.txt").exists() else []
    if labels and len(labels) != len(classes):
        raise UserError(f"{meta / 'labels.txt'}: {len(labels)} names for {len(classes)} classes")
    label_of = {c: i for i, c in enumerate(classes)}
    entries: Entries = {}
    for split in ("train", "test"):
        if (meta / f"{split}.json").exists():
            doc = read_json(meta / f"{split}.json")
            if not isinstance(doc, dict):
                raise UserError(f"{meta / f'{split}.json'}: expected an object {{class: [\"class/id\", …]}}")
            ids = [i for v in doc.values() for i in v]
            split_file = meta / f"{split}.json"
        else:
            split_file = meta / f"{split}.txt"
            ids = _lines(split_file)
        entries[split] = []
        for image_id in ids:
            cls = image_id.split("/")[0]
            if cls not in label_of:
                raise UserError(f"{split_file}: {image_id!r} names unknown class {cls!r}")
            entries[split].append((_under(image_dir, f"{image_id}.jpg"), label_of[cls]))
    names = [(c, _display(labels[i] if labels else c)) for i, c in enumerate(classes)]
    return _build(root, names, entries, data, str(meta))


def scan_flowers102(root: Path, data: DataConfig) -> DatasetIndex:
    image_dir = _need(root / "jpg", "Flowers102 jpg/ folder")
    if (root / COOP_SPLITS["flowers102"]).exists():
        return _coop(root, root / COOP_SPLITS["flowers102"], image_dir, data)
    names_file = root / "cat_to_name.json"
    if not names_file.exists():
        raise UserError(f"{names_file}: not found (the official download has no class names; add CoOp's "
                        f"cat_to_name.json, or use {COOP_SPLITS['flowers102']})")
    cat_to_name = read_json(names_file)
    labels_path = root / "imagelabels.mat"
    setid_path = root / "setid.mat"
    labels = [int(x) for x in _mat_key(_loadmat(labels_path), "labels", labels_path).ravel()]
    n = max(labels)
    if not isinstance(cat_to_name, dict) or any(str(i) not in cat_to_name for i in range(1, n + 1)):
        raise UserError(f"{names_file}: expected names for labels \"1\"..\"{n}\"")
    setid = _loadmat(setid_path)
    entries: Entries = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        entries[split] = []
        for image_id in _mat_key(setid, key, setid_path).ravel():
            image_id = int(image_id)
            if not 1 <= image_id <= len(labels):
                raise UserError(f"{setid_path}: {key} has image id {image_id}, outside 1..{len(labels)}")
            entries[split].append((image_dir / f"image_{image_id:05d}.jpg", labels[image_id - 1] - 1))
    names = [(str(cat_to_name[str(i)]), _display(str(cat_to_name[str(i)]))) for i in range(1, n + 1)]
    return _build(root, names, entries, data, str(setid_path))


def scan_oxford_pets(root: Path, data: DataConfig) -> DatasetIndex:
    image_dir = _need(root / "images", "Oxford-IIIT Pets images/ folder")
    if (root / COOP_SPLITS["oxford_pets"]).exists():
        return _coop(root, root / COOP_SPLITS["oxford_pets"], image_dir, data)
    names: dict[int, str] = {}
    entries: Entries = {}
    for split, fname in (("train", "trainval.txt"), ("test", "test.txt")):
        split_file = root / "annotations" / fname
        entries[split] = []
        for line in _lines(split_file):
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise UserError(f"{split_file}: {line!r} is not '<image> <class id> <species> <breed id>'")
            image, label = parts[0], int(parts[1]) - 1
            breed = image.rsplit("_", 1)[0].lower()  # as CoOp: Abyssinian_100 -> abyssinian
            if names.setdefault(label, breed) != breed:
                raise UserError(f"{split_file}: class id {label + 1} is both {names[label]!r} and {breed!r}")
            entries[split].append((_under(image_dir, f"{image}.jpg"), label))
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{root / 'annotations'}: class ids are not 1..{len(names)}")
    return _build(root, [(names[i], _display(names[i])) for i in range(len(names))], entries, data,
                  str(root / "annotations"))


def _car_name(name: str) -> str:
    """As CoOp: 'AM General Hummer SUV 2000' -> '2000 AM General Hummer SUV'."""
    words = name.split()
    return " ".join([words[-1], *words[:-1]]) if len(words) > 1 and re.fullmatch(r"\d{4}", words[-1]) else name


def scan_stanford_cars(root: Path, data: DataConfig) -> DatasetIndex:
    if (root / COOP_SPLITS["stanford_cars"]).exists():
        return _coop(root, root / COOP_SPLITS["stanford_cars"], root, data)
    meta_path = _first(root / "devkit" / "cars_meta.mat", root / "cars_meta.mat")
    if meta_path is None:
        raise UserError(f"{root}: neither {COOP_SPLITS['stanford_cars']} nor devkit/cars_meta.mat found")
    class_names = [str(_scalar(c)) for c in _mat_key(_loadmat(meta_path), "class_names", meta_path).ravel()]
    entries: Entries = {}
    for split, folder, annos in (
        ("train", "cars_train", [root / "devkit" / "cars_train_annos.mat", root / "cars_train_annos.mat"]),
        ("test", "cars_test", [root / "cars_test_annos_withlabels.mat",
                               root / "devkit" / "cars_test_annos_withlabels.mat"]),
    ):
        anno_path = _first(*annos)
        if anno_path is None:
            raise UserError(f"{annos[0]}: not found (the {split} labels of Stanford Cars)")
        entries[split] = []
        for anno in _mat_key(_loadmat(anno_path), "annotations", anno_path).ravel():
            try:
                fname, label = str(_scalar(anno["fname"])), int(_scalar(anno["class"])) - 1
            except (KeyError, ValueError, TypeError):
                raise UserError(f"{anno_path}: annotations lack 'fname' and 'class' fields") from None
            entries[split].append((_under(root / folder, fname), label))
    names = [(n, _car_name(n)) for n in class_names]
    return _build(root, names, entries, data, str(root))


def scan_sun397(root: Path, data: DataConfig) -> DatasetIndex:
    image_dir = root / "SUN397" if (root / "SUN397").is_dir() else root
    coop = _first(root / COOP_SPLITS["sun397"], image_dir / COOP_SPLITS["sun397"])
    if coop is not None:
        return _coop(root, coop, image_dir, data)
    names_file = _first(image_dir / "ClassName.txt", root / "ClassName.txt", root / "Partitions" / "ClassName.txt")
    if names_file is None:
        raise UserError(f"{image_dir}/ClassName.txt: not found (SUN397's class list)")
    keys = _lines(names_file)  # "/a/abbey", "/b/balcony/exterior"
    label_of = {k: i for i, k in enumerate(keys)}
    entries: Entries = {}
    for split, fname in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
        split_file = _first(root / fname, image_dir / fname, root / "Partitions" / fname)
        if split_file is None:
            raise UserError(f"{root}/{fname}: not found (SUN397's official partition, from Partitions.zip)")
        entries[split] = []
        for line in _lines(split_file):
            key = line.rsplit("/", 1)[0]
            if key not in label_of:
                raise UserError(f"{split_file}: {line!r} is in no class of {names_file.name}")
            entries[split].append((_under(image_dir, line.lstrip("/")), label_of[key]))
    # As CoOp: "/b/balcony/exterior" -> "exterior balcony".
    names = [(k.strip("/")[2:], _display(" ".join(k.strip("/")[2:].split("/")[::-1]))) for k in keys]
    return _build(root, names, entries, data, str(root))


def _imagefolder(root: Path, data: DataConfig) -> DatasetIndex:
    return scan_imagefolder(root, data)


FORMATS: dict[str, Callable[[Path, DataConfig], DatasetIndex]] = {
    "imagefolder": _imagefolder,
    "imagenet": scan_imagenet,
    "caltech101": scan_caltech101,
    "dtd": scan_dtd,
    "eurosat": scan_eurosat,
    "fgvc_aircraft": scan_fgvc_aircraft,
    "food101": scan_food101,
    "flowers102": scan_flowers102,
    "oxford_pets": scan_oxford_pets,
    "stanford_cars": scan_stanford_cars,
    "sun397": scan_sun397,
}


def scan(dataset: str | os.PathLike, data: DataConfig) -> DatasetIndex:
    """Index a local dataset folder in the layout `data.format` names."""
    fmt = data.format
    if fmt not in FORMATS:
        raise UserError(f"data.format {fmt!r}: unknown dataset format (expected one of {', '.join(FORMATS)})")
    root = Path(dataset)
    if not root.is_dir():
        raise UserError(f"--dataset {root}: folder not found")
    if not data.domain.strip() and DOMAINS[fmt]:
        log.info("data.domain is empty; the paper's domain word for %s is %r (datadream/presets/paper/%s.yaml sets it)",
                 fmt, DOMAINS[fmt], fmt)
    index = FORMATS[fmt](root, data)
    log.info("%s: %d classes, %s images (%s)", fmt, len(index.classes),
             "/".join(str(sum(map(len, index.splits[s].values()))) for s in SPLITS), "train/val/test")
    return index
