"""Reading a manifest's images for a CLIP classifier: checked records, the per-image transforms and a
Dataset that carries unusable files along to be counted (classify, evaluate and the quality assessment).

The classify stage itself trains from a uint8 cache with the augmentations on the device
(datadream.data.cache, datadream.data.augment); `train_transform` is the same chain per PIL image on the
CPU, which benchmarks/cpu_proxies.py measures it against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from datadream.data.images import ImageRejected, load_rgb
from datadream.data.manifest import ClassInfo, Record, read_manifest, verify_records
from datadream.data.remote import localize_records
from datadream.errors import UserError
from datadream.runtime import derive_seed


def read_records(path: Path, classes: list[ClassInfo], is_real: bool | None) -> list[Record]:
    """A manifest's records, checked against classes.json and (unless None) the expected is_real flag."""
    records = read_manifest(path, verify=False)
    for n, r in enumerate(records, 1):
        if not 0 <= r.label < len(classes) or classes[r.label].slug != r.cls:
            raise UserError(f"{path}: record {n} has label {r.label} / class {r.cls!r}, not in classes.json")
        if is_real is not None and r.is_real != is_real:
            raise UserError(f"{path}: record {n} has is_real={r.is_real}; expected {is_real} here")
    verify_records(path, records)  # after the cheap checks: inside the set, regular files, hashes as recorded
    return localize_records(records)  # images of a dataset on S3 (val/test) come from the local cache


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise UserError(f"preprocess interpolation {name!r}: expected bicubic, bilinear or nearest") from None


def eval_transform(preprocess: dict) -> v2.Compose:
    """Resize (model's interpolation) → center crop → normalise (docs/method.md, Stage 3: test transform)."""
    size = preprocess["image_size"]
    return v2.Compose([
        v2.Resize(size, interpolation=_interpolation(preprocess["interpolation"]), antialias=True),
        v2.CenterCrop(size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(preprocess["mean"], preprocess["std"]),
    ])


def train_transform(preprocess: dict, augment: bool) -> v2.Compose:
    """docs/method.md, Stage 3 augmentations per PIL image on the CPU; without `augment`, the eval transform.

    The stage itself runs the same chain on the device (datadream.data.augment, docs/method.md); this
    per-image form is what benchmarks/cpu_proxies.py measures it against."""
    if not augment:
        return eval_transform(preprocess)
    size = preprocess["image_size"]
    edge = size if isinstance(size, int) else min(size)
    blur_kernel = max(3, int(0.1 * edge) // 2 * 2 + 1)  # odd, ≈10% of the image as in SimCLR-style blur
    return v2.Compose([
        v2.RandAugment(num_ops=2, magnitude=9),
        v2.RandomResizedCrop(
            size, scale=(0.25, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
        ),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.2),
        v2.RandomSolarize(threshold=128, p=0.2),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(preprocess["mean"], preprocess["std"]),
    ])


class ImageDataset(Dataset):
    """Records → (image tensor, label, is_real), or the ImageRejected of an unusable file.

    With `seed` set, each sample's augmentation draws from its own RNG seeded by (seed…, index), so
    the result depends neither on worker count nor on where a previous process stopped.
    """

    def __init__(self, records: list[Record], transform, max_pixels: int, seed: tuple | None = None):
        self.records, self.transform, self.max_pixels, self.seed = records, transform, max_pixels, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        try:
            image = load_rgb(r.path, self.max_pixels)
        except ImageRejected as e:
            return e
        if self.seed is None:
            return self.transform(image), r.label, r.is_real
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(*self.seed, i))
            return self.transform(image), r.label, r.is_real


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    is_real: torch.Tensor
    rejected: list[ImageRejected]


def collate(items: list) -> Batch:
    """Stack the usable samples; rejected files are carried along to be counted, never padded."""
    rejected = [x for x in items if isinstance(x, ImageRejected)]
    ok = [x for x in items if not isinstance(x, ImageRejected)]
    if not ok:
        empty = torch.empty(0)
        return Batch(empty, empty.long(), empty.bool(), rejected)
    images, labels, is_real = zip(*ok, strict=True)
    return Batch(torch.stack(images), torch.tensor(labels), torch.tensor(is_real), rejected)
