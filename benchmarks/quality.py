"""What assessing the synthetic set (assess.enabled) costs next to generating it.

Two figures, side by side:

1. Measured: `generate.run` on the demo dataset twice, with assessment off and on (same adapters, same
   images), on this machine's device. The assessment's own clock (CLIP load, features of every synthetic
   image, shot and val image, quality.json; `generate.json` → assess.seconds) against the whole stage,
   and the difference of the two wall times.
2. Estimated at the paper's settings: model FLOPs of one generated image (SD 2.1 base, 512 px, 50 steps,
   classifier-free guidance = 2 UNet passes per step, VAE decode) and of one CLIP ViT-B/16 image embedding
   at 224 px, counted by torch's FlopCounterMode on the meta device (shapes only: no weights, no time).
   Per class the assessment embeds images_per_class synthetic images plus the shots and the val images.

    .venv/bin/python benchmarks/quality.py                 # tiny models on CPU, about a minute
    .venv/bin/python benchmarks/quality.py --threads 1     # steadier on a shared CPU

The table goes to stdout, the JSON to benchmarks/results/quality-<device>.json unless --json says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("benchmarks.quality")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model or 'unknown model'}), no GPU"


def measure(classes: int, images_per_class: int, steps: int, work: Path, repeats: int) -> dict:
    """generate.run with assess off and on (tiny preset on CPU, the paper preset's models on GPU)."""
    import torch

    from datadream.config import load_config
    from datadream.data.demo import make_demo_dataset
    from datadream.stages import adapt, fewshot, generate

    gpu = torch.cuda.is_available()
    overrides = ["adapt.mode=dataset", "adapt.max_steps=2", f"generate.images_per_class={images_per_class}",
                 f"generate.steps={steps}"]
    if gpu:  # real sizes at random init: the cost does not depend on the weights
        overrides += ["models.sd=sd21-base-random", "models.clip=ViT-B-16", "models.clip_pretrained=null",
                      "adapt.resolution=512"]
    preset = "paper" if gpu else "tiny"
    cfg = load_config(preset, overrides=overrides)
    dataset = make_demo_dataset(work / "dataset", seed=0)  # 6 classes; a shard keeps about `classes` of them
    fs = fewshot.run(cfg, dataset, work / "fewshot")
    ad = adapt.run(cfg, fs, work / "adapters")
    shard = f"0/{max(1, _n_classes(fs) // classes)}"  # about `classes` classes
    seconds: dict[str, float] = {"on": float("inf"), "off": float("inf")}
    assess_s = float("inf")
    # On and off alternate, each from scratch into its own folder (model loading paid by both); the best of
    # `repeats` of each, because other processes on a shared machine only ever add time.
    for r in range(repeats):
        for label in ("on", "off"):
            c = load_config(preset, overrides=[*overrides, f"assess.enabled={str(label == 'on').lower()}"])
            t0 = time.perf_counter()
            out = generate.run(c, fs, ad, work / f"synthetic-{label}-{r}", shard=shard)
            seconds[label] = min(seconds[label], time.perf_counter() - t0)
            if label == "on":
                summary = json.loads((out / generate.MARKER).read_text())
                assess_s = min(assess_s, summary["assess"]["seconds"])
    return {"device": machine(), "preset": preset, "images": summary["images"], "steps": steps,
            "generate_off_s": seconds["off"], "generate_on_s": seconds["on"],
            "assess_s": assess_s, "repeats": repeats, "images_embedded": summary["assess"]["images_embedded"]}


def _n_classes(fewshot_dir: Path) -> int:
    return len(json.loads((fewshot_dir / "classes.json").read_text()))


def paper_flops(shots: int = 16, val_per_class: int = 50) -> dict:
    """Model FLOPs per synthetic image: generation vs the CLIP embedding, at the paper's settings."""
    import open_clip
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from datadream.config import Config
    from datadream.models.sd import SD21_BASE_RANDOM_CONFIG as SD

    def count(fn) -> float:
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            fn()
        return float(counter.get_total_flops())

    paper = Config()
    g = paper.generate
    latent = g.resolution // 8 if g.resolution else SD["unet"]["sample_size"]
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD["unet"]), AutoencoderKL(**SD["vae"])
        clip = open_clip.create_model(paper.models.clip, pretrained=None, device="meta")
        passes = 2 if g.guidance_scale > 1 else 1  # classifier-free guidance: unconditional + conditional
        unet_step = count(lambda: unet(torch.randn(passes, 4, latent, latent), torch.tensor([1] * passes),
                                       torch.randn(passes, 77, SD["unet"]["cross_attention_dim"])))
        decode = count(lambda: vae.decode(torch.randn(1, 4, latent, latent)))
        size = clip.visual.image_size
        size = size[0] if isinstance(size, tuple | list) else size
        embed = count(lambda: clip.encode_image(torch.randn(1, 3, size, size)))
    generate = g.steps * unet_step + decode
    per_class = g.images_per_class + shots + val_per_class
    return {"generate_flops_per_image": generate, "clip_flops_per_image": embed,
            "ratio_synthetic_only": embed / generate,
            "ratio_with_shots_and_val": embed * per_class / (generate * g.images_per_class),
            "settings": {"steps": g.steps, "guidance_scale": g.guidance_scale, "latent": latent,
                         "images_per_class": g.images_per_class, "clip": paper.models.clip, "clip_px": size,
                         "shots": shots, "val_per_class": val_per_class}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example: .venv/bin/python benchmarks/quality.py --threads 1")
    p.add_argument("--classes", type=int, default=3, help="classes to generate (default 3)")
    p.add_argument("--images-per-class", type=int, default=12, help="synthetic images per class (default 12)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4; the paper: 50)")
    p.add_argument("--repeats", type=int, default=2, help="runs with assessment on and off each; best kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json", type=Path, default=None, help="where to write the figures as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="datadream-bench-quality-") as tmp:
        measured = measure(args.classes, args.images_per_class, args.steps, Path(tmp), args.repeats)
    flops = paper_flops()
    share = measured["assess_s"] / measured["generate_on_s"]
    extra = (measured["generate_on_s"] - measured["generate_off_s"]) / measured["generate_off_s"]
    rows = [
        ("machine", measured["device"]),
        (f"generate, assess off ({measured['images']} images, {measured['steps']} steps), s",
         f"{measured['generate_off_s']:.2f}"),
        ("generate, assess on, s", f"{measured['generate_on_s']:.2f}"),
        (f"assessment's own clock ({measured['images_embedded']} images embedded), s", f"{measured['assess_s']:.2f}"),
        ("assessment / generate stage (measured)", f"{100 * share:.2f}%"),
        (f"wall-time difference on vs off (best of {measured['repeats']})", f"{100 * extra:+.1f}%"),
        ("paper settings: generate FLOPs per image", f"{flops['generate_flops_per_image'] / 1e12:.1f} TFLOP"),
        ("paper settings: CLIP ViT-B/16 FLOPs per image", f"{flops['clip_flops_per_image'] / 1e9:.1f} GFLOP"),
        ("paper settings: assessment / generate (FLOPs)", f"{100 * flops['ratio_synthetic_only']:.3f}%"),
        ("  with 16 shots + 50 val images per class", f"{100 * flops['ratio_with_shots_and_val']:.3f}%"),
    ]
    width = max(len(k) for k, _ in rows)
    sys.stdout.write("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + "\n")
    out = args.json or RESULTS_DIR / f"quality-{'gpu' if torch.cuda.is_available() else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"measured": measured, "paper_flops": flops, "assess_share": share,
                               "wall_difference": extra}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
