"""GPU benchmark of DataDream: adapt steps/s, generated images/s, classify images/s, FLOPs and MFU.

Runs the library's own stages (`datadream.stages.*.run`, through the helpers of benchmarks/stages.py) on
the procedural demo dataset with the paper's architectures at random init: SD 2.1 base at 512 px
(`models.sd=sd21-base-random`) and CLIP ViT-B/16, bf16 on a GPU. For each stage it reports

- throughput, with fixed costs (model load, latent encoding, saving) removed by timing two workload
  sizes and dividing the difference in work by the difference in time;
- model FLOPs per unit of work, counted with `torch.utils.flop_counter.FlopCounterMode` (matmuls,
  convolutions and attention, forward and backward), and the achieved FLOP/s as a fraction of the
  card's *measured* peak (a large bf16 matmul, 8192³; on CPU an fp32 matmul) — the MFU;
- peak memory (`torch.cuda.max_memory_allocated`, GPU only).

Generation is compared in the same run with the reference code's way (a fresh pipeline and LoRA per
class, batch 10, fp16). From the figures it estimates GPU-hours for a full 16-shot run of each of the
paper's ten datasets (docs/method.md): 400 adapt steps × classes / steps/s + 500 images × classes
/ images/s + 60 classify epochs × 500 images × classes / images/s.

Speed options are flags (`--compile`, `--channels-last`, `--attention`, `--gen-batch`); `--try-all`
measures each of them against the baseline in the same run (adapt and generate, the stages that
dominate the GPU-hours) and reports which wins. Under a time budget (`--budget-s`; 420 s by default for
`--preset real --try-all`) it measures the options most likely to matter first and reports the ones
that no longer fit as skipped.

    .venv/bin/python benchmarks/gpu.py                        # tiny models on CPU, CI-sized (< 1 min)
    .venv/bin/python benchmarks/gpu.py --preset real          # SD 2.1 base + ViT-B/16, GPU, bf16
    .venv/bin/python benchmarks/gpu.py --preset real --try-all

The table goes to stdout, logs to stderr, the JSON to benchmarks/results/gpu.json (tiny:
gpu-tiny.json) unless --json says otherwise. `--preset real` without CUDA is skipped with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# benchmarks/ is not a package: stages.py, beside this file, is imported through sys.path.
from stages import (
    REFERENCE_BATCH,
    Figure,
    device_info,
    make_dataset,
    measure_adapt,
    measure_classify,
    measure_generate,
    measure_generate_reference,
    prepare_models,
    rate_from_two_runs,
    seeded,
    tile_manifest,
    timed,
    with_,
    write_json,
)

log = logging.getLogger("benchmarks.gpu")

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The paper's ten datasets and their class counts (docs/method.md, "Datasets").
PAPER_DATASETS: dict[str, int] = {
    "ImageNet": 1000,
    "Caltech101": 100,
    "DTD": 47,
    "EuroSAT": 10,
    "FGVC-Aircraft": 100,
    "Food101": 101,
    "Flowers102": 102,
    "Oxford-IIIT Pets": 37,
    "Stanford Cars": 196,
    "SUN397": 397,
}

# A full 16-shot run per class (docs/method.md): 200 epochs × ceil(16 / 8) = 400 SD LoRA steps; 500 images
# at 50 steps, guidance 2.0; CLIP trained 60 epochs (datadream/presets/paper.yaml) on the 500·N synthetic images.
PAPER_WORKLOAD = {"adapt_steps_per_class": 400, "images_per_class": 500, "classify_epochs": 60}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "config": "tiny",
        "overrides": ["generate.guidance_scale=2.0"],
        "classes": 2,
        "images_per_class": (4, 8),  # two generate runs; rate from the difference
        "gen_batch": 4,
        "try_batches": (2, 4, 8),
        "steps": 4,
        "adapt_steps": (2, 8),
        "classify_epochs": (1, 2),
        "classify_images": 512,
        "image_size": 64,
        "peak_matmul": 1024,  # CPU fp32 matmul side for the peak
        "text_classes": (10, 100),
    },
    "real": {
        "config": "paper",
        "overrides": [
            "models.sd=sd21-base-random",  # SD 2.1 base architecture, random init (no download)
            "models.clip=ViT-B-16",
            "models.clip_pretrained=null",  # ViT-B/16 at random init
            "run.precision=bf16",
            "generate.resolution=512",
            "adapt.resolution=512",
            "generate.guidance_scale=2.0",
        ],
        # Trimmed so that the baseline (model builds included) fits 180 s on one H100/H200: at the issue's
        # rates (3 steps/s, 3 img/s, ≥ 80 img/s) the timed work is ≈ 10 + 15 + 10 + 25 s plus warm-ups.
        # Not yet measured on a GPU with these sizes.
        "classes": 2,
        "images_per_class": (10, 20),
        "gen_batch": 10,
        "try_batches": (10, 20),
        "steps": 50,
        "adapt_steps": (5, 25),
        "classify_epochs": (1, 2),
        "classify_images": 1024,
        "image_size": 256,
        "peak_matmul": 8192,  # bf16 8192³
        "text_classes": (100, 1000),
    },
}


# What a GPU session gives `--preset real --try-all`: the whole run, the baseline included, in 7 minutes.
TRY_ALL_BUDGET_S = 420.0

# --- options -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """Speed options: the config's run.compile / run.channels_last / run.attention and the generation batch."""

    compile: bool = False  # run.compile
    channels_last: bool = False  # run.channels_last
    attention: str = "sdpa"  # run.attention (sdpa, flash, classic; see datadream/config.py)
    gen_batch: int | None = None  # generate.batch_size for our generation

    def label(self) -> str:
        parts = [f"attention={self.attention}"]
        if self.compile:
            parts.append("compile")
        if self.channels_last:
            parts.append("channels-last")
        if self.gen_batch is not None:
            parts.append(f"batch {self.gen_batch}")
        return ", ".join(parts)


def option_overrides(opts: Options) -> dict[str, Any]:
    """The run.* config settings behind `opts`: the stages apply them themselves (datadream.models.sd,
    datadream.models.clip), so the benchmark measures the code path users get."""
    return {"compile": opts.compile, "channels_last": opts.channels_last, "attention": opts.attention}


# --- FLOPs and peak ------------------------------------------------------------------------------------------


def count_flops(fn, *args, **kwargs) -> int:
    """Model FLOPs of fn (forward and backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def measure_peak_flops(n: int, iters: int = 10) -> dict[str, Any]:
    """The device's achievable FLOP/s: an n×n×n matmul (bf16 on CUDA, fp32 on CPU), best of a few rounds."""
    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if not cuda:
        iters = max(2, iters // 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with torch.inference_mode():
        a @ b  # warm-up (kernel selection, thread pool)
        best = math.inf
        for _ in range(3):
            _, t = timed(lambda: [a @ b for _ in range(iters)])
            best = min(best, t)
    flops_s = 2 * n**3 * iters / best
    return {"flops_s": flops_s, "how": f"{n}³ {str(dtype).removeprefix('torch.')} matmul on {device}, "
            f"{iters} iterations, best of 3", "n": n, "dtype": str(dtype), "device": device}


def adapt_flops_per_step(config, fewshot_dir: Path, work: Path) -> float:
    """FLOPs of one class-wise SD LoRA step: adapt.run at max_steps 1 and 2, difference / classes."""
    from datadream.data.manifest import read_classes
    from datadream.stages import adapt

    n_classes = len(read_classes(fewshot_dir / "classes.json"))
    flops = []
    for s in (1, 2):
        cfg = with_(config, adapt={"mode": "class", "max_steps": s, "epochs": 10_000, "checkpoint_every": 10**8})
        seeded(cfg)
        flops.append(count_flops(adapt.run, cfg, fewshot_dir, work / f"flops-adapters-{s}"))
    return (flops[1] - flops[0]) / n_classes


def generate_flops_per_image(config) -> float:
    """FLOPs of one generated image: one pipeline call for a single image at the configured steps and
    guidance (text encoding, 2 UNet passes per step with guidance > 1, VAE decode). The adapter's rank-r
    LoRA terms are left out (under 1% at rank 16)."""
    import torch

    from datadream.models.sd import load_sd_pipeline
    from datadream.runtime import autocast_dtype, resolve_device

    device = resolve_device(config.run)
    g = config.generate
    pipe = load_sd_pipeline(config.models, dtype=autocast_dtype(config.run, device)).to(device)
    size = g.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor

    def one() -> None:
        with torch.inference_mode():
            pipe(prompt=["a photo of a thing"], num_inference_steps=g.steps, guidance_scale=g.guidance_scale,
                 height=size, width=size, generator=torch.Generator().manual_seed(0), output_type="pt")

    return float(count_flops(one))


def classify_flops_per_image(config, fewshot_dir: Path, synthetic: Path, work: Path) -> float:
    """FLOPs per training image of the CLIP LoRA classifier: classify.run for 1 and 2 epochs on two batches
    of images, difference / images (validation, identical in both runs, cancels)."""
    from datadream.stages import classify

    n = 2 * config.classify.batch_size
    tiled = work / "flops-synthetic"
    tile_manifest(synthetic / "manifest.jsonl", tiled / "manifest.jsonl", n)
    flops = []
    for e in (1, 2):
        cfg = with_(config, classify={"train_on": "synthetic", "epochs": e, "val_every": 10**5})
        seeded(cfg)
        flops.append(count_flops(classify.run, cfg, fewshot_dir, tiled, work / f"flops-classifier-{e}"))
    return (flops[1] - flops[0]) / n


def measure_clip_model_rate(config, iters: int | None = None) -> Figure:
    """The classifier model's own training rate: image tower forward + backward on random tensors at the
    classify batch, LoRA on, autocast as the stage runs it; no data loading and no augmentation. The
    classify row is compared with it (the issue's target: ≥ 75%)."""
    import torch
    import torch.nn.functional as F

    from datadream.models.clip import add_clip_lora, apply_speed_options, load_clip, lora_parameters
    from datadream.runtime import autocast_dtype, resolve_device

    device = resolve_device(config.run)
    amp = autocast_dtype(config.run, device)
    model, _, preprocess = load_clip(config.models, device)
    model = add_clip_lora(model, config.classify).to(device)
    apply_speed_options(model, config.run, device)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    size = preprocess["image_size"]
    b = config.classify.batch_size
    x = torch.randn(b, 3, size, size, device=device)
    head = F.normalize(torch.randn(10, model.visual.output_dim, device=device), dim=-1)
    labels = torch.randint(0, 10, (b,), device=device)
    iters = iters or (20 if device.type == "cuda" else 3)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = 100 * F.normalize(model.encode_image(x), dim=-1) @ head.t()
        F.cross_entropy(logits.float(), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    for _ in range(3):
        step()  # warm-up
    _, t = timed(lambda: [step() for _ in range(iters)])
    rate = b * iters / t
    return Figure("classify model fwd+bwd", rate, "img/s",
                  f"{config.models.clip} image tower forward + backward with LoRA, batch {b}, random tensors, "
                  "no loading or augmentation: the ceiling for the classify row", {"iters": iters, "batch": b})


def measure_text_features(config, class_counts: tuple[int, int]) -> Figure:
    """Seconds per classify step of the class text features (forward + backward through the text tower's
    LoRA, context cut to the longest prompt) at two class counts; the estimate uses the line through them."""
    import torch

    from datadream.models.clip import add_clip_lora, encode_text, load_clip, trim_tokens
    from datadream.runtime import autocast_dtype, resolve_device

    device = resolve_device(config.run)
    amp = autocast_dtype(config.run, device)
    model, tokenizer, _ = load_clip(config.models, device)
    model = add_clip_lora(model, config.classify).to(device)
    model.train()
    seconds = []
    for n in class_counts:
        tokens = trim_tokens(model, tokenizer([config.data.prompt(f"class number {i}") for i in range(n)])).to(device)

        def step(tokens=tokens) -> None:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                feats = encode_text(model, tokens)
            feats.float().square().mean().backward()

        step()
        iters = 5 if device.type == "cuda" else 1
        _, t = timed(lambda step=step, iters=iters: [step() for _ in range(iters)])
        seconds.append(t / iters)
    (c0, c1), (s0, s1) = class_counts, seconds
    slope = (s1 - s0) / (c1 - c0)
    intercept = s0 - slope * c0
    return Figure("classify text features", s1, "s/step",
                  f"text tower fwd+bwd per step at {c1} classes ({s0:.3g} s at {c0}); recomputed every step",
                  {"classes": list(class_counts), "seconds": seconds, "slope_s_per_class": slope,
                   "intercept_s": intercept})


def text_seconds_per_step(details: dict):
    """Seconds of text features per classify step at c classes: the line through the two measurements."""
    return lambda c: max(0.0, details["intercept_s"] + details["slope_s_per_class"] * c)


# --- estimate ------------------------------------------------------------------------------------------------


def estimate_gpu_hours(classes: int, *, adapt_steps_s: float, generate_img_s: float, classify_img_s: float,
                       adapt_steps_per_class: int = PAPER_WORKLOAD["adapt_steps_per_class"],
                       images_per_class: int = PAPER_WORKLOAD["images_per_class"],
                       classify_epochs: int = PAPER_WORKLOAD["classify_epochs"],
                       classify_text_s_per_step=None, classify_batch: int = 64) -> dict[str, float]:
    """GPU-hours of a full run on a dataset of `classes` classes, from per-GPU rates.

    adapt = steps/class × classes / steps/s; generate = images/class × classes / images/s;
    classify = epochs × images/class × classes / images/s (trained on the synthetic set), plus, with
    `classify_text_s_per_step` (seconds of the class text features' forward and backward as a function of
    the class count), that cost at `classes` for each of the epochs × images / batch steps: the text tower
    trains, so its features are recomputed every step, and at 1,000 classes that is no longer small. Fixed
    costs (model loads, adapter swaps, validation) are left out: they are minutes, not hours, at this scale.
    """
    adapt_h = adapt_steps_per_class * classes / adapt_steps_s / 3600
    generate_h = images_per_class * classes / generate_img_s / 3600
    images = classify_epochs * images_per_class * classes
    classify_h = images / classify_img_s / 3600
    text_h = 0.0
    if classify_text_s_per_step is not None:
        text_h = math.ceil(images / classify_batch) * classify_text_s_per_step(classes) / 3600
    return {"classes": classes, "adapt_h": adapt_h, "generate_h": generate_h, "classify_h": classify_h + text_h,
            "classify_text_h": text_h, "total_h": adapt_h + generate_h + classify_h + text_h}


# --- measurements --------------------------------------------------------------------------------------------


def measure_generate_rate(config, fewshot_dir: Path, adapters: Path, work: Path,
                          per_class: tuple[int, int]) -> tuple[Figure, Figure, Path]:
    """Our generation (one pipeline, adapters swapped per class) at two images-per-class counts.

    Returns the rate (Δimages / Δt, pipeline load and swaps removed), the larger run end to end (what the
    reference is compared with) and the larger run's synthetic folder.
    """
    runs = []
    for ipc in per_class:
        cfg = with_(config, generate={"images_per_class": ipc})
        runs.append(measure_generate(cfg, fewshot_dir, adapters, work / f"generate-{ipc}"))
    (small, _), (large, synthetic) = runs
    rate, fixed = rate_from_two_runs((small.details["images"], large.details["images"]),
                                     (small.details["seconds"], large.details["seconds"]))
    g = config.generate
    details = {"images": [small.details["images"], large.details["images"]],
               "seconds": [small.details["seconds"], large.details["seconds"]], "fixed_s": fixed,
               "batch_size": g.batch_size, "steps": g.steps, "guidance_scale": g.guidance_scale,
               "dtype": large.details["dtype"], "peak_gpu_gib": large.details["peak_gpu_gib"]}
    figure = Figure("generate (ours)", rate, "img/s",
                    f"one pipeline, adapter swap, batch {g.batch_size}, {g.steps} steps, guidance "
                    f"{g.guidance_scale}, {details['dtype'].removeprefix('torch.')}; Δ of {per_class[0]}→"
                    f"{per_class[1]} images/class (load {fixed:.2f} s removed)", details)
    return figure, large, synthetic


def with_mfu(figure: Figure, flops_per_unit: float, peak: float | None) -> Figure:
    achieved = figure.value * flops_per_unit
    mfu = achieved / peak if peak and achieved == achieved else None
    figure.details.update({"flops_per_unit": flops_per_unit, "achieved_flops_s": achieved, "mfu": mfu})
    return figure


def warm_up(opts: Options, stage: str, fn) -> None:
    """Run the stage once, small and untimed, before every timed pair: the first run of a process pays for
    cuDNN/cuBLAS autotuning, allocator growth and (with compile) the graphs, which would otherwise land in
    only one of the two timed runs and skew their difference (0.95 vs 3 adapt steps/s measured)."""
    log.info("%s: warm-up run (untimed)", stage)
    fn()


def config_for(base, opts: Options):
    cfg = with_(base, run=option_overrides(opts))
    return with_(cfg, generate={"batch_size": opts.gen_batch}) if opts.gen_batch else cfg


def try_row(variant: str, figure: Figure | None = None, *, error: str | None = None,
            skipped: str | None = None) -> dict[str, Any]:
    """One --try-all row: a measured figure, or why there is none (an error, or skipped for the time budget)."""
    return {"variant": variant, "value": figure.value if figure else None, "unit": figure.unit if figure else None,
            "peak_gpu_gib": figure.details.get("peak_gpu_gib") if figure else None, "error": error,
            "skipped": skipped}


def try_variant(name: str, fn) -> dict[str, Any]:
    """Run one --try-all measurement; a failure (OOM, no flash kernel, no compiler) is recorded, not fatal."""
    log.info("try-all: %s", name)
    try:
        return try_row(name, fn())
    except Exception as e:  # any failure of an option is a result to report, not a crash
        log.warning("try-all: %s failed: %s: %s", name, type(e).__name__, e)
        with contextlib.suppress(Exception):
            import torch

            torch._dynamo.reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return try_row(name, error=f"{type(e).__name__}: {e}"[:500])


# The options in the order --try-all measures them, each for adapt and then generate: the ones most likely to
# change the paper preset's settings first, so that a time budget drops the least useful rows.
TRY_OPTIONS: tuple[tuple[str, Options], ...] = (
    ("compile", Options(compile=True)),
    ("channels-last", Options(channels_last=True)),
    ("attention=flash", Options(attention="flash")),
    ("attention=classic (no SDPA)", Options(attention="classic")),
)


def try_all_plan(preset: dict[str, Any], base: Options, reuse_baseline: bool) -> list[tuple[str, str, Options]]:
    """(stage, variant, options) in measuring order. The baseline is measured first unless the main run's
    figures can stand for it (`reuse_baseline`: same settings, same workloads); generation batch sizes come
    after the options, and the baseline again last, which gauges the noise of the whole run."""
    plain = Options(gen_batch=base.gen_batch)
    plan = [] if reuse_baseline else [("adapt", "baseline", plain), ("generate", "baseline", plain)]
    for name, opts in TRY_OPTIONS:
        plan += [("adapt", name, opts), ("generate", name, replace(opts, gen_batch=base.gen_batch))]
    plan += [("generate", f"batch {b}", Options(gen_batch=b)) for b in preset["try_batches"] if b != base.gen_batch]
    plan.append(("generate", "baseline, again", plain))
    return plan


def run_try_all(config, args, fewshot_dir: Path, adapters: Path, work: Path, base: Options,
                on_row=None, *, main_figures: dict[str, Figure] | None = None,
                estimate_s: dict[str, float] | None = None, deadline: float | None = None,
                clock=time.monotonic) -> dict[str, Any]:
    """Each option against the baseline, in one process. `main_figures` are the main run's adapt and generate
    rates: they stand for the baseline when the main run used no option. With a `deadline`
    (a `clock()` value), a variant starts only if its stage's `estimate_s` (the main run's warm-up and timed
    pair) still fits; the others are reported as skipped."""
    preset = PRESETS[args.preset]
    per_class = (min(args.images_per_class), max(max(args.images_per_class), *preset["try_batches"]))
    reuse = main_figures is not None and replace(base, gen_batch=None) == Options() \
        and per_class == tuple(args.images_per_class)
    results: dict[str, Any] = {"adapt": [], "generate": []}
    if reuse:
        for stage in results:
            results[stage].append(try_row(f"{stage} baseline (the main run)", main_figures[stage]))

    for stage, name, opts in try_all_plan(preset, base, reuse):
        label = f"{stage} {name}"
        need = (estimate_s or {}).get(stage, 0.0)
        if deadline is not None and clock() + need > deadline:
            left = max(0.0, deadline - clock())
            log.info("try-all: %s skipped: %.0f s left of the time budget, about %.0f s needed", label, left, need)
            results[stage].append(try_row(label, skipped=f"time budget: {left:.0f} s left, ~{need:.0f} s needed"))
            continue
        cfg = config_for(config, opts)
        if stage == "adapt":
            def fig(cfg=cfg, name=name, opts=opts) -> Figure:
                warm_up(opts, "adapt", lambda: measure_adapt(cfg, fewshot_dir, work / f"try-adapt-{name}-warm",
                                                             (1, 2)))
                figs, _ = measure_adapt(cfg, fewshot_dir, work / f"try-adapt-{name}", tuple(args.adapt_steps))
                return figs[0]
        else:
            def fig(cfg=cfg, name=name, opts=opts) -> Figure:
                warm_up(opts, "generate", lambda: measure_generate(
                    with_(cfg, generate={"images_per_class": 1}), fewshot_dir, adapters,
                    work / f"try-generate-{name}-warm"))
                return measure_generate_rate(cfg, fewshot_dir, adapters, work / f"try-generate-{name}", per_class)[0]
        results[stage].append(try_variant(label, fig))
        if on_row is not None:
            on_row({"try_all": results})

    winners = {}
    for stage in ("adapt", "generate"):
        ok = [r for r in results[stage] if r["value"] is not None and r["value"] == r["value"]]
        if ok:
            best = max(ok, key=lambda r: r["value"])
            baseline = next((r["value"] for r in ok if " baseline" in r["variant"]), None)
            winners[stage] = {"variant": best["variant"], "value": best["value"],
                              "vs_baseline": best["value"] / baseline if baseline else None}
    # The baseline measured at the start (or in the main run) and again at the end: their gap gauges the noise.
    same = [r["value"] for r in results["generate"]
            if r["value"] is not None and r["value"] == r["value"] and " baseline" in r["variant"]]
    if len(same) == 2 and min(same) > 0:
        winners["generate_repeat_spread"] = max(same) / min(same) - 1
    results["winners"] = winners
    return results


def run_benchmark(config, args, work: Path, opts: Options, on_row=None) -> dict[str, Any]:
    from datadream.stages import fewshot

    preset = PRESETS[args.preset]
    setup: dict[str, float] = {"prepare_models_s": prepare_models(config)}
    log.info("measuring peak FLOP/s")
    peak = measure_peak_flops(args.peak_matmul or preset["peak_matmul"])
    log.info("peak: %.3g FLOP/s (%s)", peak["flops_s"], peak["how"])
    peak_flops = peak["flops_s"]
    dataset, setup["dataset_s"] = timed(make_dataset, work, args.classes, preset["image_size"], 0)
    fewshot_dir, setup["fewshot_s"] = timed(fewshot.run, config, dataset, work / "fewshot")
    ours_config = config_for(config, opts)
    partial_rows: list[Figure] = []

    def finished(*figs: Figure) -> None:  # each finished row reaches the JSON at once
        partial_rows.extend(figs)
        if on_row is not None:
            on_row({"figures": partial_rows, "peak": peak, "setup": setup})

    spent: dict[str, float] = {}  # each stage's warm-up and timed pair: what a --try-all variant will cost
    log.info("adapt (%s)", opts.label())
    t0 = time.monotonic()
    warm_up(opts, "adapt", lambda: measure_adapt(ours_config, fewshot_dir, work / "adapt-warm", (1, 2)))
    adapt_figs, adapters = measure_adapt(ours_config, fewshot_dir, work / "adapt", tuple(args.adapt_steps))
    spent["adapt"] = time.monotonic() - t0
    finished(*adapt_figs)
    log.info("generate, ours (%s)", opts.label())
    t0 = time.monotonic()
    warm_up(opts, "generate", lambda: measure_generate(
        with_(ours_config, generate={"images_per_class": 1}), fewshot_dir, adapters, work / "generate-warm"))
    gen_rate, gen_end_to_end, synthetic = measure_generate_rate(
        ours_config, fewshot_dir, adapters, work / "generate", tuple(args.images_per_class))
    spent["generate"] = time.monotonic() - t0
    finished(gen_rate)
    log.info("generate, the reference code's way")
    ref_config = with_(config, generate={"images_per_class": max(args.images_per_class)})
    reference = measure_generate_reference(ref_config, fewshot_dir, adapters, work / "reference")
    finished(reference)
    log.info("classify (%s)", opts.label())
    warm_up(opts, "classify", lambda: measure_classify(ours_config, fewshot_dir, synthetic, work / "classify-warm",
                                                       (1, 2), 2 * config.classify.batch_size))
    classify_figs, _ = measure_classify(ours_config, fewshot_dir, synthetic, work / "classify",
                                        tuple(args.classify_epochs), args.classify_images)
    model_fig = measure_clip_model_rate(ours_config)
    text_fig = measure_text_features(ours_config, preset["text_classes"])
    finished(*classify_figs, model_fig, text_fig)

    log.info("counting FLOPs (FlopCounterMode)")
    flops = {
        "adapt_per_step": adapt_flops_per_step(config, fewshot_dir, work / "flops"),
        "generate_per_image": generate_flops_per_image(config),
        "classify_per_image": classify_flops_per_image(config, fewshot_dir, synthetic, work / "flops"),
    }
    adapt_fig = with_mfu(adapt_figs[0], flops["adapt_per_step"], peak_flops)
    gen_rate = with_mfu(gen_rate, flops["generate_per_image"], peak_flops)
    reference = with_mfu(reference, flops["generate_per_image"], peak_flops)
    classify_fig = with_mfu(classify_figs[0], flops["classify_per_image"], peak_flops)
    ours_e2e = gen_end_to_end.value
    speedup = Figure("generate speed-up", ours_e2e / reference.value, "×",
                     f"ours / reference, end to end on the same {reference.details['images']} images "
                     f"(ours {ours_e2e:.3g} img/s, one load; reference {reference.value:.3g} img/s, a load per "
                     f"class); {gen_rate.value / reference.details['generation_only_img_s']:.2f}× without loads",
                     {"ours_end_to_end_img_s": ours_e2e, "ours_rate_img_s": gen_rate.value,
                      "reference_img_s": reference.value,
                      "reference_generation_only_img_s": reference.details["generation_only_img_s"]})
    classify_fig.details["vs_model_rate"] = classify_fig.value / model_fig.value
    classify_fig.notes += f"; {100 * classify_fig.value / model_fig.value:.0f}% of the model's own fwd+bwd rate"
    figures = [adapt_fig, adapt_figs[1], gen_rate, reference, speedup, classify_fig, classify_figs[1], model_fig,
               text_fig]

    rates = {"adapt_steps_s": adapt_fig.value, "generate_img_s": gen_rate.value, "classify_img_s": classify_fig.value,
             "classify_batch": config.classify.batch_size}
    estimate = {
        "basis": f"{args.preset} preset figures on {device_info()['device']}"
        + ("" if args.preset == "real" else " (tiny models: the numbers only exercise the arithmetic)"),
        "workload": dict(PAPER_WORKLOAD),
        "rates": rates,
        "reference_generate_img_s": reference.details["generation_only_img_s"],
        "datasets": {name: estimate_gpu_hours(n, **rates, classify_text_s_per_step=text_seconds_per_step(
            text_fig.details)) for name, n in PAPER_DATASETS.items()},
        "text_features": text_fig.details,
    }

    def stage(fig: Figure) -> dict[str, Any]:
        return {"value": fig.value, "unit": fig.unit, "flops_per_unit": fig.details.get("flops_per_unit"),
                "achieved_flops_s": fig.details.get("achieved_flops_s"), "mfu": fig.details.get("mfu"),
                "peak_gpu_gib": fig.details.get("peak_gpu_gib")}

    result = {
        "peak": peak,
        "flops": flops,
        "stages": {
            "adapt": stage(adapt_fig) | {"steps_s": adapt_fig.value},
            "generate": {"ours": stage(gen_rate) | {"img_s": gen_rate.value, "end_to_end_img_s": ours_e2e},
                         "reference": stage(reference) | {"img_s": reference.value},
                         "speedup": speedup.value},
            "classify": stage(classify_fig) | {"img_s": classify_fig.value, "model_img_s": model_fig.value,
                                               "vs_model_rate": classify_fig.details["vs_model_rate"]},
        },
        "figures": figures,
        "estimate": estimate,
        "setup": {k: round(v, 2) for k, v in setup.items()},
    }
    if on_row is not None:
        on_row({k: v for k, v in result.items() if k != "setup"})
    if args.try_all:
        result["try_all"] = run_try_all(config, args, fewshot_dir, adapters, work, opts, on_row,
                                        main_figures={"adapt": adapt_fig, "generate": gen_rate},
                                        estimate_s=spent, deadline=args.deadline)
    return result


# --- report --------------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None or x != x else format(x, spec)


def format_tables(result: dict[str, Any], device: str) -> str:
    rows = [("stage", "figure", "unit", "GFLOP/unit", "MFU", "peak GiB", "notes")]
    for f in result["figures"]:
        d = f.details
        fpu = d.get("flops_per_unit")
        mfu = d.get("mfu")
        rows.append((f.stage, _fmt(f.value), f.unit, _fmt(fpu / 1e9 if fpu else None),
                     "n/a" if mfu is None else f"{100 * mfu:.1f}%", _fmt(d.get("peak_gpu_gib")), f.notes))
    lines = [f"DataDream GPU benchmark on {device}",
             f"peak {result['peak']['flops_s'] / 1e12:.3g} TFLOP/s measured ({result['peak']['how']})", ""]
    lines += _columns(rows)
    est = result["estimate"]
    lines += ["", f"Estimated GPU-hours, full 16-shot run per dataset ({est['basis']}):",
              f"400 adapt steps, 500 images and {PAPER_WORKLOAD['classify_epochs']} classify epochs per class", ""]
    erows = [("dataset", "classes", "adapt h", "generate h", "classify h", "of which text h", "total h")]
    for name, e in est["datasets"].items():
        erows.append((name, str(e["classes"]), *(_fmt(e[k], ".3g") for k in (
            "adapt_h", "generate_h", "classify_h", "classify_text_h", "total_h"))))
    lines += _columns(erows)
    if "try_all" in result:
        lines += ["", "--try-all (same run):", ""]
        trows = [("variant", "figure", "unit", "peak GiB", "error")]
        for stage in ("adapt", "generate"):
            for r in result["try_all"][stage]:
                note = r["error"] or (f"skipped ({r['skipped']})" if r["skipped"] else "")
                trows.append((r["variant"], _fmt(r["value"]), r["unit"] or "", _fmt(r["peak_gpu_gib"]), note[:80]))
        lines += _columns(trows)
        winners = result["try_all"]["winners"]
        spread = winners.get("generate_repeat_spread")
        for stage, w in winners.items():
            if not isinstance(w, dict):
                continue
            lines.append(f"winner, {stage}: {w['variant']} ({_fmt(w['value'])}; "
                         f"{_fmt(w['vs_baseline'], '.2f')}× the baseline)")
        if spread is not None:
            lines.append(f"noise: the baseline measured at the start and again at the end differs by "
                         f"{100 * spread:.0f}%; smaller gaps between variants are not a win")
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
        if j == 0:
            out.append("  ".join("-" * w for w in widths) + "  -----")
    return out


# --- main ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/gpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="tiny",
                   help="tiny: tiny random-init models on CPU, CI-sized; real: SD 2.1 base (512 px) and CLIP "
                   "ViT-B/16 at random init, bf16, needs CUDA (skipped with a message without it)")
    p.add_argument("--json", type=Path, help="results file (default benchmarks/results/gpu.json for real, "
                   "gpu-tiny.json for tiny)")
    p.add_argument("--out", type=Path, help="empty or new folder for scratch artifacts (default: a temporary "
                   "folder, deleted afterwards)")
    p.add_argument("--classes", type=int, help="classes of the demo dataset, 1..6")
    p.add_argument("--images-per-class", type=int, nargs=2, metavar=("A", "B"),
                   help="the two generate.images_per_class values whose difference gives our img/s")
    p.add_argument("--steps", type=int, help="denoising steps (the paper: 50)")
    p.add_argument("--adapt-steps", type=int, nargs=2, metavar=("A", "B"), help="two adapt.max_steps values")
    p.add_argument("--classify-epochs", type=int, nargs=2, metavar=("E1", "E2"), help="two classify.epochs values")
    p.add_argument("--classify-images", type=int, help="training images per classify epoch (synthetic set tiled)")
    p.add_argument("--peak-matmul", type=int, help="side n of the n³ matmul that measures peak FLOP/s")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and the CLIP towers")
    p.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels-last memory format")
    p.add_argument("--attention", choices=("sdpa", "flash", "classic"), default="sdpa",
                   help="SD attention: sdpa (diffusers' default, torch picks the kernel), flash (SDPA limited to "
                   "flash-attention, math where flash cannot run; CUDA), classic (diffusers' AttnProcessor, no SDPA)")
    p.add_argument("--gen-batch", type=int, help="generate.batch_size of our generation (the tuned batch)")
    p.add_argument("--try-all", action="store_true", help="also measure each option against the baseline in "
                   "this run (adapt and generate; and generation batch sizes) and report which wins")
    p.add_argument("--budget-s", type=float, metavar="S", help="wall-time budget of the whole run, model builds "
                   "included: --try-all starts a variant only while the main run's time for its stage still fits, "
                   f"and reports the rest as skipped (default {TRY_ALL_BUDGET_S:.0f} with --preset real --try-all, "
                   "else none)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="extra config override (repeatable)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    p.add_argument("--progress", action="store_true", help="show the stages' progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    t_start = time.monotonic()
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.budget_s is None and args.try_all and args.preset == "real":
        args.budget_s = TRY_ALL_BUDGET_S
    if args.budget_s is not None and not args.budget_s > 0:
        parser.error(f"--budget-s {args.budget_s}: need a positive number of seconds")
    args.deadline = None if args.budget_s is None else t_start + args.budget_s
    for key in ("classes", "images_per_class", "steps", "adapt_steps", "classify_epochs", "classify_images",
                "gen_batch"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if not 1 <= args.classes <= 6:
        parser.error(f"--classes {args.classes}: the demo dataset has 6 classes; choose 1..6")
    for name in ("images_per_class", "adapt_steps", "classify_epochs"):
        a, b = getattr(args, name)
        if not 0 < a < b:
            parser.error(f"--{name.replace('_', '-')} {a} {b}: need 0 < A < B")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out}: not empty (stages skip finished outputs, so a re-run would time nothing)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.progress:
        os.environ["TQDM_DISABLE"] = "1"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for name in ("benchmarks", "datadream"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preset == "real" and not torch.cuda.is_available():
        msg = "skipped: --preset real needs a CUDA GPU (SD 2.1 base at 512 px would take hours on CPU); " \
              "run --preset tiny here, or this command on a GPU machine"
        log.warning("%s", msg)
        sys.stdout.write(msg + "\n")
        return 0

    from datadream.config import load_config
    from datadream.errors import UserError

    try:
        config = load_config(preset["config"], overrides=[*preset["overrides"], f"generate.steps={args.steps}",
                                                          *args.overrides])
    except UserError as e:
        log.error("%s", e)
        return 2
    opts = Options(compile=args.compile, channels_last=args.channels_last, attention=args.attention,
                   gen_batch=args.gen_batch)

    started = datetime.now(UTC)
    scratch = args.out or Path(tempfile.mkdtemp(prefix="datadream-gpu-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    json_path = args.json or RESULTS_DIR / ("gpu.json" if args.preset == "real" else f"gpu-{args.preset}.json")
    device = device_info()
    log.info("GPU benchmark, preset %s on %s, torch %s; options: %s", args.preset, device["device"],
             device["torch"], opts.label())
    header = {"benchmark": "gpu", "preset": args.preset, "started_at": started.isoformat(timespec="seconds"),
              "device": device, "options": asdict(opts)}
    progress: dict[str, Any] = {}

    def on_row(part: dict[str, Any]) -> None:
        """Write what is finished so far, so a run cut off by a time limit still leaves its rows."""
        progress.update(part)
        rows = {k: v for k, v in progress.items() if k != "figures"}
        write_json(json_path, json.loads(json.dumps(
            {**header, "partial": True, **rows, "figures": [asdict(f) for f in progress.get("figures", [])]},
            default=str)))

    try:
        result = run_benchmark(config, args, scratch, opts, on_row)
    except UserError as e:
        log.error("%s", e)
        return 2
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)
    finished = datetime.now(UTC)

    payload = {
        "benchmark": "gpu",
        "preset": args.preset,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "wall_s": round((finished - started).total_seconds(), 1),
        "device": device,
        "options": asdict(opts),
        "settings": {k: getattr(args, k) for k in ("classes", "images_per_class", "steps", "adapt_steps",
                                                   "classify_epochs", "classify_images", "threads", "try_all",
                                                   "budget_s")}
        | {"overrides": args.overrides, "reference_batch": REFERENCE_BATCH, **result["setup"]},
        **{k: v for k, v in result.items() if k not in ("figures", "setup")},
        "figures": [asdict(f) for f in result["figures"]],
        "config": config.to_dict(),
    }
    write_json(json_path, json.loads(json.dumps(payload, default=str)))
    sys.stdout.write(format_tables(result, device["device"]) + "\n")
    log.info("results -> %s", json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
