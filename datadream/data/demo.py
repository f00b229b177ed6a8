"""A small procedural dataset for demos and tests: no downloads, byte-identical for a given seed.

Six classes of shapes and textures drawn with random position, scale, rotation and noise. Each class
also has its own foreground hue (jittered, on a random low-saturation background): with the tiny
random-init models of the demo, colour is a cue that a few LoRA steps can pick up in both the
generator and the classifier, while the shape stays the cue a real pretrained model would use.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from datadream.errors import UserError
from datadream.io import atomic_write_json, read_json, staged_dir

log = logging.getLogger(__name__)

DEMO_CLASSES: list[tuple[str, str]] = [
    ("circle", "circle"),
    ("square", "square"),
    ("triangle", "triangle"),
    ("cross", "cross"),
    ("hstripes", "horizontal stripes"),
    ("checkerboard", "checkerboard"),
]
DEFAULT_PER_SPLIT: dict[str, int] = {"train": 24, "val": 8, "test": 16}
GENERATOR_VERSION = 2  # bump when the drawing changes, so old folders are not taken for new ones
MARKER = "demo.json"

_SUPERSAMPLE = 4  # anti-aliasing: draw at 4x and average
_SPLIT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def make_demo_dataset(root: str | os.PathLike, seed: int = 0, size: int = 64,
                      per_split: dict[str, int] | None = None) -> Path:
    """Write root/<split>/<slug>/<slug>_<i:04d>.png and root/classnames.json; a no-op if already there.

    `per_split` maps split name to images per class and replaces the default (train 24, val 8,
    test 16). The folder is built under a temporary sibling and renamed into place, so it is
    either complete or absent. A folder made with other parameters is refused, not overwritten.
    """
    root = Path(root)
    params = _params(seed, size, per_split)
    if _already_made(root, params):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"{root}: exists and is not a demo dataset; choose an empty or new folder")
    try:
        with staged_dir(root) as tmp:
            n = _write(tmp, params)
    except OSError:
        if _already_made(root, params):  # a concurrent caller finished the same dataset first
            return root
        raise
    log.info("demo dataset: %d images, %d classes, seed %d, written to %s", n, len(DEMO_CLASSES), seed, root)
    return root


def _params(seed: int, size: int, per_split: dict[str, int] | None) -> dict:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"demo dataset: seed must be a non-negative integer, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 1024:
        raise UserError(f"demo dataset: size must be an integer in 16..1024, got {size!r}")
    splits = dict(DEFAULT_PER_SPLIT if per_split is None else per_split)
    if not splits:
        raise UserError("demo dataset: per_split is empty")
    for name, count in splits.items():
        if not isinstance(name, str) or not _SPLIT_NAME.match(name):
            raise UserError(f"demo dataset: split name {name!r} must be lower-case letters, digits, _ or -")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise UserError(f"demo dataset: split {name!r} needs a non-negative image count, got {count!r}")
    return {"generator": GENERATOR_VERSION, "seed": seed, "size": size, "per_split": splits}


def _already_made(root: Path, params: dict) -> bool:
    if not (root / "classnames.json").is_file() or not (root / MARKER).is_file():
        return False
    found = read_json(root / MARKER)
    if found != params:
        raise UserError(f"{root}: holds a demo dataset made with other parameters ({found}); "
                        f"asked for {params}; choose another folder or delete it")
    return True


def _write(out: Path, params: dict) -> int:
    seed, size = params["seed"], params["size"]
    n = 0
    for split, count in params["per_split"].items():
        split_key = zlib.crc32(split.encode())  # stable across runs, unlike hash()
        for label, (slug, _) in enumerate(DEMO_CLASSES):
            folder = out / split / slug
            folder.mkdir(parents=True)
            for i in range(count):
                # One stream per image: changing one split's count leaves every other image as it was.
                rng = np.random.default_rng([seed, split_key, label, i])
                Image.fromarray(_render(slug, label, size, rng)).save(folder / f"{slug}_{i:04d}.png", "PNG")
                n += 1
    atomic_write_json(out / "classnames.json", dict(DEMO_CLASSES))
    atomic_write_json(out / MARKER, params)  # last: its presence means the rest is there
    return n


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] on the supersampled grid (y down, x right)."""
    n = size * _SUPERSAMPLE
    t = ((np.arange(n, dtype=np.float32) + 0.5) / n) * 2 - 1
    y, x = np.meshgrid(t, t, indexing="ij")
    return x, y


def _colours(rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground in the class's hue (±20°), background a random low-saturation colour."""
    import colorsys

    hue = (label / len(DEMO_CLASSES) + rng.uniform(-20, 20) / 360) % 1.0
    fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))) * 255
    for _ in range(100):
        bg = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.3), rng.uniform(0, 1))) * 255
        if np.linalg.norm(fg - bg) > 120:
            break
    else:
        bg = 255 - fg
    return fg.astype(np.float32), bg.astype(np.float32)


def _render(slug: str, label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    fg, bg = _colours(rng, label)
    x, y = _grid(size)
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    scale = rng.uniform(0.35, 0.65)
    # Stripes stay roughly horizontal (that is the class); everything else turns freely.
    angle = rng.uniform(-0.2, 0.2) if slug == "hstripes" else rng.uniform(0, 2 * np.pi)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    u, v = (dx * c + dy * s) / np.float32(scale), (-dx * s + dy * c) / np.float32(scale)

    if slug == "circle":
        mask = u * u + v * v < 1.0
    elif slug == "square":
        mask = np.maximum(np.abs(u), np.abs(v)) < 0.8
    elif slug == "triangle":
        # Equilateral, circumradius 1: inside all three edges (inradius 0.5, outward normals 120° apart).
        mask = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = -np.pi / 2 + k * 2 * np.pi / 3
            mask &= u * np.float32(np.cos(a)) + v * np.float32(np.sin(a)) < 0.5
    elif slug == "cross":
        arm, half = 0.3, 0.95
        au, av = np.abs(u), np.abs(v)
        mask = ((au < arm) & (av < half)) | ((av < arm) & (au < half))
    elif slug == "hstripes":
        period = rng.uniform(0.2, 0.45)  # of the half-width: 4.5..10 stripe pairs, >= 6 px each at 64 px
        mask = np.mod(v * np.float32(scale) / np.float32(period) + rng.uniform(0, 1), 1.0) < 0.5
    elif slug == "checkerboard":
        cell = np.float32(rng.uniform(0.15, 0.35) / scale)  # 5..11 px squares at 64 px
        mask = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    else:
        raise ValueError(f"unknown demo class {slug!r}")

    k = _SUPERSAMPLE
    cover = mask.reshape(size, k, size, k).mean(axis=(1, 3), dtype=np.float32)[..., None]
    img = bg + (fg - bg) * cover
    img += rng.normal(0.0, rng.uniform(2.0, 8.0), img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
