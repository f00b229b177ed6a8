"""The classifier's training augmentations (docs/method.md, Stage 3), run on uint8 batches on the device.

The chain and its order are the paper's, as `datadream.data.loading.train_transform` runs them per image on the CPU:

    RandAugment(2 ops, magnitude 9 of 31) → RandomResizedCrop(scale 0.25–1, ratio 3/4–4/3, bicubic)
    → horizontal flip p=0.5 → ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 (its four parts in a random order)
    → grayscale p=0.2 → Gaussian blur p=0.2 (kernel ≈10% of the side, σ 0.1–2) → solarize p=0.2
    → normalise (the model's mean and std)

Each sample's parameters are drawn on the CPU from its own generator seeded by (run seed, epoch, index)
(`draw_params`, called in the loader's workers), so a batch is augmented the same way whatever the worker
count and whether or not the run was resumed. `augment_batch` then applies them to the whole batch on
the device: RandAugment's operations (a fixed magnitude, so only the sign varies) with torchvision's own
functions on the samples that drew each operation; the crop, flip, jitter, grayscale, blur and solarize
with per-sample parameters in batched kernels (the crop and flip as one bicubic `grid_sample`).

The input is the uint8 cache at training resolution (`datadream.data.cache`), i.e. the image resized on
its short side and centre-cropped; the random crop is taken from that square.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from datadream.runtime import generator

RA_NUM_OPS, RA_MAGNITUDE, RA_BINS = 2, 9, 31
CROP_SCALE, CROP_RATIO = (0.25, 1.0), (3 / 4, 4 / 3)
FLIP_P = 0.5
JITTER_P, JITTER = 0.8, (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
GRAY_P, BLUR_P, BLUR_SIGMA, SOLARIZE_P, SOLARIZE_THRESHOLD = 0.2, 0.2, (0.1, 2.0), 0.2, 128


@lru_cache(maxsize=1)
def _randaugment() -> v2.RandAugment:
    return v2.RandAugment(num_ops=RA_NUM_OPS, magnitude=RA_MAGNITUDE, num_magnitude_bins=RA_BINS)


def _ra_ops() -> list[str]:
    return list(v2.RandAugment._AUGMENTATION_SPACE)


def blur_kernel_size(height: int, width: int) -> int:
    """Odd, ≈10% of the shorter side (SimCLR-style blur), at least 3."""
    return max(3, int(0.1 * min(height, width)) // 2 * 2 + 1)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _crop_box(g: torch.Generator, height: int, width: int) -> list[float]:
    """RandomResizedCrop's box (top, left, h, w), drawn as torchvision's make_params does."""
    area, log_ratio = height * width, (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * _uniform(g, *CROP_SCALE)
        aspect = math.exp(_uniform(g, *log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return [top, left, h, w]
    ratio = width / height  # fallback: the central crop within the ratio range
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


def draw_params(seed: tuple, size: tuple[int, int], epoch: int, index: int) -> dict[str, torch.Tensor]:
    """One sample's augmentation parameters, from a generator seeded by (*seed, epoch, index)."""
    g = generator(*seed, epoch, index)
    height, width = size
    ra_op = torch.randint(len(_ra_ops()), (RA_NUM_OPS,), generator=g)
    ra_negative = torch.rand(RA_NUM_OPS, generator=g) <= 0.5
    crop = _crop_box(g, height, width)
    flags = torch.rand(5, generator=g) < torch.tensor([FLIP_P, JITTER_P, GRAY_P, BLUR_P, SOLARIZE_P])
    b, c, s, h = JITTER
    jitter = [_uniform(g, 1 - b, 1 + b), _uniform(g, 1 - c, 1 + c), _uniform(g, 1 - s, 1 + s), _uniform(g, -h, h)]
    order = torch.randperm(4, generator=g)
    sigma = _uniform(g, *BLUR_SIGMA)
    return {"ra_op": ra_op, "ra_negative": ra_negative, "crop": torch.tensor(crop, dtype=torch.float32),
            "flags": flags, "jitter": torch.tensor(jitter), "order": order, "sigma": torch.tensor(sigma)}


def _index(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Indices of a host-side mask on `device` (pinned, non-blocking: no wait on the device's queue)."""
    idx = mask.nonzero().flatten()
    if not len(idx):
        return None
    if device.type == "cuda":
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


def _ra_magnitude(op: str, negative: bool, height: int, width: int) -> float:
    magnitudes_fn, signed = v2.RandAugment._AUGMENTATION_SPACE[op]
    magnitudes = magnitudes_fn(RA_BINS, height, width)
    if magnitudes is None:
        return 0.0
    magnitude = float(magnitudes[RA_MAGNITUDE])
    return -magnitude if signed and negative else magnitude


def _randaugment_batch(x: torch.Tensor, op: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """RandAugment on a uint8 batch: each round, every (operation, sign) group in one torchvision call."""
    ra, names = _randaugment(), _ra_ops()
    height, width = x.shape[-2:]
    for r in range(RA_NUM_OPS):
        for k, name in enumerate(names):
            if name == "Identity":
                continue
            for neg in (False, True):
                idx = _index((op[:, r] == k) & (negative[:, r] == neg), x.device)
                if idx is None:
                    continue
                sub = ra._apply_image_or_video_transform(
                    x.index_select(0, idx), name, _ra_magnitude(name, neg, height, width),
                    interpolation=ra.interpolation, fill=ra._fill)
                x.index_copy_(0, idx, sub)
    return x


def _crop_flip(x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-sample resized crop (bicubic, pixel centres as torchvision's resize) and flip, uint8 → [0, 1]."""
    n, _, height, width = x.shape
    out_h, out_w = size
    top, left, h, w = crop.unbind(1)
    u = torch.arange(out_w, device=x.device, dtype=torch.float32) + 0.5
    v = torch.arange(out_h, device=x.device, dtype=torch.float32) + 0.5
    xs = left[:, None] + u[None] * (w / out_w)[:, None] - 0.5
    ys = top[:, None] + v[None] * (h / out_h)[:, None] - 0.5
    xs = torch.where(flip[:, None], xs.flip(-1), xs)
    gx, gy = (2 * xs + 1) / width - 1, (2 * ys + 1) / height - 1
    grid = torch.stack([gx[:, None, :].expand(n, out_h, out_w), gy[:, :, None].expand(n, out_h, out_w)], -1)
    y = F.grid_sample(x.float() / 255, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return y.clamp_(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(x)


def _jitter_op(fn: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """ColorJitter's part fn (0 brightness, 1 contrast, 2 saturation, 3 hue) with per-sample factors f."""
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

    f4 = f.view(-1, 1, 1, 1)
    if fn == 0:
        return (x * f4).clamp(0, 1)
    if fn == 1:
        mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
        return (f4 * x + (1 - f4) * mean).clamp(0, 1)
    if fn == 2:
        return (f4 * x + (1 - f4) * _gray(x)).clamp(0, 1)
    hsv = _rgb_to_hsv(x)
    hue = (hsv[:, 0] + f.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a per-sample σ (torchvision's kernel, reflect padding), as two grouped convs."""
    n, c, height, width = x.shape
    k = blur_kernel_size(height, width)
    t = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, device=x.device)
    pdf = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    kernel = (pdf / pdf.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n·c, k]
    y = F.pad(x.reshape(1, n * c, height, width), [k // 2] * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, height, width)


def augment_batch(images: torch.Tensor, params: dict[str, torch.Tensor], host: dict[str, torch.Tensor],
                  mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The chain of the module docstring on a uint8 batch [N, 3, H, W] on its device; normalised float out.

    `params` are the stacked `draw_params` on the images' device (continuous values are read there),
    `host` the same on the CPU (which samples take which branch is decided there, without a device sync);
    `mean` and `std` come from `norm_stats`. The input is modified in place.
    """
    device = images.device
    size = tuple(images.shape[-2:])
    x = _randaugment_batch(images, host["ra_op"], host["ra_negative"])
    flags = host["flags"]
    x = _crop_flip(x, params["crop"], params["flags"][:, 0], size)
    for k in range(4):
        for fn in range(4):
            idx = _index(flags[:, 1] & (host["order"][:, k] == fn), device)
            if idx is not None:
                f = params["jitter"].index_select(0, idx)[:, fn]
                x.index_copy_(0, idx, _jitter_op(fn, x.index_select(0, idx), f))
    idx = _index(flags[:, 2], device)
    if idx is not None:
        x.index_copy_(0, idx, _gray(x.index_select(0, idx)).expand(-1, 3, -1, -1))
    idx = _index(flags[:, 3], device)
    if idx is not None:
        x.index_copy_(0, idx, _blur(x.index_select(0, idx), params["sigma"].index_select(0, idx)))
    idx = _index(flags[:, 4], device)
    if idx is not None:
        sub = x.index_select(0, idx)
        x.index_copy_(0, idx, torch.where(sub >= SOLARIZE_THRESHOLD / 255, 1 - sub, sub))
    return normalize(x, mean, std)


def norm_stats(preprocess: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's mean and std as [1, 3, 1, 1] tensors on `device` (made once, not per batch)."""
    return tuple(torch.tensor(preprocess[k], dtype=torch.float32).view(1, -1, 1, 1).to(device)
                 for k in ("mean", "std"))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std per channel; a uint8 input is first scaled to [0, 1]."""
    if x.dtype == torch.uint8:
        x = x.float() / 255
    return (x - mean) / std
