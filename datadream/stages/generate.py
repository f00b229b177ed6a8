"""Stage 2 — generate synthetic images per class with the adapted Stable Diffusion.

One pipeline per process; adapters are swapped per class (class-wise) or loaded once
(dataset-wise), never the whole pipeline reloaded (docs/method.md, Stage 2: reference-code defects).
Each image has its own seed derived from (seed, class, index): runs are resumable image by image,
shards are independent, and classes do not share a noise stream.

Output folder (`SyntheticSet`):
  <slug>/<index:05d>.png   images (each written to a temporary name, then renamed)
  classes.json             copied from the few-shot set
  manifest.jsonl           path, label, class, sha256, is_real=false, prompt, seed, adapter, index
  generate.json            summary and fingerprint, written last: its presence means complete
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from datadream import tracking
from datadream.config import Config
from datadream.data.manifest import Record, read_classes, read_manifest, select_classes, write_classes, write_manifest
from datadream.errors import UserError
from datadream.io import (
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    mark_started,
    read_json,
    sha256_file,
    sha256_json,
    writes_output,
)
from datadream.runtime import autocast_dtype, derive_seed, generator, resolve_device
from datadream.stages.adapt import read_index

log = logging.getLogger(__name__)
MARKER = "generate.json"


def image_seed(seed: int, slug: str, index: int) -> int:
    return derive_seed(seed, "generate", slug, index)


@writes_output("out")
def run(
    config: Config,
    fewshot_dir: str | os.PathLike,
    adapters_dir: str | os.PathLike,
    out: str | os.PathLike,
    shard: str | None = None,
) -> Path:
    cfg, seed = config.generate, config.run.seed
    fewshot_dir, adapters_dir, out = Path(fewshot_dir), Path(adapters_dir), Path(out)
    classes = select_classes(read_classes(fewshot_dir / "classes.json"), shard)
    index = read_index(adapters_dir)
    missing = [c.slug for c in classes if c.slug not in index["classes"]]
    if missing:
        raise UserError(f"--adapters {adapters_dir}: no adapter for class(es) {missing}")
    fingerprint = sha256_json({
        "generate": cfg.model_dump(mode="json"), "models": config.models.model_dump(mode="json", exclude={"cache_dir"}),
        "seed": seed, "adapters": index["fingerprint"], "classes": [c.slug for c in classes],
    })
    if check_output_dir(out, MARKER, fingerprint):
        log.info("generate: %s already holds these images; nothing to do", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    mark_started(out, fingerprint)

    from datadream.models.sd import load_sd_pipeline

    device = resolve_device(config.run)
    pipe = load_sd_pipeline(config.models, dtype=autocast_dtype(config.run, device)).to(device)
    size = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor

    # Group classes by adapter so each adapter is loaded once (dataset-wise: once in all).
    by_unit: dict[str, list] = defaultdict(list)
    for c in classes:
        by_unit[index["classes"][c.slug]].append(c)

    records: list[Record] = []
    made, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(classes) * cfg.images_per_class, desc="generate", unit="img")
    metrics = tracking.StepMetrics()  # MLflow (when tracked): throughput after each class, step = images made
    for unit, unit_classes in by_unit.items():
        pipe.load_lora_weights(adapters_dir / unit, weight_name=index["weight_name"], adapter_name=unit)
        pipe.set_adapters([unit], adapter_weights=[cfg.lora_scale])
        for c in unit_classes:
            prompt = index["prompts"][c.slug]
            folder = out / c.slug
            paths = [folder / f"{i:05d}.png" for i in range(cfg.images_per_class)]
            todo = [i for i, p in enumerate(paths) if not p.exists()]  # resume: finished images stay
            bar.update(cfg.images_per_class - len(todo))
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start : start + cfg.batch_size]
                with torch.inference_mode():
                    images = pipe(
                        prompt=[prompt] * len(batch), num_inference_steps=cfg.steps,
                        guidance_scale=cfg.guidance_scale, height=size, width=size,
                        generator=[generator(image_seed(seed, c.slug, i)) for i in batch],
                    ).images
                for i, img in zip(batch, images, strict=True):
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    atomic_write_bytes(paths[i], buf.getvalue())
                made += len(batch)
                bar.update(len(batch))
            if made:
                metrics.add({"images_per_s": made / max(time.perf_counter() - t0, 1e-9)}, made)
            records += [
                Record(str(p), c.index, c.slug, sha256_file(p), False,
                       {"prompt": prompt, "seed": image_seed(seed, c.slug, i), "adapter": unit, "index": i})
                for i, p in enumerate(paths)
            ]
        pipe.delete_adapters(unit)
    bar.close()
    metrics.flush()
    elapsed = time.perf_counter() - t0
    log.info("generate: %d new image(s) in %.1f s (%.2f img/s) -> %s", made, elapsed, made / max(elapsed, 1e-9), out)

    write_classes(out / "classes.json", read_classes(fewshot_dir / "classes.json"))
    write_manifest(out / "manifest.jsonl", records)
    atomic_write_json(out / MARKER, {
        "fingerprint": fingerprint, "images": len(records), "classes": [c.slug for c in classes],
        "images_per_class": cfg.images_per_class, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
        "resolution": size, "base_model": config.models.sd, "adapters_mode": index["mode"],
        "manifest_sha256": sha256_file(out / "manifest.jsonl"),
    })
    return out


@writes_output("out")
def merge(shard_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Gather the outputs of `generate` on disjoint class shards into one SyntheticSet.

    Images are copied (shards may live on different volumes); the folder appears whole or not at all.
    """
    import dataclasses
    import shutil

    from datadream.io import staged_dir

    out = Path(out)
    shard_dirs = [Path(d) for d in shard_dirs]
    for d in shard_dirs:
        if not (d / MARKER).exists():
            raise UserError(f"{d}: no {MARKER} (not a finished generate output)")
    summaries = [read_json(d / MARKER) for d in shard_dirs]
    fingerprint = sha256_json(sorted(s["fingerprint"] for s in summaries))
    if check_output_dir(out, MARKER, fingerprint):
        return out
    with staged_dir(out) as tmp:
        records: list[Record] = []
        for d in shard_dirs:
            for r in read_manifest(d / "manifest.jsonl"):
                dest = tmp / Path(r.path).relative_to(d)
                if dest.exists():
                    raise UserError(f"class {r.cls!r} appears in more than one shard ({d})")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(r.path, dest)
                records.append(dataclasses.replace(r, path=str(dest)))
        shutil.copyfile(shard_dirs[0] / "classes.json", tmp / "classes.json")
        write_manifest(tmp / "manifest.jsonl", records)
        atomic_write_json(tmp / MARKER, {
            **{k: v for k, v in summaries[0].items() if k not in ("classes", "manifest_sha256")},
            "fingerprint": fingerprint, "images": len(records), "shards": len(shard_dirs),
            "classes": sorted({r.cls for r in records}), "manifest_sha256": sha256_file(tmp / "manifest.jsonl"),
        })
    log.info("generate: merged %d shard(s), %d images -> %s", len(shard_dirs), len(records), out)
    return out
