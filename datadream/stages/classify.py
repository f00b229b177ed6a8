"""Stage 3: fine-tune CLIP with LoRA on the synthetic set, optionally with the real shots
(docs/method.md, Stage 3).

Inputs: the few-shot folder (`classes.json`, `train.jsonl` real shots, `val.jsonl` for choosing the
epoch; never the test split) and the synthetic folder (`manifest.jsonl`). Output folder:

    lora.safetensors    the best epoch's LoRA tensors (peft key names)
    head.safetensors    "text_embeddings" [C, D], L2-normalised, computed with that LoRA; "logit_scale"
    classifier.json     written last: fingerprint, classes, model, preprocess, LoRA settings, history
    checkpoints/        while training only: one resumable checkpoint per epoch (datadream.checkpoint)
    cache/              while training only: the train and val images decoded once (datadream.data.cache)

Images are decoded once into a uint8 cache at training resolution; the paper's augmentations run on
the device on uint8 batches (docs/method.md, datadream.data.augment).

Re-running with the same inputs is a no-op; re-running after a kill resumes from the newest intact
checkpoint and ends with the same tensors an uninterrupted run would (on CPU, bit for bit), because
every random draw is seeded by (run seed, epoch, sample or step), never by how far a process got.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from datadream.artifacts import CLASSIFIER_HEAD as HEAD_FILE
from datadream.artifacts import CLASSIFIER_LORA as LORA_FILE
from datadream.artifacts import CLASSIFIER_MARKER as MARKER
from datadream.checkpoint import load_latest, save_checkpoint
from datadream.config import ClassifyConfig, Config
from datadream.data import augment as aug
from datadream.data.cache import CachedBatches, EpochBatches, ImageCache, build_image_cache
from datadream.data.loading import read_records
from datadream.data.manifest import Record, read_classes
from datadream.errors import UserError
from datadream.io import (
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    mark_started,
    sha256_file,
    sha256_json,
    writes_output,
)
from datadream.models.clip import (
    add_clip_lora,
    apply_speed_options,
    encode_text,
    get_lora_state,
    load_clip,
    lora_parameters,
    set_lora_state,
    trim_tokens,
)
from datadream.runtime import (
    autocast_ctx,
    autocast_dtype,
    derive_seed,
    generator,
    resolve_device,
    seed_everything,
    step_metrics,
    to_device,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CACHE = "cache"


# --- data ----------------------------------------------------------------------------------------------


def training_set(train_on: str, real: list[Record], synthetic: list[Record]) -> tuple[list[Record], int]:
    """The records one epoch visits, and how many times the real shots are repeated in it."""
    if train_on == "real":
        return list(real), 1
    if train_on == "synthetic":
        return list(synthetic), 0
    # Real shots repeated to ≈1:1 with synthetic (docs/method.md, Stage 3); whole copies keep classes balanced.
    repeats = max(1, round(len(synthetic) / len(real)))
    return list(synthetic) + list(real) * repeats, repeats


def mix_batch(
    images: torch.Tensor, labels: torch.Tensor, is_real: torch.Tensor, num_classes: int, p: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability p, Mixup or CutMix the batch, separately within its real and synthetic parts.

    Returns the images and soft targets [N, C]. Real and synthetic are never blended together, so the
    per-source loss weights stay meaningful. `is_real` may stay on the host while the images and
    labels are on the device (the parts are then selected without waiting on the device).
    """
    targets = F.one_hot(labels, num_classes).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if p <= 0 or torch.rand(()).item() >= p:
            return images, targets
        mixer = v2.RandomChoice([v2.MixUp(num_classes=num_classes), v2.CutMix(num_classes=num_classes)])
        images = images.clone()
        for part in (is_real, ~is_real):
            if int(part.sum()) >= 2:
                images[part], targets[part] = mixer(images[part], labels[part])
    return images, targets


def classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, is_real: torch.Tensor, real_weight: float | None
) -> torch.Tensor:
    """Cross-entropy; with `real_weight`, real_weight·CE(real) + (1 − real_weight)·CE(synthetic).

    Which samples are real comes from the manifests' explicit is_real flag (docs/method.md, Stage 3),
    never from paths. `targets` are class indices or soft targets [N, C]. `is_real` may stay on the
    host: the two means are one weighted sum with per-sample weights, so nothing waits on the device.
    """
    if real_weight is None:
        return F.cross_entropy(logits, targets)
    flags = is_real.cpu()
    n_real = int(flags.sum())
    n_synthetic = len(flags) - n_real
    weights = torch.where(flags, real_weight / max(n_real, 1), (1.0 - real_weight) / max(n_synthetic, 1))
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    return (per_sample * to_device(weights.to(per_sample.dtype), logits.device)).sum()


# --- model ---------------------------------------------------------------------------------------------


def text_head(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised text embeddings of the class prompts: the classifier's weights.

    `tokens` may be cut to the longest prompt (models.clip.trim_tokens): the result is the same."""
    return F.normalize(encode_text(model, tokens), dim=-1)


def class_logits(model: nn.Module, images: torch.Tensor, head: torch.Tensor, scale: float) -> torch.Tensor:
    """logits = scale · cos(image embedding, class text embedding) (docs/method.md, Stage 3)."""
    return scale * F.normalize(model.encode_image(images), dim=-1) @ head.t()


@torch.no_grad()
def val_accuracy(model, cache: ImageCache, labels: torch.Tensor, tokens, cfg: ClassifyConfig, device, amp,
                 norm: tuple[torch.Tensor, torch.Tensor]) -> tuple[float | None, int]:
    """Top-1 on the val split (for choosing the epoch) from its uint8 cache, and the number of rejected files.

    The cache holds exactly the evaluation transform's pixels (resize, centre crop), so nothing is
    decoded again; correct answers are counted on the device and read once."""
    model.eval()
    with autocast_ctx(device, amp):
        head = text_head(model, tokens)
    slots = torch.from_numpy(cache.ok.nonzero()[0])
    if not len(slots):
        return None, len(cache.ok)
    pixels = cache.open()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(slots), cfg.batch_size):
        idx = slots[start:start + cfg.batch_size]
        images = to_device(torch.from_numpy(pixels[idx.numpy()]), device)
        with autocast_ctx(device, amp):
            logits = class_logits(model, aug.normalize(images, *norm), head, cfg.logit_scale)
        correct += (logits.argmax(-1) == to_device(labels[idx], device)).sum()
    return int(correct) / len(slots), len(cache.ok) - len(slots)


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine down to `floor` (= min_lr / lr) at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- the stage -----------------------------------------------------------------------------------------


def _input_paths(train_on: str, fewshot_dir: Path, synthetic_dir: Path | None) -> dict[str, Path]:
    paths = {"classes": fewshot_dir / "classes.json", "val": fewshot_dir / "val.jsonl"}
    if "real" in train_on:
        paths["real"] = fewshot_dir / "train.jsonl"
    if "synthetic" in train_on:
        if synthetic_dir is None:
            raise UserError(f"classify.train_on={train_on!r} needs a synthetic set folder; none was given")
        paths["synthetic"] = synthetic_dir / "manifest.jsonl"
    for name, path in paths.items():
        if not path.is_file():
            raise UserError(f"{path}: not found (the {name} input of classify)")
    return paths


def fingerprint_of(config: Config, inputs: dict[str, Path]) -> str:
    """What decides the result: classify/models/data settings, the seed and the input manifests.

    Where things live (models.cache_dir) and how fast they load (classify.num_workers) are left out.
    """
    return sha256_json({
        "classify": config.classify.model_dump(mode="json", exclude={"num_workers"}),
        "models": config.models.model_dump(mode="json", exclude={"cache_dir"}),
        "data": config.data.model_dump(mode="json"),
        "seed": config.run.seed,
        "inputs": {name: sha256_file(path) for name, path in sorted(inputs.items())},
    })


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    data = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(path, data)


@writes_output("out_dir")
def run(
    config: Config, fewshot_dir: str | Path, synthetic_dir: str | Path | None, out_dir: str | Path,
    on_epoch: Callable[[int, float | None], None] | None = None,
) -> Path:
    """Train the CLIP LoRA classifier into `out_dir` (see the module docstring); returns `out_dir`.

    `on_epoch(epoch, best_val_top1_so_far)` is called after each epoch's checkpoint (a search prunes
    trials from it by raising); the value is None while no val score exists."""
    cfg, seed = config.classify, config.run.seed
    fewshot_dir, out = Path(fewshot_dir), Path(out_dir)
    synthetic_dir = Path(synthetic_dir) if synthetic_dir is not None else None

    # Inputs: validate everything before touching the output, so bad input fails in a second, not an hour.
    inputs = _input_paths(cfg.train_on, fewshot_dir, synthetic_dir)
    classes = read_classes(inputs["classes"])
    real = read_records(inputs["real"], classes, is_real=True) if "real" in inputs else []
    synthetic = read_records(inputs["synthetic"], classes, is_real=False) if "synthetic" in inputs else []
    val = read_records(inputs["val"], classes, is_real=True)
    for name, records in (("real", real), ("synthetic", synthetic)):
        if name in inputs and not records:
            raise UserError(f"{inputs[name]}: no images to train on")
    fingerprint = fingerprint_of(config, inputs)
    if check_output_dir(out, MARKER, fingerprint):
        log.info("classify: %s already holds this classifier (same inputs); nothing to do", out)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(out / CACHE, ignore_errors=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    mark_started(out, fingerprint)

    # Load: the base CLIP in fp32; autocast (not casting the weights) keeps the frozen model exact.
    device = resolve_device(config.run)
    amp = autocast_dtype(config.run, device)
    model, tokenizer, preprocess = load_clip(config.models, device)

    # Freeze + add adapter: only LoRA on every attention block of both towers trains; the init is
    # seeded so a fresh run and a resumed one start from the same adapter.
    seed_everything(derive_seed(seed, "classify", "init"))
    model = add_clip_lora(model, cfg).to(device)
    params = lora_parameters(model)
    if apply_speed_options(model, config.run, device):
        log.info("classify: CLIP towers compiled (run.compile)")
    prompts = [config.data.prompt(c.name) for c in classes]
    # The context is cut after the longest prompt: the same features for a fraction of the text work,
    # which is paid every step while the text tower's LoRA trains (≈2.6× the image work at 1,000 classes
    # with the full 77 tokens).
    tokens = trim_tokens(model, tokenizer(prompts)).to(device)
    log.info("classify: %d classes, LoRA rank %d on %s (%d trainable tensors, %d parameters)",
             len(classes), cfg.rank, cfg.targets, len(params), sum(p.numel() for p in params))

    # Data: every image is decoded once, at training resolution, into a uint8 cache; one persistent loader
    # ships uint8 batches and each sample's augmentation parameters, and the augmentations run on the device.
    # One epoch visits `train` in an order drawn from (seed, epoch); val only picks the epoch.
    train, real_repeats = training_set(cfg.train_on, real, synthetic)
    max_pixels = config.data.max_image_pixels
    slot_of: dict[int, int] = {}
    for r in train:
        slot_of.setdefault(id(r), len(slot_of))
    unique = list({id(r): r for r in train}.values())
    cache_dir = out / CACHE
    train_cache = build_image_cache(unique, preprocess, max_pixels, cache_dir, "train", cfg.num_workers)
    val_cache = build_image_cache(val, preprocess, max_pixels, cache_dir, "val", cfg.num_workers)
    val_labels = torch.tensor([r.label for r in val], dtype=torch.long)
    norm = aug.norm_stats(preprocess, device)
    size = tuple(train_cache.shape[-2:])
    draw = partial(aug.draw_params, (seed, "classify", "augment"), size) if cfg.augment else None
    batches = EpochBatches(len(train), cfg.batch_size, partial(_order, seed))
    loader = DataLoader(
        CachedBatches(train_cache, [slot_of[id(r)] for r in train], [r.label for r in train],
                      [r.is_real for r in train], draw),
        sampler=batches, batch_size=None, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=cfg.warmup_steps, total=total_steps, floor=cfg.min_lr / cfg.lr)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    real_weight = cfg.real_weight if cfg.train_on == "synthetic+real" else None
    log.info("classify: train_on=%s, %d images per epoch (%d synthetic, %d real × %d), %d val, %d epochs",
             cfg.train_on, len(train), len(synthetic), len(real), real_repeats, len(val), cfg.epochs)

    # Resume: the newest intact checkpoint holds the adapter, the best adapter so far and the optimizer,
    # scheduler and selection state; without one, score the zero-shot head as epoch 0.
    ckpt = load_latest(out / CHECKPOINTS, map_location="cpu")
    if ckpt is not None and ckpt.meta.get("fingerprint") != fingerprint:
        log.warning("classify: ignoring checkpoint %d made with other inputs", ckpt.step)
        ckpt = None
    if ckpt is not None:
        set_lora_state(model, {k[len("lora/"):]: v for k, v in ckpt.tensors.items() if k.startswith("lora/")})
        best_state = {k[len("best/"):]: v for k, v in ckpt.tensors.items() if k.startswith("best/")}
        optimizer.load_state_dict(ckpt.state["optimizer"])
        scheduler.load_state_dict(ckpt.state["scheduler"])
        scaler.load_state_dict(ckpt.state["scaler"])
        start, best_val, best_epoch, history = (
            ckpt.step, ckpt.state["best_val"], ckpt.state["best_epoch"], ckpt.state["history"])
        log.info("classify: resumed from epoch %d", start)
    else:
        start, best_state, best_epoch = 0, get_lora_state(model), 0
        zero_shot, rejected = val_accuracy(model, val_cache, val_labels, tokens, cfg, device, amp, norm)
        best_val = zero_shot if zero_shot is not None else -1.0
        history = [{"epoch": 0, "train_loss": None, "val_top1": zero_shot, "rejected": rejected}]
        log.info("classify: zero-shot val top-1 %s", _pct(zero_shot))
    if best_val < 0:
        log.warning("classify: no usable images in %s; keeping the last epoch instead of the best on val",
                    inputs["val"])

    # MLflow (when tracked): per-step loss and lr on the step axis; per-epoch figures with step = epoch.
    metrics = step_metrics()
    if start == 0:
        metrics.add({"val_top1": history[0]["val_top1"]}, 0)

    # Loop: every random draw is keyed by (seed, epoch, sample/step), so epoch N is the same batches
    # and augmentations whether or not the process was restarted before it.
    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        seed_everything(derive_seed(seed, "classify", "epoch", epoch))
        batches.epoch = epoch
        model.train()
        seen = rejected = 0
        losses, sizes = [], []  # per-step losses stay on the device; read once at the end of the epoch
        for step, batch in enumerate(tqdm(loader, desc=f"classify epoch {epoch}/{cfg.epochs}", leave=False)):
            rejected += batch["rejected"]
            n = len(batch["labels"])
            if n:
                images = to_device(batch["images"], device)
                if cfg.augment:
                    params = {k: to_device(v, device) for k, v in batch["params"].items()}
                    images = aug.augment_batch(images, params, batch["params"], *norm)
                else:
                    images = aug.normalize(images, *norm)
                labels = to_device(batch["labels"], device)
                targets = F.one_hot(labels, len(classes)).float()
                if cfg.augment:
                    images, targets = mix_batch(images, labels, batch["is_real"], len(classes), cfg.mix_p,
                                                derive_seed(seed, "classify", "mix", epoch, step))
                with autocast_ctx(device, amp):
                    # The head is recomputed every step: the text tower's LoRA trains too.
                    logits = class_logits(model, images, text_head(model, tokens), cfg.logit_scale)
                    loss = classification_loss(logits.float(), targets, batch["is_real"], real_weight)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(loss.detach())
                sizes.append((step, n, scheduler.get_last_lr()[0]))
                seen += n
            scheduler.step()  # one schedule step per batch slot, so the schedule never depends on rejections
        step_losses = torch.stack(losses).tolist() if losses else []
        loss_sum = 0.0
        for value, (step, n, lr) in zip(step_losses, sizes, strict=True):
            loss_sum += value * n
            metrics.add({"step_loss": value, "step_lr": lr}, (epoch - 1) * steps_per_epoch + step + 1)
        if rejected:
            log.warning("classify: epoch %d skipped %d unreadable training images", epoch, rejected)

        elapsed = time.perf_counter() - t0
        entry: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / seen if seen else None,
                                 "lr": scheduler.get_last_lr()[0], "val_top1": None, "rejected": rejected}
        if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
            entry["val_top1"], entry["val_rejected"] = val_accuracy(
                model, val_cache, val_labels, tokens, cfg, device, amp, norm)
        history.append(entry)
        metrics.add({"train_loss": entry["train_loss"], "lr": entry["lr"], "val_top1": entry["val_top1"],
                     "train_images_per_s": seen / max(elapsed, 1e-9)}, epoch)
        # Select on val only (never test); with no val score at all, the last epoch wins.
        improved = entry["val_top1"] is not None and entry["val_top1"] > best_val
        if improved or (best_val < 0 and epoch == cfg.epochs):
            best_val = entry["val_top1"] if improved else best_val
            best_epoch, best_state = epoch, get_lora_state(model)
        log.info("classify: epoch %d/%d loss %s val top-1 %s (best %s at epoch %d)", epoch, cfg.epochs,
                 f"{entry['train_loss']:.4f}" if entry["train_loss"] is not None else "-",
                 _pct(entry["val_top1"]), _pct(best_val), best_epoch)

        # Checkpoint: every epoch, published atomically; a kill from here on loses at most one epoch.
        save_checkpoint(
            out / CHECKPOINTS, epoch,
            {**{f"lora/{k}": v for k, v in get_lora_state(model).items()},
             **{f"best/{k}": v for k, v in best_state.items()}},
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "best_val": best_val, "best_epoch": best_epoch,
             "history": history},
            meta={"fingerprint": fingerprint},
        )
        if on_epoch is not None:
            metrics.flush()  # the callback may end the run (a pruned trial)
            on_epoch(epoch, best_val if best_val >= 0 else None)

    metrics.flush()

    # Save: the best epoch's adapter, the class head it implies (so inference needs no text tower), and
    # classifier.json last, which marks the folder finished.
    set_lora_state(model, best_state)
    model.eval()
    with torch.no_grad():
        head = text_head(model, tokens).float()
    _save_safetensors(out / LORA_FILE, best_state)
    _save_safetensors(out / HEAD_FILE,
                      {"text_embeddings": head, "logit_scale": torch.tensor(cfg.logit_scale)})
    atomic_write_json(out / MARKER, {
        "fingerprint": fingerprint,
        "classes": [{"index": c.index, "slug": c.slug, "name": c.name} for c in classes],
        "prompts": prompts,
        "model": {"clip": config.models.clip, "clip_pretrained": config.models.clip_pretrained},
        "preprocess": preprocess,
        "logit_scale": cfg.logit_scale,
        "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets,
                 "dropout": 0.0, "configured_dropout": cfg.dropout},
        "train_on": cfg.train_on,
        "real_weight": real_weight,
        "epochs": cfg.epochs,
        "best_epoch": best_epoch,
        "best_val_top1": best_val if best_val >= 0 else None,
        "history": history,
        "counts": {"real": len(real), "real_repeats": real_repeats, "synthetic": len(synthetic),
                   "train_per_epoch": len(train), "val": len(val)},
        "seed": seed,
        "files_sha256": {name: sha256_file(out / name) for name in (LORA_FILE, HEAD_FILE)},
    })
    del loader  # ends the persistent workers before the cache they map is removed
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(out / CACHE, ignore_errors=True)
    log.info("classify: wrote %s (best epoch %d, val top-1 %s)", out, best_epoch, _pct(best_val))
    return out


def _order(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch `epoch`'s order. One draw is skipped first, as DataLoader(shuffle=True) took it
    for its worker seeds before shuffling: the epochs visit the images in the same order as before the cache."""
    g = generator(seed, "classify", "order", epoch)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return g


def _pct(x: float | None) -> str:
    return f"{100 * x:.2f}%" if x is not None and x >= 0 else "-"
