"""Test data the tests build themselves (nothing is committed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datadream.data.manifest import Record
from datadream.io import sha256_file

COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30)]  # one solid colour per class


def colour_images(folder: Path, per_class: int, seed: int, is_real: bool = True) -> list[Record]:
    """Noisy solid-colour 40×40 PNGs, one colour per class (class0..2): a task the tiny CLIP can learn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for label, colour in enumerate(COLOURS):
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 12, (40, 40, 3)), 0, 255).astype(np.uint8)
            path = folder / f"c{label}_{i}.png"
            Image.fromarray(pixels).save(path)
            records.append(Record(str(path), label, f"class{label}", sha256_file(path), is_real))
    return records


def colour_task(root: Path, shots: int = 4, test: int = 4, synthetic_per_class: int = 6) -> tuple[Path, Path]:
    """A few-shot folder (classes.json, train/val/test manifests) and a synthetic folder (manifest) of
    the three-colour task, under `root`."""
    from datadream.data.manifest import ClassInfo, write_classes, write_manifest

    fewshot, synthetic = root / "fewshot", root / "synthetic"
    fewshot.mkdir(parents=True)
    write_classes(fewshot / "classes.json", [ClassInfo(i, f"class{i}", f"colour {i}") for i in range(len(COLOURS))])
    write_manifest(fewshot / "train.jsonl", colour_images(fewshot / "train", shots, seed=1))
    write_manifest(fewshot / "val.jsonl", colour_images(fewshot / "val", 2, seed=2))
    write_manifest(fewshot / "test.jsonl", colour_images(fewshot / "test", test, seed=3))
    write_manifest(synthetic / "manifest.jsonl",
                   colour_images(synthetic / "images", synthetic_per_class, seed=4, is_real=False))
    return fewshot, synthetic
