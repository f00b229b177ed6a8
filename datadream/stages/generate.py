"""Stage 2 — generate synthetic images per class with the adapted Stable Diffusion.

One pipeline per process; adapters are swapped per class (class-wise) or loaded once
(dataset-wise), never the whole pipeline reloaded (docs/method.md, Stage 2: reference-code defects).
Each image has its own seed derived from (seed, class, index): runs are resumable image by image,
shards are independent, and classes do not share a noise stream.

Output folder (`SyntheticSet`):
  <slug>/<index:05d>.png   images (each written to a temporary name, then renamed)
  classes.json             copied from the few-shot set
  manifest.jsonl           path, label, class, sha256, is_real=false, prompt, seed, adapter, index
  quality.json             with assess.enabled: per-class and overall quality (datadream.quality)
  quality_features.safetensors  the base CLIP's features behind it (float16), for gather and re-analysis
  dropped.jsonl            images the filter (assess.filter) dropped, each with its reason; empty otherwise
  generate.json            summary and fingerprint, written last: its presence means complete

With a filter, dropped images stay on disk but leave the manifest, and replacements take the next
indices (images_per_class, images_per_class + 1, …), each with its own seed, so a resumed or re-run
filter ends with the same images.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from datadream.artifacts import SYNTHETIC_MARKER as MARKER
from datadream.artifacts import Adapters
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
from datadream.runtime import autocast_dtype, derive_seed, generator, resolve_device, step_metrics

log = logging.getLogger(__name__)


def image_seed(seed: int, slug: str, index: int) -> int:
    return derive_seed(seed, "generate", slug, index)


def fingerprint_of(config: Config, index: dict, classes: list) -> str:
    """What decides the images (and, through assess, which are kept): settings, seed, adapters, classes."""
    return sha256_json({
        "generate": config.generate.model_dump(mode="json"),
        "models": config.models.model_dump(mode="json", exclude={"cache_dir"}),
        "seed": config.run.seed, "adapters": index["fingerprint"], "classes": [c.slug for c in classes],
        "assess": config.assess.model_dump(mode="json", exclude={"batch_size"}),
    })


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
    adapters = Adapters.open(adapters_dir)
    index = adapters.index
    missing = [c.slug for c in classes if c.slug not in index["classes"]]
    if missing:
        raise UserError(f"--adapters {adapters_dir}: no adapter for class(es) {missing}")
    adapters.verify({index["classes"][c.slug] for c in classes})
    fingerprint = fingerprint_of(config, index, classes)
    if check_output_dir(out, MARKER, fingerprint):
        log.info("generate: %s already holds these images; nothing to do", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    mark_started(out, fingerprint)

    from datadream.models.sd import FusedLora, apply_speed_options, attention_context, load_sd_pipeline

    device = resolve_device(config.run)
    pipe = load_sd_pipeline(config.models, dtype=autocast_dtype(config.run, device)).to(device)
    size = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    applied = apply_speed_options(config.run, device, unet=pipe.unet, vae=pipe.vae)
    if applied:
        log.info("generate: speed options %s", ", ".join(applied))
    fused = FusedLora()
    # PNG encoding and fsync run in a few threads while the device makes the next batch; each class's
    # images are all on disk before it is assessed, and every write's error reaches this thread.
    writer = PngWriter(max_pending=2 * cfg.batch_size)

    # Group classes by adapter so each adapter is loaded once (dataset-wise: once in all).
    by_unit: dict[str, list] = defaultdict(list)
    for c in classes:
        by_unit[index["classes"][c.slug]].append(c)

    records: list[Record] = []
    made, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(classes) * cfg.images_per_class, desc="generate", unit="img")
    metrics = step_metrics()  # MLflow (when tracked): throughput after each class, step = images made
    # Assessment (assess.enabled): the frozen base CLIP embeds each image once, right after its class is made;
    # the filter (assess.filter) drops images and makes replacements while the class's adapter is loaded.
    judge = _Assessment(config, fewshot_dir, classes, index, out) if config.assess.enabled else None
    try:
        for unit, unit_classes in by_unit.items():
            pipe.load_lora_weights(adapters_dir / unit, weight_name=index["weight_name"], adapter_name=unit)
            # Merged once per adapter: denoising then runs the plain layers, with no LoRA branch per step.
            fused.fuse(pipe, unit, cfg.lora_scale)
            for c in unit_classes:
                prompt = index["prompts"][c.slug]
                folder = out / c.slug

                def make(indices: list[int], prompt=prompt, folder=folder, slug=c.slug) -> None:
                    nonlocal made
                    todo = [i for i in indices if not image_path(folder, i).exists()]  # resume: finished images stay
                    bar.update(len(indices) - len(todo))
                    for start in range(0, len(todo), cfg.batch_size):
                        batch = todo[start : start + cfg.batch_size]
                        with torch.inference_mode(), attention_context(config.run, device):
                            images = pipe(
                                prompt=[prompt] * len(batch), num_inference_steps=cfg.steps,
                                guidance_scale=cfg.guidance_scale, height=size, width=size,
                                generator=[generator(image_seed(seed, slug, i)) for i in batch],
                            ).images
                        for i, img in zip(batch, images, strict=True):
                            writer.submit(image_path(folder, i), img)
                        made += len(batch)
                        bar.update(len(batch))
                    writer.wait()

                make(list(range(cfg.images_per_class)))
                kept = judge.class_done(c, unit, make) if judge else list(range(cfg.images_per_class))
                if made:
                    metrics.add({"images_per_s": made / max(time.perf_counter() - t0, 1e-9)}, made)
                records += [
                    Record(str(image_path(folder, i)), c.index, c.slug, sha256_file(image_path(folder, i)), False,
                           {"prompt": prompt, "seed": image_seed(seed, c.slug, i), "adapter": unit, "index": i})
                    for i in kept
                ]
            fused.restore(pipe, unit)  # the exact base weights back, the adapter deleted
        writer.wait()
    finally:
        writer.shutdown()  # on an error, the writes under way finish; queued ones are dropped
    bar.close()
    metrics.flush()
    elapsed = time.perf_counter() - t0
    log.info("generate: %d new image(s) in %.1f s (%.2f img/s) -> %s", made, elapsed, made / max(elapsed, 1e-9), out)
    assessed = judge.finish() if judge else {}

    write_classes(out / "classes.json", read_classes(fewshot_dir / "classes.json"))
    write_manifest(out / "manifest.jsonl", records)
    atomic_write_json(out / MARKER, {
        "fingerprint": fingerprint, "images": len(records), "classes": [c.slug for c in classes],
        "images_per_class": cfg.images_per_class, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
        "resolution": size, "base_model": config.models.sd, "adapters_mode": index["mode"],
        "manifest_sha256": sha256_file(out / "manifest.jsonl"), **assessed,
    })
    return out


class PngWriter:
    """PNG encoding and atomic writes (temporary name, fsync, rename) in a small thread pool.

    At most `max_pending` images wait at a time (submit blocks beyond that), so memory stays bounded
    when the disk is slower than the device. The first error of any write is raised in the caller's
    thread by the next submit or wait. Pillow's encoder and fsync release the GIL, so the threads
    overlap with the main thread's work.
    """

    def __init__(self, workers: int = 4, max_pending: int = 16):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
        self._slots = threading.BoundedSemaphore(max(1, max_pending))
        self._futures: list = []

    @staticmethod
    def encode(img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    def _write(self, path: Path, img) -> None:
        try:
            atomic_write_bytes(path, self.encode(img))
        finally:
            self._slots.release()

    def _check(self) -> None:
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        for f in done:
            f.result()  # re-raises the write's exception here

    def submit(self, path: Path, img) -> None:
        self._check()
        self._slots.acquire()
        self._futures.append(self._pool.submit(self._write, path, img))

    def wait(self) -> None:
        """Block until every submitted image is on disk; raise the first error."""
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()

    def shutdown(self) -> None:
        """Stop the threads: writes under way finish (atomically), queued ones are dropped; never raises."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


class _Assessment:
    """Features and quality.json of one generate output (datadream.quality); the filter's bookkeeping."""

    def __init__(self, config: Config, fewshot_dir: Path, classes: list, index: dict, out: Path):
        from datadream import quality
        from datadream.data.remote import localize_records

        t0 = time.perf_counter()
        self.config, self.cfg, self.out, self.q = config, config.assess, out, quality
        self.all_classes = read_classes(fewshot_dir / "classes.json")
        self.embedder = quality.Embedder(config)
        prompts = [index["prompts"].get(c.slug) or config.data.prompt(c.name) for c in self.all_classes]
        self.text = self.embedder.texts(prompts)
        mine = {c.slug for c in classes}
        self.shots = {s: [r for r in read_manifest(fewshot_dir / "train.jsonl") if r.cls == s] for s in mine}
        self.val = localize_records([r for r in read_manifest(fewshot_dir / "val.jsonl") if r.cls in mine])
        self.fewshot_dir = fewshot_dir
        self.kept: list[tuple[int, np.ndarray, list[str]]] = []
        self.real: list[tuple[int, np.ndarray, list[str]]] = []
        self.dropped: list[dict] = []
        self.seconds = time.perf_counter() - t0  # everything the assessment costs, CLIP loading included

    def _shot_name(self, path: str) -> str:
        try:
            return Path(path).resolve().relative_to(self.fewshot_dir.resolve()).as_posix()
        except ValueError:
            return path

    def class_done(self, c, unit: str, make) -> list[int]:
        """Embed the class's images (and its shots); with a filter, drop and replace. Returns the kept indices."""
        t0 = time.perf_counter()
        folder, seed = self.out / c.slug, self.config.run.seed
        shots = self.shots[c.slug]
        real = self.embedder.images([r.path for r in shots]) if shots else np.zeros((0, self.text.shape[1]))
        spent = time.perf_counter() - t0

        def embed(indices: list[int]) -> np.ndarray:
            nonlocal spent
            t = time.perf_counter()
            f = self.embedder.images([image_path(folder, i) for i in indices])
            spent += time.perf_counter() - t
            return f

        judged = self.q.filter_class(self.cfg, c.index, self.config.generate.images_per_class, embed, make,
                                     self.text, real)
        self.seconds += spent
        for d in judged.dropped:
            d.update({"path": f"{c.slug}/{image_path(Path(), d['index']).name}", "class": c.slug,
                      "seed": image_seed(seed, c.slug, d["index"]), "adapter": unit})
            if "shot" in d:
                d["shot"] = self._shot_name(shots[d["shot"]].path)
            if "assigned" in d:
                d["assigned"] = self.all_classes[d["assigned"]].slug
        if judged.dropped:
            log.info("generate: %s: dropped %d image(s) (%s) in %d round(s); %d kept", c.slug, len(judged.dropped),
                     ", ".join(f"{k} {v}" for k, v in sorted(Counter(d["reason"] for d in judged.dropped).items())),
                     judged.rounds, len(judged.kept))
        self.dropped += judged.dropped
        self.kept.append((c.index, judged.features, [f"{c.slug}/{image_path(Path(), i).name}" for i in judged.kept]))
        self.real.append((c.index, real, [self._shot_name(r.path) for r in shots]))
        return judged.kept

    def features(self):
        val = self.embedder.images([r.path for r in self.val]) if self.val else np.zeros((0, self.text.shape[1]))

        def stack(parts, width):
            return (np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, width), np.float32),
                    np.array([p[0] for p in parts for _ in p[2]], dtype=np.int64), [x for p in parts for x in p[2]])

        d = self.text.shape[1]
        syn, syn_label, syn_path = stack(self.kept, d)
        real, real_label, real_path = stack(self.real, d)
        model = {"clip": self.config.models.clip, "clip_pretrained": self.config.models.clip_pretrained}
        return self.q.Features(self.text, syn, syn_label, syn_path, real, real_label, real_path, val,
                               np.array([r.label for r in self.val], dtype=np.int64), model)

    def finish(self) -> dict:
        """Write the features, dropped.jsonl and quality.json (before the marker); the marker's summary."""
        from datadream.io import atomic_write_jsonl

        t0 = time.perf_counter()
        feats = self.features()
        feats.save(self.out / self.q.FEATURES)
        atomic_write_jsonl(self.out / self.q.DROPPED, self.dropped)
        report = self.q.summarize(feats, self.all_classes, self.cfg.copy_threshold,
                                  self.dropped if self.cfg.filter != "none" else None)
        atomic_write_json(self.out / self.q.REPORT, report)
        self.seconds += time.perf_counter() - t0
        log.info("generate: assessed %d image(s) with the base CLIP in %.1f s: class agreement %s, FD %s",
                 self.embedder.images_seen, self.seconds, report["overall"]["class_agreement"],
                 report["overall"]["fd_clip"])
        return {"assess": {"filter": self.cfg.filter, "copy_threshold": self.cfg.copy_threshold,
                           "dropped": len(self.dropped), "seconds": round(self.seconds, 3),
                           "images_embedded": self.embedder.images_seen}}


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
        assessed = _merge_assessment(shard_dirs, summaries, tmp)
        atomic_write_json(tmp / MARKER, {
            **{k: v for k, v in summaries[0].items() if k not in ("classes", "manifest_sha256", "assess")},
            **assessed,
            "fingerprint": fingerprint, "images": len(records), "shards": len(shard_dirs),
            "classes": sorted({r.cls for r in records}), "manifest_sha256": sha256_file(tmp / "manifest.jsonl"),
        })
    log.info("generate: merged %d shard(s), %d images -> %s", len(shard_dirs), len(records), out)
    return out


def _merge_assessment(shard_dirs: list[Path], summaries: list[dict], tmp: Path) -> dict:
    """The shards' features combined into one quality.json (FD and precision/recall over all classes), their
    dropped images copied and listed in one dropped.jsonl. Nothing when the shards were not assessed."""
    import shutil

    from datadream import quality
    from datadream.io import atomic_write_jsonl

    if not all("assess" in s for s in summaries):
        return {}
    feats = quality.Features.concat([quality.Features.load(d / quality.FEATURES) for d in shard_dirs])
    feats.save(tmp / quality.FEATURES)
    dropped = []
    for d in shard_dirs:
        for row in (json.loads(line) for line in (d / quality.DROPPED).read_text().splitlines() if line.strip()):
            (tmp / row["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(d / row["path"], tmp / row["path"])
            dropped.append(row)
    atomic_write_jsonl(tmp / quality.DROPPED, dropped)
    config = summaries[0]["assess"]
    report = quality.summarize(feats, read_classes(tmp / "classes.json"), config["copy_threshold"],
                               dropped if config["filter"] != "none" else None)
    atomic_write_json(tmp / quality.REPORT, report)
    seconds = round(sum(s["assess"]["seconds"] for s in summaries), 3)
    return {"assess": {**config, "dropped": len(dropped), "seconds": seconds,
                       "images_embedded": sum(s["assess"]["images_embedded"] for s in summaries)}}
