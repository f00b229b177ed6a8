"""The classifier's augmentations on device batches (datadream.data.augment) against torchvision per image,
and the uint8 image cache they read (datadream.data.cache)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from datadream.data import augment as aug
from datadream.data.cache import CachedBatches, EpochBatches, build_image_cache
from datadream.data.manifest import Record
from datadream.errors import UserError

PRE = {"image_size": 24, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic"}


def _images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _params(n: int, size: int = 24, **changes) -> dict[str, torch.Tensor]:
    """Parameters of an identity augmentation (no RandAugment op, whole-image crop, all branches off)."""
    p = {"ra_op": torch.zeros(n, 2, dtype=torch.long), "ra_negative": torch.zeros(n, 2, dtype=torch.bool),
         "crop": torch.tensor([[0.0, 0.0, size, size]]).repeat(n, 1), "flags": torch.zeros(n, 5, dtype=torch.bool),
         "jitter": torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1), "order": torch.arange(4).repeat(n, 1),
         "sigma": torch.ones(n)}
    p.update(changes)
    return p


def _run(images, params):
    mean, std = aug.norm_stats(PRE, torch.device("cpu"))
    return aug.augment_batch(images.clone(), params, params, mean, std)


def _denorm(x):
    mean, std = aug.norm_stats(PRE, torch.device("cpu"))
    return x * std + mean


def test_identity_parameters_only_normalise():
    images = _images(3)
    mean, std = aug.norm_stats(PRE, torch.device("cpu"))
    torch.testing.assert_close(_run(images, _params(3)), aug.normalize(images, mean, std), rtol=0, atol=1e-5)


def _inside(start: int, length: int, size: int = 24) -> torch.Tensor:
    """Output positions whose bicubic support (4 source pixels) lies inside the crop."""
    x = start + (torch.arange(size) + 0.5) * length / size - 0.5
    return (x.floor() - 1 >= start) & (x.floor() + 2 <= start + length - 1)


def test_crop_and_flip_equal_torchvision_resized_crop_per_sample():
    images = _images(3)
    crop = torch.tensor([[2.0, 5.0, 12.0, 9.0], [0.0, 0.0, 20.0, 24.0], [0.0, 0.0, 24.0, 24.0]])
    flip = torch.tensor([[True, False, False, False, False], [False] * 5, [True, False, False, False, False]])
    out = _denorm(_run(images, _params(3, crop=crop, flags=flip)))
    for i, (top, left, h, w) in enumerate(crop.int().tolist()):
        expected = TF.resized_crop(images[i].float() / 255, top, left, h, w, [24, 24],
                                   interpolation=InterpolationMode.BICUBIC, antialias=False).clamp(0, 1)
        got = TF.horizontal_flip(out[i]) if flip[i, 0] else out[i]
        # torchvision resizes the cut-out crop (its edge pixels repeated beyond it); the batched crop samples
        # the real neighbours there. Where the bicubic support is inside the crop, and for a crop flush with
        # the image on all sides, the two agree.
        rows, cols = (_inside(top, h), _inside(left, w)) if (h, w) != (24, 24) else (torch.ones(24, dtype=bool),) * 2
        assert rows.sum() > 4 and cols.sum() > 4
        torch.testing.assert_close(got[:, rows][:, :, cols], expected[:, rows][:, :, cols], rtol=0, atol=1e-4)


@pytest.mark.parametrize("fn", [0, 1, 2, 3])
def test_each_colour_jitter_part_equals_torchvision_with_per_sample_factors(fn):
    images = _images(3, seed=fn)
    factors = torch.tensor([[0.6, 0.7, 0.8, -0.1], [1.4, 1.3, 1.2, 0.05], [1.1, 0.9, 0.85, 0.1]])
    order = torch.tensor([[fn, *[k for k in range(4) if k != fn]]]).repeat(3, 1)
    # Only part fn differs from the identity, whatever the order of the other three.
    jitter = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(3, 1)
    jitter[:, fn] = factors[:, fn]
    flags = torch.tensor([[False, True, False, False, False]] * 2 + [[False] * 5])  # the last sample skips
    out = _denorm(_run(images, _params(3, jitter=jitter, order=order, flags=flags)))
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(3):
        x = images[i].float() / 255
        expected = ops[fn](x, float(jitter[i, fn])) if flags[i, 1] else x
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)


def test_grayscale_blur_and_solarize_equal_torchvision_per_sample():
    images = _images(3)
    flags = torch.tensor([[False, False, True, False, False], [False, False, False, True, False],
                          [False, False, False, False, True]])
    sigma = torch.tensor([1.0, 0.7, 1.5])
    out = _denorm(_run(images, _params(3, flags=flags, sigma=sigma)))
    x = images.float() / 255
    k = aug.blur_kernel_size(24, 24)
    torch.testing.assert_close(out[0], TF.rgb_to_grayscale(x[0], 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], TF.gaussian_blur(x[1], [k, k], [0.7, 0.7]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2], TF.solarize(x[2], 128 / 255), rtol=0, atol=1e-5)


def test_randaugment_groups_equal_torchvision_per_sample():
    ra = aug._randaugment()
    names = aug._ra_ops()
    images = _images(len(names))
    ops = torch.stack([torch.arange(len(names)), torch.arange(len(names)).flip(0)], 1)
    negative = torch.tensor([[i % 2 == 0, i % 3 == 0] for i in range(len(names))])
    out = aug._randaugment_batch(images.clone(), ops, negative)
    for i in range(len(names)):
        expected = images[i]
        for r in range(2):
            name = names[int(ops[i, r])]
            mag = aug._ra_magnitude(name, bool(negative[i, r]), 24, 24)
            expected = ra._apply_image_or_video_transform(expected, name, mag, interpolation=ra.interpolation,
                                                          fill=ra._fill)
        assert torch.equal(out[i], expected), names[int(ops[i, 0])]


def test_parameters_depend_only_on_seed_epoch_and_index():
    a = aug.draw_params((1, "x"), (24, 24), 3, 7)
    b = aug.draw_params((1, "x"), (24, 24), 3, 7)
    c = aug.draw_params((1, "x"), (24, 24), 4, 7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    top, left, h, w = a["crop"].tolist()
    assert 0 <= top <= 24 - h and 0 <= left <= 24 - w and 0.25 * 24 * 24 * 0.9 <= h * w <= 24 * 24


def _records(folder, n):
    records = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(np.full((30 + i, 40, 3), 10 * i, np.uint8)).save(path)
        records.append(Record(str(path), i % 2, f"c{i % 2}", "", False))
    return records


def test_cache_holds_the_eval_pixels_flags_rejections_and_is_reused(tmp_path):
    records = _records(tmp_path, 3)
    (tmp_path / "1.png").write_bytes(b"not an image")
    cache = build_image_cache(records, PRE, 10**8, tmp_path / "cache", "train")
    assert cache.ok.tolist() == [True, False, True] and [e.reason for e in cache.rejected] == ["not_an_image"]
    pixels = cache.open()
    assert pixels.shape == (3, 3, 24, 24) and pixels[2].min() == pixels[2].max() == 20
    again = build_image_cache(records, PRE, 10**8, tmp_path / "cache", "train")
    assert again.path == cache.path and again.ok.tolist() == cache.ok.tolist()
    # Batches skip the rejected slot and count it; a repeated position reads the same slot.
    data = CachedBatches(cache, [0, 1, 2, 2], [0, 1, 0, 0], [False, False, True, True])
    batch = data[(1, [3, 1, 0])]
    assert batch["rejected"] == 1 and batch["images"].shape == (2, 3, 24, 24)
    assert batch["is_real"].tolist() == [True, False]
    order = EpochBatches(4, 3, lambda e: torch.Generator().manual_seed(e))
    order.epoch = 2
    assert [len(ix) for _, ix in order] == [3, 1] and {e for e, _ in order} == {2}


def test_a_full_disk_is_a_user_error_not_a_crash(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UserError, match="no space left for the image cache"):
        build_image_cache(_records(tmp_path, 2), PRE, 10**8, tmp_path / "cache", "train")
    assert not list((tmp_path / "cache").iterdir())
