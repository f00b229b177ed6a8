"""A uint8 cache of decoded images at training resolution, so a training stage decodes each file once.

`build_image_cache` decodes every record with `load_rgb` (the strict loader), resizes its short side
to the model's input size and centre-crops it (exactly the evaluation transform, before the float
conversion), and writes the pixels into one memory-mapped file of shape [N, 3, H, W]. Unusable files
keep a zero slot and are flagged, so callers count them as they would count rejections on the fly.

The file is allocated up front with `os.posix_fallocate`, so a full disk fails at once with ENOSPC
(reported as a UserError) instead of a SIGBUS halfway through writing the memory map. The pixels are
written under a temporary name and renamed; the JSON beside them is written last and is the marker
that the cache is complete (a killed run rebuilds it; a resumed one reuses it).
"""

from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datadream.data.images import ImageRejected, load_rgb
from datadream.data.manifest import Record
from datadream.errors import UserError
from datadream.io import atomic_write_json, sha256_json

log = logging.getLogger(__name__)


@dataclass
class ImageCache:
    """The cache's pixels ([N, 3, H, W] uint8, memory-mapped read-only) and which slots hold an image."""

    path: Path
    shape: tuple[int, int, int, int]
    ok: np.ndarray  # bool [N]
    rejected: list[ImageRejected]

    def open(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)


class _Decode(Dataset):
    def __init__(self, records: list[Record], transform, max_pixels: int):
        self.records, self.transform, self.max_pixels = records, transform, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.records[i].path, self.max_pixels)
        except ImageRejected as e:
            return i, e
        return i, np.asarray(self.transform(image), dtype=np.uint8).transpose(2, 0, 1)


def _as_list(items: list) -> list:
    return items


def cache_transform(preprocess: dict):
    """Resize (the model's interpolation, antialiased) → centre crop, on the PIL image; uint8 out."""
    from torchvision.transforms import InterpolationMode, v2

    size = preprocess["image_size"]
    try:
        interpolation = InterpolationMode(preprocess["interpolation"])
    except ValueError:
        raise UserError(f"preprocess interpolation {preprocess['interpolation']!r}: expected bicubic, bilinear "
                        "or nearest") from None
    return v2.Compose([v2.Resize(size, interpolation=interpolation, antialias=True), v2.CenterCrop(size)])


def _allocate(path: Path, nbytes: int) -> None:
    """Create `path` with `nbytes` really reserved on disk (ENOSPC now, not SIGBUS later)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if nbytes:
            os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"{path.parent}: no space left for the image cache ({nbytes / 2**30:.2f} GiB "
                            "needed); free space or point the output folder at a larger volume") from None
        raise
    os.close(fd)


def build_image_cache(records: list[Record], preprocess: dict, max_pixels: int, folder: Path, name: str,
                      num_workers: int = 0) -> ImageCache:
    """Decode `records` once into `folder/<name>-<key>.u8` (see the module docstring); reuse a finished one."""
    size = preprocess["image_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    key = sha256_json({"records": [(r.path, r.sha256) for r in records], "size": [h, w],
                       "interpolation": preprocess["interpolation"], "max_pixels": max_pixels})[:16]
    path, meta_path = folder / f"{name}-{key}.u8", folder / f"{name}-{key}.json"
    shape = (len(records), 3, h, w)
    if meta_path.is_file() and path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        rejected = [ImageRejected(*args) for args in meta["rejected"]]
        return ImageCache(path, shape, np.array(meta["ok"], dtype=bool), rejected)

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.tmp"
    _allocate(tmp, int(np.prod(shape)))
    ok = np.zeros(len(records), dtype=bool)
    rejected: dict[int, ImageRejected] = {}
    if records:
        pixels = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=shape)
        loader = DataLoader(_Decode(records, cache_transform(preprocess), max_pixels), batch_size=16,
                            num_workers=num_workers, collate_fn=_as_list)
        for items in loader:
            for i, item in items:
                if isinstance(item, ImageRejected):
                    rejected[i] = item
                else:
                    pixels[i] = item
                    ok[i] = True
        pixels.flush()
        del pixels
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    ordered = [rejected[i] for i in sorted(rejected)]
    atomic_write_json(meta_path, {"shape": list(shape), "ok": ok.tolist(),
                                  "rejected": [list(e.args) for e in ordered]})
    log.info("cached %d/%d %s images at %dx%d (%.1f MiB)", int(ok.sum()), len(records), name, h, w,
             np.prod(shape) / 2**20)
    return ImageCache(path, shape, ok, ordered)


class CachedBatches(Dataset):
    """Training batches from an ImageCache: item (epoch, [position…]) → dict of uint8 images and labels.

    Position i of the epoch's list reads cache slot `slots[i]` (real shots repeated in an epoch share a
    slot). With `draw_params` (a function (epoch, position) → dict of tensors), each sample's augmentation
    parameters are drawn here, in the loader worker, from a seed of (run seed, epoch, position): they
    depend on neither the worker count nor where a previous process stopped.
    """

    def __init__(self, cache: ImageCache, slots: list[int], labels: list[int], is_real: list[bool],
                 draw_params=None):
        self.cache, self.draw_params = cache, draw_params
        self.slots = np.asarray(slots, dtype=np.int64)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.is_real = torch.tensor(is_real, dtype=torch.bool)
        self._pixels: np.ndarray | None = None

    def __getstate__(self):
        return {**self.__dict__, "_pixels": None}  # each worker maps the file itself

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, item: tuple[int, list[int]]) -> dict:
        epoch, positions = item
        usable = [i for i in positions if self.cache.ok[self.slots[i]]]
        if self._pixels is None:
            self._pixels = self.cache.open()
        idx = np.asarray(usable, dtype=np.int64)
        images = (torch.from_numpy(self._pixels[self.slots[idx]]) if usable
                  else torch.empty((0, *self.cache.shape[1:]), dtype=torch.uint8))
        out = {"images": images, "labels": self.labels[idx], "is_real": self.is_real[idx],
               "rejected": len(positions) - len(usable)}
        if self.draw_params is not None:
            out["params"] = _stack([self.draw_params(epoch, i) for i in usable])
        return out


def _stack(items: list[dict]) -> dict:
    if not items:
        return {}
    return {k: torch.stack([d[k] for d in items]) for k in items[0]}


class EpochBatches:
    """Sampler of (epoch, batch indices): the order of epoch e is a permutation drawn from `order(e)`.

    Set `epoch` before iterating; a persistent DataLoader then serves every epoch from the same workers.
    """

    def __init__(self, n: int, batch_size: int, order=None):
        self.n, self.batch_size, self.order, self.epoch = n, batch_size, order, 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.order(self.epoch)) if self.order else torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            yield self.epoch, perm[start:start + self.batch_size].tolist()
