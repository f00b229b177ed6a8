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
