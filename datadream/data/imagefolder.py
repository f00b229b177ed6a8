"""ImageFolder datasets: `root/<class>/<image>`, or `root/{train,val,test}/<class>/<image>`.

Class display names come from an optional `root/classnames.json` ({folder name: display name});
folder names become slugs, display names go into prompts (docs/method.md, Stage 0). A split the
dataset lacks (val, test, or both) is carved out of train per class with a fixed seed, so the test
set is the same for every few-shot seed.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from datadream.config import DataConfig
from datadream.data.images import IMAGE_SUFFIXES
from datadream.data.manifest import ClassInfo, control_characters, slugify
from datadream.errors import UserError
from datadream.io import read_json
from datadream.runtime import derive_seed

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass
class DatasetIndex:
    root: Path
    classes: list[ClassInfo]
    # split -> class slug -> image paths (sorted)
    splits: dict[str, dict[str, list[Path]]]
    ignored_files: int = 0
    carved: list[str] = field(default_factory=list)


def _class_dirs(folder: Path) -> list[Path]:
    """The class folders under `folder`; hidden ones (.git, .ipynb_checkpoints) are skipped and listed."""
    dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    hidden = [p.name for p in dirs if p.name.startswith(".")]
    if hidden:
        log.info("%s: skipping %d hidden folder(s): %s", folder, len(hidden), ", ".join(map(repr, hidden)))
    for p in dirs:
        if control_characters(p.name):
            raise UserError(f"{folder}: class folder {p.name!r} has a control character in its name (it would go "
                            "into prompts); rename it")
    return [p for p in dirs if not p.name.startswith(".")]


def _images(folder: Path) -> tuple[list[Path], int]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, len(files) - len(images)


def carve_splits(splits: dict[str, dict[str, list[Path]]], classes: list[ClassInfo], data: DataConfig) -> list[str]:
    """Carve each missing split (test, then val) out of train, per class, in place; returns the carved
    splits. The draw depends only on (data.split_seed, split, class): every dataset format carves alike,
    and a re-run carves the same images."""
    carved = []
    for split, frac in (("test", data.test_fraction), ("val", data.val_fraction)):
        if split in splits:
            continue
        carved.append(split)
        splits[split] = {}
        for c in classes:
            pool = list(splits["train"][c.slug])
            random.Random(derive_seed(data.split_seed, split, c.slug)).shuffle(pool)
            n = round(frac * len(pool))
            splits[split][c.slug] = sorted(pool[:n])
            splits["train"][c.slug] = sorted(pool[n:])
    return carved


def scan_imagefolder(root: str | Path, data: DataConfig) -> DatasetIndex:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--dataset {root}: folder not found")
    split_layout = (root / "train").is_dir()
    split_roots = {s: root / s for s in SPLITS if (root / s).is_dir()} if split_layout else {"train": root}
    class_dirs = _class_dirs(split_roots["train"])
    if not class_dirs:
        raise UserError(
            f"--dataset {root}: no class folders found (expected {root}/<class>/<image> "
            f"or {root}/train/<class>/<image>)"
        )

    names_file = root / "classnames.json"
    names = read_json(names_file) if names_file.exists() else {}
    if not isinstance(names, dict):
        raise UserError(f"{names_file}: expected an object mapping class folder names to display names")

    classes, seen = [], {}
    for i, d in enumerate(class_dirs):
        slug = slugify(d.name)
        if slug in seen:
            raise UserError(f"--dataset {root}: class folders {seen[slug]!r} and {d.name!r} map to one slug {slug!r}; "
                            "rename one")
        seen[slug] = d.name
        name = names.get(d.name, d.name.replace("_", " "))
        if not isinstance(name, str) or not name.strip() or control_characters(name):
            raise UserError(f"{names_file}: display name of {d.name!r} must be non-empty text without control "
                            f"characters, got {name!r}")
        classes.append(ClassInfo(i, slug, name))

    splits: dict[str, dict[str, list[Path]]] = {}
    ignored = 0
    for split, sroot in split_roots.items():
        extra = {slugify(d.name) for d in _class_dirs(sroot)} - set(seen)
        if extra:
            raise UserError(f"--dataset {sroot}: class folder(s) {sorted(extra)} are not in the train split")
        splits[split] = {}
        for c in classes:
            imgs, skipped = _images(sroot / seen[c.slug]) if (sroot / seen[c.slug]).is_dir() else ([], 0)
            splits[split][c.slug] = imgs
            ignored += skipped

    carved = carve_splits(splits, classes, data)
    if ignored:
        log.info("ignored %d file(s) without an image suffix (%s)", ignored, ", ".join(sorted(IMAGE_SUFFIXES)))
    return DatasetIndex(root, classes, splits, ignored, carved)
