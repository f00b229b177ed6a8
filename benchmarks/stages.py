"""Per-stage throughput of DataDream: adapt, generate (ours vs the reference code's way), classify, evaluate.

Every figure comes from the library's own stage functions (`datadream.stages.*.run`) on the procedural
demo dataset; only the reference-way generation loop is written here, because it is the thing compared
against. Fixed costs (loading models, encoding latents, writing outputs) are removed by running a stage
twice with two workload sizes and dividing the difference in work by the difference in time; the fixed
cost is reported beside the rate.

    .venv/bin/python benchmarks/stages.py                   # tiny models on CPU, about a minute
    .venv/bin/python benchmarks/stages.py --preset real     # SD 2.1 base + ViT-B/16 sizes, random init, GPU

The table goes to stdout, logs to stderr, and the JSON (figures, settings, device, timestamps) to
benchmarks/results/stages-<preset>.json unless --json says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.stages")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REFERENCE_BATCH = 10  # ExplainableML/DataDream generate/generate.py: bs=10, fp16, a fresh pipeline per class

# Workload per preset. `config` is the library preset the stages run with, `overrides` the --set
# values that turn it into this benchmark's setting; the rest are this script's knobs.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "config": "tiny",
        "overrides": [],
        "classes": 3,
        "images_per_class": 12,
        "steps": 4,
        "adapt_steps": (4, 16),
        "classify_epochs": (1, 3),
        "classify_images": 2048,
        "eval_images": 4096,
        "image_size": 64,  # side of the demo dataset's images, px
    },
    "real": {
        "config": "paper",
        "overrides": [
            "models.sd=sd21-base-random",  # SD 2.1 base architecture, random init (no download needed)
            "models.clip=ViT-B-16",
            "models.clip_pretrained=null",  # ViT-B/16 at random init
            "run.precision=bf16",
            "generate.resolution=512",
            "adapt.resolution=512",
        ],
        "classes": 3,
        "images_per_class": 20,
        "steps": 50,
        "adapt_steps": (10, 40),
        "classify_epochs": (1, 3),
        "classify_images": 2048,
        "eval_images": 4096,
        "image_size": 256,  # upscaled to 512 by adapt and downscaled to 224 by CLIP, like real photos
    },
}


@dataclass
class Figure:
    stage: str
    value: float
    unit: str
    notes: str
    details: dict[str, Any] = field(default_factory=dict)


# --- timing helpers --------------------------------------------------------------------------------------


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    """Run fn and return (result, seconds), with the GPU drained before and after."""
    _sync()
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    _sync()
    return result, time.perf_counter() - t0


class PeakMemory:
    """Peak GPU memory allocated inside the block (None on CPU); frees cached memory before it starts."""

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        self.cuda = torch.cuda.is_available()
        self.peak_gib: float | None = None
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def rate_from_two_runs(work: tuple[float, float], seconds: tuple[float, float]) -> tuple[float, float]:
    """(work per second, fixed seconds) from two runs that differ only in the amount of work.

    t = fixed + work / rate, so rate = Δwork / Δt and fixed = t₁ − work₁ / rate. A non-positive Δt
    (noise swamping a too-small difference) gives NaN rather than a misleading number.
    """
    dw, dt = work[1] - work[0], seconds[1] - seconds[0]
    if dt <= 0:
        log.warning("the larger run was not slower (Δt = %.3f s): figure is noise; increase the workload", dt)
        return float("nan"), float("nan")
    rate = dw / dt
    return rate, seconds[0] - work[0] / rate


def seeded(config) -> None:
    """Seed torch before a stage: with clip_pretrained=null the base CLIP's random init draws from it."""
    import torch

    torch.manual_seed(config.run.seed)


def with_(config, **sections: dict):
    """A copy of config with some fields of some sections replaced (validated)."""
    from datadream.config import Config

    data = config.to_dict()
    for section, values in sections.items():
        data[section].update(values)
    return Config.model_validate(data)


# --- environment -------------------------------------------------------------------------------------------


def device_info() -> dict[str, Any]:
    import diffusers
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cpu": _cpu_model(),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["bf16"] = torch.cuda.is_bf16_supported()
    else:
        info["device"] = f"CPU: {info['cpu']} ({info['cpu_threads']} torch threads)"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def prepare_models(config) -> float:
    """Build (or find cached) the random-init models and initialise CUDA, so no timed run pays for it.

    Also imports what the stages import lazily (diffusers pipelines, peft, open_clip): the first run of
    a pair must not be slower than the second for reasons that are not its workload.
    """
    import torch

    t0 = time.perf_counter()
    import open_clip  # noqa: F401  (imported for its import time)
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from peft import LoraConfig  # noqa: F401

    from datadream.models.clip import load_clip
    from datadream.models.sd import resolve_sd

    log.info("preparing models (building random-init weights on the first run; cached after)")
    resolve_sd(config.models)
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda").add_(1)
    seeded(config)
    load_clip(config.models, "cpu")
    return time.perf_counter() - t0


def make_dataset(work: Path, classes: int, image_size: int, seed: int) -> Path:
    """The demo dataset, cut to its first `classes` classes (a copy, so the demo folder stays whole)."""
    from datadream.data.demo import DEMO_CLASSES, make_demo_dataset

    full = make_demo_dataset(work / "demo", seed=seed, size=image_size)
    if classes == len(DEMO_CLASSES):
        return full
    subset = work / f"demo-{classes}-classes"
    keep = dict(DEMO_CLASSES[:classes])
    for split in ("train", "val", "test"):
        for slug in keep:
            shutil.copytree(full / split / slug, subset / split / slug)
    (subset / "classnames.json").write_text(json.dumps(keep), encoding="utf-8")
    return subset


def tile_manifest(src: Path, dst: Path, n: int) -> int:
    """Write a manifest of n records cycling through src's. A stage reads only images inside a manifest's
    own folder, so each record's image is hard-linked (copied across file systems) into dst's folder."""
    import dataclasses
    import os
    import shutil

    from datadream.data.manifest import read_manifest, write_manifest

    records = read_manifest(src)
    images = dst.parent / f"{dst.stem}-images"
    images.mkdir(parents=True, exist_ok=True)
    tiled = []
    for i in range(n):
        r = records[i % len(records)]
        link = images / f"{i:06d}{Path(r.path).suffix}"
        if not link.exists():
            try:
                os.link(r.path, link)
            except OSError:
                shutil.copyfile(r.path, link)
        tiled.append(dataclasses.replace(r, path=str(link)))
    write_manifest(dst, tiled)
    return len(tiled)


# --- measurements ------------------------------------------------------------------------------------------


def measure_adapt(config, fewshot_dir: Path, work: Path, steps: tuple[int, int]) -> tuple[list[Figure], Path]:
    """Class-wise SD LoRA training steps/s: adapt.run with two max_steps values, timed whole."""
    from datadream.data.manifest import read_classes
    from datadream.stages import adapt

    n_classes = len(read_classes(fewshot_dir / "classes.json"))
    seconds = []
    with PeakMemory() as mem:
        for s in steps:
            # epochs high enough that max_steps decides; no mid-run checkpoints, so only training is timed.
            cfg = with_(config, adapt={"mode": "class", "max_steps": s, "epochs": 10_000, "checkpoint_every": 10**8})
            seeded(cfg)
            _, t = timed(adapt.run, cfg, fewshot_dir, work / f"adapters-{s}")
            log.info("adapt: %d classes × %d steps in %.2f s", n_classes, s, t)
            seconds.append(t)
    rate, fixed = rate_from_two_runs((n_classes * steps[0], n_classes * steps[1]), tuple(seconds))
    a = config.adapt
    details = {"classes": n_classes, "max_steps": list(steps), "seconds": seconds, "batch_size": a.batch_size,
               "resolution": a.resolution, "rank": a.rank, "train_text_encoder": a.train_text_encoder,
               "peak_gpu_gib": mem.peak_gib}
    figures = [
        Figure("adapt", rate, "steps/s",
               f"class-wise, {n_classes} classes, batch {a.batch_size}, {a.resolution} px; "
               f"Δ of max_steps {steps[0]}→{steps[1]}", details),
        Figure("adapt fixed cost", fixed, "s",
               "per adapt.run: model load, latent encoding and LoRA saving for all classes",
               {"peak_gpu_gib": mem.peak_gib}),
    ]
    return figures, work / f"adapters-{steps[1]}"


def measure_generate(config, fewshot_dir: Path, adapters: Path, work: Path) -> tuple[Figure, Path]:
    """Our way: generate.run, one pipeline, adapters swapped per class; timed end to end (load included)."""
    from datadream.data.manifest import read_classes
    from datadream.runtime import autocast_dtype, resolve_device
    from datadream.stages import generate

    n_classes = len(read_classes(fewshot_dir / "classes.json"))
    g = config.generate
    images = n_classes * g.images_per_class
    seeded(config)
    with PeakMemory() as mem:
        out, t = timed(generate.run, config, fewshot_dir, adapters, work / "synthetic")
    dtype = autocast_dtype(config.run, resolve_device(config.run))
    details = {"images": images, "seconds": t, "batch_size": g.batch_size, "steps": g.steps,
               "guidance_scale": g.guidance_scale, "dtype": str(dtype or "torch.float32"),
               "peak_gpu_gib": mem.peak_gib}
    return Figure("generate (ours)", images / t, "img/s",
                  f"generate.run, {images} images, batch {g.batch_size}, {g.steps} steps, "
                  f"{details['dtype'].removeprefix('torch.')}; one pipeline load included", details), out


def measure_generate_reference(config, fewshot_dir: Path, adapters: Path, work: Path) -> Figure:
    """The reference code's way: per class a fresh pipeline, that class's LoRA, batches of 10, fp16 on GPU.

    Same prompts, image count, steps and guidance as ours; images are written as PNG as the reference does.
    """
    import torch

    from datadream.data.manifest import read_classes
    from datadream.models.sd import load_sd_pipeline
    from datadream.runtime import derive_seed, resolve_device
    from datadream.stages.adapt import read_index

    g, seed = config.generate, config.run.seed
    device = resolve_device(config.run)
    dtype = torch.float16 if device.type == "cuda" else None
    classes = read_classes(fewshot_dir / "classes.json")
    index = read_index(adapters)
    out = work / "synthetic-reference"

    def one_class(slug: str) -> float:
        """Load a pipeline and this class's LoRA (the reference's per-class reload); returns load seconds."""
        _sync()
        t0 = time.perf_counter()
        pipe = load_sd_pipeline(config.models, dtype=dtype).to(device)
        pipe.load_lora_weights(adapters / index["classes"][slug], weight_name=index["weight_name"])
        _sync()
        load = time.perf_counter() - t0
        size = g.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        prompt = index["prompts"][slug]
        (out / slug).mkdir(parents=True, exist_ok=True)
        for start in range(0, g.images_per_class, REFERENCE_BATCH):
            n = min(REFERENCE_BATCH, g.images_per_class - start)
            with torch.inference_mode():
                images = pipe(
                    prompt=[prompt] * n, num_inference_steps=g.steps, guidance_scale=g.guidance_scale,
                    height=size, width=size, cross_attention_kwargs={"scale": g.lora_scale},
                    generator=torch.Generator().manual_seed(derive_seed(seed, "reference", slug, start)),
                ).images
            for i, image in enumerate(images, start):
                image.save(out / slug / f"{i}.png")
        del pipe
        return load

    seeded(config)
    with PeakMemory() as mem:
        loads, t = timed(lambda: [one_class(c.slug) for c in classes])
    images = len(classes) * g.images_per_class
    details = {"images": images, "seconds": t, "batch_size": REFERENCE_BATCH, "steps": g.steps,
               "guidance_scale": g.guidance_scale, "dtype": str(dtype or torch.float32),
               "load_seconds_per_class": loads, "generation_only_img_s": images / (t - sum(loads)),
               "peak_gpu_gib": mem.peak_gib}
    return Figure("generate (reference)", images / t, "img/s",
                  f"fresh pipeline + LoRA per class ({sum(loads) / len(loads):.2f} s each), batch "
                  f"{REFERENCE_BATCH}, {details['dtype'].removeprefix('torch.')}", details)


def measure_classify(config, fewshot_dir: Path, synthetic: Path, work: Path, epochs: tuple[int, int],
                     n_images: int) -> tuple[list[Figure], Path]:
    """CLIP LoRA training images/s: classify.run with two epoch counts on a synthetic set of n_images.

    The synthetic manifest is tiled to n_images so an epoch has realistic length without generating
    more images. Validation runs only at the start and the end (identical in both runs, so it cancels).
    """
    from datadream.stages import classify

    tiled = work / f"synthetic-x{n_images}"
    n = tile_manifest(synthetic / "manifest.jsonl", tiled / "manifest.jsonl", n_images)
    seconds = []
    with PeakMemory() as mem:
        for e in epochs:
            cfg = with_(config, classify={"train_on": "synthetic", "epochs": e, "val_every": 10**5})
            seeded(cfg)
            _, t = timed(classify.run, cfg, fewshot_dir, tiled, work / f"classifier-{e}")
            log.info("classify: %d images × %d epochs in %.2f s", n, e, t)
            seconds.append(t)
    rate, fixed = rate_from_two_runs((n * epochs[0], n * epochs[1]), tuple(seconds))
    c = config.classify
    details = {"images_per_epoch": n, "epochs": list(epochs), "seconds": seconds, "batch_size": c.batch_size,
               "num_workers": c.num_workers, "augment": c.augment, "peak_gpu_gib": mem.peak_gib}
    figures = [
        Figure("classify", rate, "img/s",
               f"{config.models.clip}, batch {c.batch_size}, {c.num_workers} workers, augment={c.augment}; "
               f"Δ of epochs {epochs[0]}→{epochs[1]} (per-epoch checkpoint included)", details),
        Figure("classify fixed cost", fixed, "s", "per classify.run: CLIP load, zero-shot + final val, saving",
               {"peak_gpu_gib": mem.peak_gib}),
    ]
    return figures, work / f"classifier-{epochs[0]}"


def measure_evaluate(config, fewshot_dir: Path, classifier: Path, work: Path, n_images: int) -> list[Figure]:
    """Scoring images/s: evaluate.run on the test manifest and on it tiled to n_images."""
    from datadream.stages import evaluate

    test = fewshot_dir / "test.jsonl"
    small = tile_manifest(test, work / "test-small.jsonl", len(Path(test).read_text().splitlines()))
    large = tile_manifest(test, work / "test-large.jsonl", n_images)
    seconds = []
    with PeakMemory() as mem:
        for name, n in (("small", small), ("large", large)):
            seeded(config)
            _, t = timed(evaluate.run, config, classifier, work / f"test-{name}.jsonl", work / f"metrics-{name}")
            log.info("evaluate: %d images in %.2f s", n, t)
            seconds.append(t)
    rate, fixed = rate_from_two_runs((small, large), tuple(seconds))
    details = {"images": [small, large], "seconds": seconds, "batch_size": config.evaluate.batch_size,
               "num_workers": config.classify.num_workers, "peak_gpu_gib": mem.peak_gib}
    return [
        Figure("evaluate", rate, "img/s",
               f"batch {config.evaluate.batch_size}, {config.classify.num_workers} workers; "
               f"Δ of {small}→{large} test images", details),
        Figure("evaluate fixed cost", fixed, "s", "per evaluate.run: classifier load, writing metrics",
               {"peak_gpu_gib": mem.peak_gib}),
    ]


# --- report --------------------------------------------------------------------------------------------------


def format_table(figures: list[Figure], device: str) -> str:
    rows = [(f.stage, f"{f.value:.3g}" if f.value == f.value else "n/a", f.unit, f.notes) for f in figures]
    widths = [max(len(r[i]) for r in [("stage", "figure", "unit", ""), *rows]) for i in range(3)]
    lines = [f"DataDream stage throughput on {device}", ""]
    header = ("stage", "figure", "unit", "notes")
    for r in [header, (*("-" * w for w in widths), "-----"), *rows]:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- main ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/stages.py",
        description="Per-stage throughput of DataDream (adapt steps/s, generate img/s ours vs the reference "
        "code's way, classify and evaluate img/s), measured with the library's own stage functions on the "
        "procedural demo dataset. The table goes to stdout, the figures to a JSON file.",
    )
    p.add_argument("--preset", choices=tuple(PRESETS), default="tiny",
                   help="tiny: tiny random-init models on CPU (about a minute); real: SD 2.1 base and CLIP "
                   "ViT-B/16 architectures at random init, 512 px generation, 224 px CLIP, bf16 on a GPU")
    p.add_argument("--allow-cpu", action="store_true", help="let --preset real run without CUDA (very slow)")
    p.add_argument("--out", type=Path, help="empty or new folder for scratch artifacts (default: a temporary "
                   "folder, deleted afterwards)")
    p.add_argument("--json", type=Path, help="where to write the results (default benchmarks/results/"
                   "stages-<preset>.json)")
    p.add_argument("--classes", type=int, help="classes of the demo dataset to use, 1..6")
    p.add_argument("--images-per-class", type=int, help="generated images per class (generate.images_per_class)")
    p.add_argument("--steps", type=int, help="denoising steps of generation (generate.steps)")
    p.add_argument("--adapt-steps", type=int, nargs=2, metavar=("A", "B"),
                   help="the two adapt.max_steps values whose difference gives steps/s")
    p.add_argument("--classify-epochs", type=int, nargs=2, metavar=("E1", "E2"),
                   help="the two classify.epochs values whose difference gives images/s")
    p.add_argument("--classify-images", type=int, help="training images per classify epoch (synthetic set tiled)")
    p.add_argument("--eval-images", type=int, help="test images in the larger evaluate run (test set tiled)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="extra config override, e.g. --set generate.batch_size=20 (repeatable)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice); on a shared "
                   "machine 1 avoids OpenMP oversubscription, which can slow CPU work tenfold")
    p.add_argument("--progress", action="store_true", help="show the stages' progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _check_args(args, parser: argparse.ArgumentParser) -> None:
    if not 1 <= args.classes <= 6:
        parser.error(f"--classes {args.classes}: the demo dataset has 6 classes; choose 1..6")
    for name in ("adapt_steps", "classify_epochs"):
        a, b = getattr(args, name)
        if not 0 < a < b:
            parser.error(f"--{name.replace('_', '-')} {a} {b}: need 0 < A < B")
    for name in ("images_per_class", "steps", "classify_images", "eval_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: must be at least 1")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out}: not empty (stages skip finished outputs, so a re-run would time nothing)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("classes", "images_per_class", "steps", "adapt_steps", "classify_epochs", "classify_images",
                "eval_images"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    _check_args(args, parser)

    # Before any Hugging Face or tqdm import: both read these at import time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    if not args.progress:
        os.environ["TQDM_DISABLE"] = "1"
    # Libraries warn only (open_clip logs every load at INFO on the root logger); ours and the stages inform.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for name in ("benchmarks", "datadream"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from datadream.config import load_config
    from datadream.errors import UserError

    if args.preset == "real" and not torch.cuda.is_available() and not args.allow_cpu:
        log.error("--preset real needs a CUDA GPU (it would take hours on CPU); pass --allow-cpu to run anyway")
        return 2

    try:
        config = load_config(preset["config"], overrides=[
            *preset["overrides"],
            f"generate.images_per_class={args.images_per_class}",
            f"generate.steps={args.steps}",
            *args.overrides,
        ])
    except UserError as e:
        log.error("%s", e)
        return 2

    started = datetime.now(UTC)
    scratch = args.out or Path(tempfile.mkdtemp(prefix="datadream-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    json_path = args.json or RESULTS_DIR / f"stages-{args.preset}.json"
    device = device_info()
    log.info("benchmark %s on %s, torch %s; scratch %s", args.preset, device["device"], device["torch"], scratch)
    try:
        figures, setup = run_benchmark(config, args, scratch)
    except UserError as e:
        log.error("%s", e)
        return 2
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)
    finished = datetime.now(UTC)

    payload = {
        "benchmark": "stages",
        "preset": args.preset,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "wall_s": round((finished - started).total_seconds(), 1),
        "device": device,
        "settings": {k: getattr(args, k) for k in ("classes", "images_per_class", "steps", "adapt_steps",
                                                   "classify_epochs", "classify_images", "eval_images", "threads")}
        | {"overrides": args.overrides, "reference_batch": REFERENCE_BATCH, **setup},
        "figures": [asdict(f) for f in figures],
        "config": config.to_dict(),
    }
    write_json(json_path, payload)
    sys.stdout.write(format_table(figures, device["device"]) + "\n")
    log.info("results -> %s", json_path)
    return 0


def run_benchmark(config, args, work: Path) -> tuple[list[Figure], dict[str, float]]:
    from datadream.stages import fewshot

    setup = {"prepare_models_s": round(prepare_models(config), 2)}
    dataset, setup["dataset_s"] = timed(make_dataset, work, args.classes, PRESETS[args.preset]["image_size"], 0)
    fewshot_dir, setup["fewshot_s"] = timed(fewshot.run, config, dataset, work / "fewshot")

    figures, adapters = measure_adapt(config, fewshot_dir, work, tuple(args.adapt_steps))
    ours, synthetic = measure_generate(config, fewshot_dir, adapters, work)
    reference = measure_generate_reference(config, fewshot_dir, adapters, work)
    # The reload share shrinks as images_per_class grows (500 in the paper), so say how much of it is reload.
    no_reload = reference.details["generation_only_img_s"]
    speedup = Figure("generate speed-up", ours.value / reference.value, "×",
                     f"ours / reference; {ours.value / no_reload:.2f}× against the reference without its reloads",
                     {"ours_img_s": ours.value, "reference_img_s": reference.value,
                      "reference_generation_only_img_s": no_reload})
    figures += [ours, reference, speedup]
    classify_figures, classifier = measure_classify(config, fewshot_dir, synthetic, work,
                                                    tuple(args.classify_epochs), args.classify_images)
    figures += classify_figures
    figures += measure_evaluate(config, fewshot_dir, classifier, work, args.eval_images)
    return figures, {k: round(v, 2) for k, v in setup.items()}


if __name__ == "__main__":
    sys.exit(main())
