"""Stage 1 — LoRA fine-tuning of Stable Diffusion (UNet and text encoder) on the few-shot images.

Class-wise mode trains one adapter per class, a whole shard of classes in one process with the
model loaded once; dataset-wise mode trains one adapter on every class. Settings: docs/method.md,
Stage 1 (AdamW, cosine with warm-up, MSE on the scheduler's target, no prior preservation).

Output folder (`Adapters`):
  <unit>/pytorch_lora_weights.safetensors   diffusers LoRA format: pipe.load_lora_weights(<unit>) loads it
  <unit>/adapter.json                       base model, rank, lr, steps, classes, data hash
  adapter.json                              the index (mode, class -> unit folder), written last
where <unit> is the class slug (class-wise) or `dataset` (dataset-wise). While training, resumable
checkpoints live in `checkpoints/<unit>/ckpt-<step>/`; finished units are skipped on a re-run.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from datadream.artifacts import ADAPTER_WEIGHTS as WEIGHTS
from datadream.artifacts import ADAPTERS_MARKER as MARKER
from datadream.artifacts import Adapters
from datadream.checkpoint import load_latest, save_checkpoint
from datadream.config import Config
from datadream.data.images import load_rgb
from datadream.data.manifest import ClassInfo, Record, read_classes, read_manifest, select_classes
from datadream.errors import UserError
from datadream.io import (
    atomic_write_json,
    check_output_dir,
    mark_started,
    mkdtemp,
    sha256_file,
    sha256_json,
    writes_output,
)
from datadream.runtime import autocast_dtype, derive_seed, generator, resolve_device, step_metrics, to_device

log = logging.getLogger(__name__)
DATASET_UNIT = "dataset"
LOG_EVERY = 25  # steps between reads of the loss from the device (MLflow still gets every step)


@dataclass
class Unit:
    """One adapter to train: its folder name, classes, images and one prompt per image."""

    name: str
    classes: list[ClassInfo]
    records: list[Record]
    prompts: list[str]


class _StopRequested(Exception):
    pass


def plan_units(config: Config, classes: list[ClassInfo], train: list[Record]) -> list[Unit]:
    by_slug = {c.slug: c for c in classes}
    prompt = {c.slug: config.data.prompt(c.name) for c in classes}
    if config.adapt.mode == "dataset":
        recs = [r for r in train if r.cls in by_slug]
        return [Unit(DATASET_UNIT, classes, recs, [prompt[r.cls] for r in recs])]
    units = []
    for c in classes:
        recs = [r for r in train if r.cls == c.slug]
        if not recs:
            raise UserError(f"train manifest has no images of class {c.slug!r}")
        units.append(Unit(c.slug, [c], recs, [prompt[c.slug]] * len(recs)))
    return units


def total_steps(config: Config, n_images: int) -> int:
    steps = config.adapt.epochs * math.ceil(n_images / config.adapt.batch_size)
    return min(steps, config.adapt.max_steps) if config.adapt.max_steps else steps


@writes_output("out")
def run(config: Config, fewshot_dir: str | os.PathLike, out: str | os.PathLike, shard: str | None = None) -> Path:
    cfg = config.adapt
    fewshot_dir, out = Path(fewshot_dir), Path(out)
    classes = select_classes(read_classes(fewshot_dir / "classes.json"), shard)
    train = read_manifest(fewshot_dir / "train.jsonl")
    units = plan_units(config, classes, train)
    fingerprint = sha256_json({
        "adapt": cfg.model_dump(mode="json"), "models": config.models.model_dump(mode="json", exclude={"cache_dir"}),
        "prompts": [u.prompts for u in units], "seed": config.run.seed,
        "data": [[r.sha256 for r in u.records] for u in units],
    })
    if check_output_dir(out, MARKER, fingerprint):
        log.info("adapt: %s already holds these adapters; nothing to do", out)
        return out
    from datadream.models.sd import check_prediction_type

    check_prediction_type(config.models)  # before the output folder is claimed
    # Kubernetes sends SIGTERM before killing a pod (spot preemption, eviction): checkpoint, then exit.
    # Only the main thread may install handlers; called from a worker thread, the stage runs without one.
    stop = {"requested": False}
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("requested", True)) if in_main else None
    try:
        out.mkdir(parents=True, exist_ok=True)
        mark_started(out, fingerprint)
        _train_units(config, units, out, stop)
    except _StopRequested:
        log.warning("adapt: stopped by SIGTERM after a checkpoint; re-run to resume")
        raise SystemExit(143) from None
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)

    index = {
        "fingerprint": fingerprint,
        "mode": cfg.mode,
        "base_model": config.models.sd,
        "base_revision": config.models.sd_revision,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "train_text_encoder": cfg.train_text_encoder,
        "classes": {c.slug: u.name for u in units for c in u.classes},
        "prompts": {c.slug: config.data.prompt(c.name) for u in units for c in u.classes},
        "weight_name": WEIGHTS,
    }
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    atomic_write_json(out / MARKER, index)
    log.info("adapt: %d adapter(s) -> %s", len(units), out)
    return out


def _train_units(config: Config, units: list[Unit], out: Path, stop: dict) -> None:
    from peft import LoraConfig

    from datadream.models.sd import apply_speed_options, attention_context, load_sd_components

    cfg = config.adapt
    # Load once per process: a shard of classes shares the frozen model (docs/architecture.md).
    device = resolve_device(config.run)
    amp = autocast_dtype(config.run, device)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_sd_components(config.models)

    # Freeze the base model; on GPU keep frozen weights in half precision to save memory, while the
    # LoRA weights below stay fp32 so small updates are not lost to rounding.
    for m in (vae, text_encoder, unet):
        m.requires_grad_(False)
        m.to(device)
        if amp is not None:
            m.to(dtype=amp)
    vae.eval()

    # Add the adapters once; each unit re-initialises them from its own seed instead of reloading.
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                target_modules=cfg.unet_targets))
    if cfg.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                            target_modules=cfg.text_targets))
    lora_params = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    lora_params |= {f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad}
    for p in lora_params.values():
        p.data = p.data.float()
    if amp is not None:
        # peft casts each LoRA layer's input to the fp32 LoRA weights' dtype; under autocast the matmuls run
        # in `amp` anyway, so that cast is a wasted op (and a bf16 -> fp32 copy) per adapted layer and step.
        from peft.tuners.lora import LoraLayer

        for m in (*unet.modules(), *text_encoder.modules()):
            if isinstance(m, LoraLayer):
                m.cast_input_dtype_enabled = False
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    applied = apply_speed_options(config.run, device, unet=unet,
                                  text_encoder=text_encoder if cfg.train_text_encoder else None)
    if applied:
        log.info("adapt: speed options %s", ", ".join(applied))
    models = (tokenizer, text_encoder, vae, unet, noise_scheduler)
    # MLflow (when tracked): loss and lr per step; units follow each other on one step axis.
    offset = 0
    with step_metrics() as metrics:
        for unit in tqdm(units, desc="adapt", unit="adapter"):
            if (out / unit.name / MARKER).exists():
                log.info("adapt: %s already trained; skipping", unit.name)
            else:
                with attention_context(config.run, device):
                    _train_unit(config, unit, models, lora_params, device, amp, out, stop, metrics, offset)
            offset += total_steps(config, len(unit.records))


def _encode_latents(vae, unit: Unit, resolution: int | None, device, dtype) -> list[torch.Tensor]:
    """Encode each image once: the VAE is frozen, so its latent distribution never changes.

    Images are resized so the short side is `resolution` (bilinear, docs/method.md Stage 1) and encoded
    whole; the random crop happens in latent space each step, on the 8-px grid of the VAE.
    Returns per image a tensor [2, C, h, w] = (mean, std) of the latent distribution.
    """
    from torchvision.transforms.functional import InterpolationMode, resize, to_tensor

    out = []
    for r in unit.records:
        img = load_rgb(r.path)
        if resolution:
            img = resize(img, resolution, interpolation=InterpolationMode.BILINEAR)
        x = to_tensor(img).unsqueeze(0).to(device, dtype) * 2 - 1
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        out.append(torch.stack([dist.mean[0], dist.std[0]]).float().cpu())
    return out


def _batch_latents(latent_stats, idx, crop: int, g: torch.Generator, on_device=None) -> torch.Tensor:
    """Sample latents for a batch: random crop (seeded) then a draw from each latent distribution.

    The crops and the standard-normal draws come from `g` on the CPU; with `on_device` (the same stats on
    the GPU) only the draws travel and the crop and the sum happen there. Same numbers either way.
    """
    batch = []
    for i in idx.tolist():
        stats = latent_stats[i]
        h, w = stats.shape[-2:]
        top = int(torch.randint(0, h - crop + 1, (1,), generator=g))
        left = int(torch.randint(0, w - crop + 1, (1,), generator=g))
        eps = torch.randn((stats.shape[1], crop, crop), generator=g)
        if on_device is not None:
            stats, eps = on_device[i], to_device(eps, on_device[i].device)
        mean, std = stats[:, :, top : top + crop, left : left + crop]
        batch.append(mean + std * eps)
    return torch.stack(batch)


def _optimizer_impl(device: torch.device) -> dict:
    """AdamW's fused kernel where torch has one for the device, else its multi-tensor (foreach) form."""
    return {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}


def _train_unit(config, unit: Unit, models, lora_params, device, amp, out: Path, stop,
                metrics, offset: int) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    cfg, seed = config.adapt, config.run.seed
    tokenizer, text_encoder, vae, unet, noise_scheduler = models
    n = len(unit.records)
    steps = total_steps(config, n)
    steps_per_epoch = math.ceil(n / cfg.batch_size)

    # Fresh adapter per unit, seeded by (seed, unit): gaussian A, zero B, so training starts at the base model.
    torch.manual_seed(derive_seed(seed, unit.name, "init"))
    for m in (*unet.modules(), *text_encoder.modules()):
        if isinstance(m, LoraLayer):
            m.reset_lora_parameters("default", init_lora_weights="gaussian")
    params = list(lora_params.values())
    # Fused AdamW: one kernel for all LoRA tensors instead of a dozen ops per tensor (CUDA and CPU).
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps,
                                  **_optimizer_impl(device))
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)

    # Data: latents once per image; the crop size in latent space follows the training resolution.
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_stats = _encode_latents(vae, unit, cfg.resolution, device, vae.dtype)
    crop = min(min(s.shape[-2:]) for s in latent_stats)
    if cfg.resolution:
        crop = min(crop, cfg.resolution // vae_scale)
    prompts = sorted(set(unit.prompts))
    prompt_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)
    prompt_of = torch.tensor([prompts.index(p) for p in unit.prompts])
    stats_dev = [s.to(device) for s in latent_stats] if device.type == "cuda" else None

    # Resume from the newest intact checkpoint of this unit, if a previous attempt was killed.
    ckpt_dir = out / "checkpoints" / unit.name
    start = 0
    ckpt = load_latest(ckpt_dir)
    if ckpt is not None:
        with torch.no_grad():
            for name, p in lora_params.items():
                p.copy_(ckpt.tensors[name])
        optimizer.load_state_dict(ckpt.state["optimizer"])
        scheduler.load_state_dict(ckpt.state["scheduler"])
        start = ckpt.step
        log.info("adapt: %s resumed from step %d", unit.name, start)

    # Loop. Every random draw comes from a generator seeded by (seed, unit, epoch|step), so a resumed
    # run takes exactly the batches, crops, noise and timesteps an uninterrupted run would.
    unet.train()
    text_encoder.train(cfg.train_text_encoder)
    t0, seen = time.perf_counter(), 0
    # Losses stay on the device and are read in one go every LOG_EVERY steps (and at checkpoints and the
    # end): no step waits for the device to report back.
    pending: list[tuple[int, float, torch.Tensor]] = []
    last_loss = float("nan")

    def drain() -> None:
        nonlocal last_loss
        if not pending:
            return
        values = torch.stack([loss for _, _, loss in pending]).tolist()
        for (step_no, lr, _), value in zip(pending, values, strict=True):
            metrics.add({"loss": value, "lr": lr}, offset + step_no)
        last_loss = values[-1]
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{pending[-1][1]:.2e}")
        pending.clear()

    bar = tqdm(range(start, steps), desc=f"adapt {unit.name}", unit="step", leave=False)
    for step in bar:
        epoch, i = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=generator(seed, unit.name, "epoch", epoch))
        idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        g = generator(seed, unit.name, "step", step)
        # Every draw stays on the CPU generator (bit-for-bit resumable); only the results travel.
        latents = _batch_latents(latent_stats, idx, crop, g, stats_dev) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        latents = latents.to(device)
        noise, timesteps, which = (to_device(t, device) for t in (noise, timesteps, prompt_of[idx]))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise

        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            # One text-encoder pass per distinct prompt (text LoRA trains, so it is recomputed each step).
            hidden = text_encoder(prompt_ids)[0][which]
            pred = unet(noisy.to(unet.dtype), timesteps, hidden).sample
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(idx)
        pending.append((step + 1, scheduler.get_last_lr()[0], loss.detach()))

        done = step + 1
        if done % LOG_EVERY == 0:
            drain()
        if done < steps and (done % cfg.checkpoint_every == 0 or stop["requested"]):
            drain()
            save_checkpoint(ckpt_dir, done, {k: p.detach() for k, p in lora_params.items()},
                            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                            {"unit": unit.name, "loss": last_loss})
            if stop["requested"]:
                raise _StopRequested
    drain()
    elapsed = time.perf_counter() - t0
    if steps > start:
        metrics.add({"steps_per_s": (steps - start) / max(elapsed, 1e-9),
                     "images_per_s": seen / max(elapsed, 1e-9)}, offset + steps)
    log.info("adapt: %s trained %d steps (%.2f steps/s, final loss %.4f)", unit.name, steps - start,
             (steps - start) / max(elapsed, 1e-9), last_loss)

    # Save in diffusers' LoRA format, built under a temporary name and renamed into place.
    tmp = Path(mkdtemp(prefix=f".{unit.name}.", dir=out))
    try:
        te_layers = None
        if config.adapt.train_text_encoder:
            te_layers = convert_state_dict_to_diffusers(
                get_peft_model_state_dict(text_encoder, save_embedding_layers=False))
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            text_encoder_lora_layers=te_layers, weight_name=WEIGHTS, safe_serialization=True,
        )
        atomic_write_json(tmp / MARKER, {
            "base_model": config.models.sd, "base_revision": config.models.sd_revision,
            "rank": cfg.rank, "alpha": cfg.alpha, "lr": cfg.lr, "steps": steps, "batch_size": cfg.batch_size,
            "resolution": cfg.resolution, "train_text_encoder": cfg.train_text_encoder, "seed": seed,
            "classes": [c.slug for c in unit.classes], "prompts": sorted(set(unit.prompts)),
            "data_sha256": sha256_json(sorted(r.sha256 for r in unit.records)),
            "weights_sha256": sha256_file(tmp / WEIGHTS),
        })
        shutil.rmtree(out / unit.name, ignore_errors=True)
        os.replace(tmp, out / unit.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def read_index(adapters_dir: str | os.PathLike) -> dict:
    """The adapter index of a finished `adapt` output; UserError if the folder is incomplete."""
    return Adapters.open(adapters_dir).index


@writes_output("out")
def merge(shard_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Gather the class-wise adapters of disjoint shards into one Adapters folder with one index."""
    from datadream.io import staged_dir

    indexes = [read_index(d) for d in shard_dirs]
    if any(ix["mode"] != "class" for ix in indexes):
        raise UserError("adapt merge: only class-wise shards can be merged (a dataset adapter is already whole)")
    fingerprint = sha256_json(sorted(ix["fingerprint"] for ix in indexes))
    out = Path(out)
    if check_output_dir(out, MARKER, fingerprint):
        return out
    with staged_dir(out) as tmp:
        merged = {**indexes[0], "fingerprint": fingerprint, "classes": {}, "prompts": {}, "shards": len(indexes)}
        for d, ix in zip(shard_dirs, indexes, strict=True):
            for slug, unit in ix["classes"].items():
                if slug in merged["classes"]:
                    raise UserError(f"class {slug!r} has adapters in more than one shard ({d})")
                shutil.copytree(Path(d) / unit, tmp / unit)
                merged["classes"][slug] = unit
                merged["prompts"][slug] = ix["prompts"][slug]
        atomic_write_json(tmp / MARKER, merged)
    log.info("adapt: merged %d shard(s), %d adapters -> %s", len(indexes), len(merged["classes"]), out)
    return out
