"""CPU proxies for the GPU throughput work, for machines without a GPU: before and after, side by side.

Three figures, each measured both ways in the same run:

1. classify's loader, images/s per worker process: the old path (decode a 512 px PNG, run the augmentation
   chain on the PIL image, ship float32) against the new one (read uint8 pixels from the decoded-once cache
   and draw each sample's augmentation parameters; the augmentations themselves run on the GPU). The
   one-time cache build (decode + resize) is reported too.
2. operations issued per adapt step, counted with torch.profiler (every aten op the step dispatches, and the
   kernels among them: ops that call no other op) on Stable Diffusion 2.1's topology at reduced width (same
   blocks, layers and attention count; bf16 autocast on the CPU as on a GPU): the old step (for-each AdamW,
   peft casting LoRA inputs to fp32, two `loss.item()` host syncs) against the new one (fused AdamW, no
   input casts, no syncs), and with `--compile` the new one with the UNet and text encoder compiled
   (inductor's generated kernels counted too). On a GPU each kernel is a launch of ≈30 µs or more, so this
   count bounds the step time.
3. PNG writes of generated 512 px images (encode + fsync + rename): serial on the main thread against
   generate's thread pool (datadream.stages.generate.PngWriter).

    .venv/bin/python benchmarks/cpu_proxies.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/cpu_proxies.py --compile  # + the compiled adapt step (minutes more)
    .venv/bin/python benchmarks/cpu_proxies.py --json benchmarks/results/cpu-proxies.json

Figures are for this machine only; they show causes removed, not GPU throughput.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.cpu_proxies")

PREPROCESS = {"image_size": 224, "mean": [0.48145466, 0.4578275, 0.40821073],
              "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic"}

# SD 2.1 base's UNet and text encoder (datadream.models.sd.SD21_BASE_RANDOM_CONFIG) at 1/10 of the width:
# every block, resnet, transformer block and attention projection is there, so the op count per step is
# the real model's; only the matrices are small enough for a CPU.
REDUCED_UNET = {
    "block_out_channels": [32, 64, 128, 128], "layers_per_block": 2, "sample_size": 16, "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64, "attention_head_dim": [1, 2, 4, 4], "use_linear_projection": True,
    "norm_num_groups": 32,
}
REDUCED_TEXT = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 23,
                "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 64, "hidden_act": "gelu"}


def _png_images(folder: Path, n: int, size: int = 512) -> list:
    """Synthetic 512 px images with smooth structure and grain (PNG sizes like generated images')."""
    from PIL import Image

    from datadream.data.manifest import Record

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    records = []
    for i in range(n):
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy) + 2 * i)], -1)
        pixels = np.clip(127 + 90 * base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:03d}.png"
        Image.fromarray(pixels).save(path)
        records.append(Record(str(path), i % 2, f"c{i % 2}", "", False))
    return records


def loader_rates(work: Path, n: int) -> dict:
    import torch

    from datadream.data import augment as aug
    from datadream.data.cache import CachedBatches, EpochBatches, build_image_cache
    from datadream.data.loading import ImageDataset, train_transform

    records = _png_images(work / "png", n)
    # Old: one worker decodes and augments each image and ships float32 (timed in-process = one worker).
    old = ImageDataset(records, train_transform(PREPROCESS, augment=True), 10**9, seed=(1, "classify", "augment", 1))
    t = time.perf_counter()
    for i in range(n):
        old[i]
    old_rate = n / (time.perf_counter() - t)
    # New: the cache is built once per run (decode + resize), then every epoch reads uint8 and draws parameters.
    t = time.perf_counter()
    cache = build_image_cache(records, PREPROCESS, 10**9, work / "cache", "train")
    build_rate = n / (time.perf_counter() - t)
    repeats = max(1, 4096 // n)  # several epochs' worth, so the timing is not a few milliseconds
    positions = list(range(n)) * repeats
    data = CachedBatches(cache, positions, [r.label for r in records] * repeats, [False] * len(positions),
                         lambda epoch, i: aug.draw_params((1, "classify", "augment"), (224, 224), epoch, i))
    batches = EpochBatches(len(positions), 64, lambda e: torch.Generator().manual_seed(e))
    batches.epoch = 1
    t = time.perf_counter()
    for item in batches:
        data[item]
    new_rate = len(positions) / (time.perf_counter() - t)
    # For reference only: the device part run on this CPU (on a GPU it is one small share of a step).
    batch = data[(1, list(range(min(64, n))))]
    mean, std = aug.norm_stats(PREPROCESS, torch.device("cpu"))
    t = time.perf_counter()
    aug.augment_batch(batch["images"], batch["params"], batch["params"], mean, std)
    cpu_aug_rate = len(batch["labels"]) / (time.perf_counter() - t)
    return {"old_img_s_per_worker": old_rate, "new_img_s_per_worker": new_rate, "cache_build_img_s": build_rate,
            "augment_batch_on_cpu_img_s": cpu_aug_rate, "images": n}


# aten ops that only make views or allocate, or read a scalar: no kernel runs on a GPU for them.
NO_KERNEL = frozenset(f"aten::{n}" for n in (
    "as_strided", "view", "_unsafe_view", "_reshape_alias", "reshape", "resolve_conj", "resolve_neg", "detach",
    "detach_", "empty", "empty_strided", "empty_like", "alias", "t", "transpose", "permute", "expand", "unsqueeze",
    "squeeze", "slice", "select", "split", "chunk", "narrow", "flatten", "lift_fresh", "result_type",
    "broadcast_tensors", "_nnpack_available", "resize_", "to", "contiguous", "_local_scalar_dense", "item"))


def _within(e, prefix: str) -> bool:
    """Whether the profiler event `e` (None: no event) or an event that called it is named `prefix`*."""
    while e is not None:
        if e.name.startswith(prefix):
            return True
        e = e.cpu_parent
    return False


def count_kernels(events) -> int:
    """Kernels a GPU would launch for a profiled CPU step: the innermost ops that compute (aten::linear calls
    aten::addmm, which runs; views and allocations run nothing) and inductor's generated kernels. A for-each
    op (aten::_foreach_*) counts once: on a GPU it is one multi-tensor kernel (a few launches for hundreds of
    tensors), while on a CPU it loops over per-tensor ops."""

    def computes(e) -> bool:
        return "_cpp_fused_" in e.name or (e.name.startswith("aten::") and e.name not in NO_KERNEL)

    def innermost(e) -> bool:
        todo = list(e.cpu_children)
        while todo:
            c = todo.pop()
            if computes(c):
                return False
            todo.extend(c.cpu_children)
        return True

    n = 0
    for e in events:
        if e.name.startswith("aten::_foreach_"):
            n += not _within(e.cpu_parent, "aten::_foreach_")
        elif computes(e) and not _within(e.cpu_parent, "aten::_foreach_") and innermost(e):
            n += 1
    return n


def adapt_ops(fused: bool, compiled: bool = False) -> dict:
    """aten ops, kernels and host syncs of one adapt step on the reduced topology, old (fused=False) or new
    way, optionally with the UNet and text encoder compiled (run.compile)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**REDUCED_UNET)
    text = CLIPTextModel(CLIPTextConfig(**REDUCED_TEXT))
    for m in (unet, text):
        m.requires_grad_(False)
        m.to(torch.bfloat16)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    text.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    params = [p for m in (unet, text) for p in m.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if fused:
        for m in (*unet.modules(), *text.modules()):
            if isinstance(m, LoraLayer):
                m.cast_input_dtype_enabled = False
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {"foreach": True}))
    sched = DDPMScheduler(num_train_timesteps=1000)
    ids = torch.randint(0, 49407, (1, 77))
    lora_layers = sum(isinstance(m, LoraLayer) for m in (*unet.modules(), *text.modules()))
    if compiled:
        # Each of inductor's generated kernels gets a profiler event, so that they can be counted.
        torch._inductor.config.cpp.enable_kernel_profile = True
        unet.compile()
        text.compile()

    def step() -> None:
        latents = torch.randn(2, 4, 16, 16)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (2,))
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = text(ids)[0].expand(2, -1, -1)
            pred = unet(noisy.to(torch.bfloat16), t, hidden).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not fused:  # the old loop read the loss twice per step (progress bar and MLflow)
            loss.item()
            loss.item()

    t0 = time.perf_counter()
    step()  # warm-up: optimizer state, allocator, and the compilation
    first_step_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()
    ops = [e.name for e in events if e.name.startswith("aten::")]

    kernels = count_kernels(events)

    # AdamW reads its CPU step counters: host-side, no wait on a GPU
    reads = sum(e.name == "aten::item" and not _within(e, "Optimizer.") for e in events)
    return {"aten_ops": len(ops), "kernels": kernels, "device_reads": reads,
            "copies": sum(n in ("aten::_to_copy", "aten::copy_") for n in ops), "lora_layers": lora_layers,
            "first_step_s": round(first_step_s, 1), "step_s": sorted(times)[1]}


def png_rates(work: Path, n: int) -> dict:
    from PIL import Image

    from datadream.io import atomic_write_bytes
    from datadream.stages.generate import PngWriter

    records = _png_images(work / "src", n)
    images = [Image.open(r.path).convert("RGB") for r in records]
    for im in images:
        im.load()
    t = time.perf_counter()
    for i, im in enumerate(images):
        atomic_write_bytes(work / "serial" / f"{i}.png", PngWriter.encode(im))
    serial = n / (time.perf_counter() - t)
    writer = PngWriter(max_pending=20)
    (work / "pool").mkdir()
    t = time.perf_counter()
    try:
        for i, im in enumerate(images):
            writer.submit(work / "pool" / f"{i}.png", im)
        writer.wait()
    finally:
        writer.shutdown()
    pool = n / (time.perf_counter() - t)
    return {"serial_img_s": serial, "pool_img_s": pool, "images": n, "pool_workers": 4}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/cpu_proxies.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="512 px PNGs for the loader and PNG figures")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--compile", action="store_true", help="also count the adapt step with the UNet and text "
                   "encoder compiled (run.compile; the compilation takes minutes on a CPU)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import torch
    from stages import device_info  # benchmarks/stages.py, beside this file

    torch.set_num_threads(1)  # per worker, as the loader's worker processes run
    with tempfile.TemporaryDirectory(prefix="datadream-proxies-") as tmp:
        work = Path(tmp)
        (work / "png").mkdir()
        (work / "src").mkdir()
        loader = loader_rates(work, args.images)
        torch.set_num_threads(os.cpu_count() or 1)
        ops = {"before": adapt_ops(fused=False), "after": adapt_ops(fused=True)}
        if args.compile:
            ops["compiled"] = adapt_ops(fused=True, compiled=True)
        png = png_rates(work, max(8, args.images // 2))
    device = device_info()["device"]
    rows = [
        ("classify loader, img/s per worker", loader["old_img_s_per_worker"], loader["new_img_s_per_worker"]),
        ("adapt step, aten ops issued", ops["before"]["aten_ops"], ops["after"]["aten_ops"]),
        ("adapt step, kernels launched", ops["before"]["kernels"], ops["after"]["kernels"]),
        ("adapt step, loss reads (GPU syncs)", ops["before"]["device_reads"], ops["after"]["device_reads"]),
        ("adapt step, dtype copies", ops["before"]["copies"], ops["after"]["copies"]),
        ("adapt step, s on this CPU (median of 3)", ops["before"]["step_s"], ops["after"]["step_s"]),
        ("PNG writes, img/s", png["serial_img_s"], png["pool_img_s"]),
    ]
    out = [f"CPU proxies on {device} (before → after, same run)", ""]
    out.append(f"{'figure':38s} {'before':>10s} {'after':>10s} {'ratio':>7s}")
    for name, a, b in rows:
        ratio = f"{b / a:.2f}×" if a else "-"
        out.append(f"{name:38s} {a:10.4g} {b:10.4g} {ratio:>7s}")
    out += ["", f"classify cache build (decode + resize, once per run): {loader['cache_build_img_s']:.3g} img/s; "
            f"the device augmentations run on this CPU: {loader['augment_batch_on_cpu_img_s']:.3g} img/s",
            f"adapt: SD 2.1 topology at reduced width, {ops['after']['lora_layers']} LoRA layers, bf16 autocast; "
            "before = for-each AdamW, peft input casts, 2 loss.item() per step; after = fused AdamW, no casts, "
            "no syncs",
            "PNG: serial on the main thread vs generate's PngWriter (4 threads)"]
    if "compiled" in ops:
        c = ops["compiled"]
        out.append(f"adapt, compiled (run.compile, inductor): {c['kernels']:,} kernels launched per step "
                   f"({c['kernels'] / ops['after']['kernels']:.2f}× eager after), {c['aten_ops']:,} aten ops, "
                   f"{c['step_s']:.3g} s per step on this CPU ({ops['after']['step_s'] / c['step_s']:.2f}× faster than "
                   f"eager after); first step {c['first_step_s']:.0f} s (the compilation; less with inductor's "
                   f"cache warm) vs {ops['after']['first_step_s']:.1f} s")
    sys.stdout.write("\n".join(out) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_info(), "loader": loader, "adapt_ops": ops, "png": png},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
