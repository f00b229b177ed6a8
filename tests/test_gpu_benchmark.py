"""benchmarks/gpu.py: the tiny preset runs end to end on CPU with only what a bare GPU machine has, and the
GPU-hour estimate is right."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gpu_machine
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _load_gpu_module():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_estimate_gpu_hours_by_hand():
    gpu = _load_gpu_module()
    # 100 classes: adapt 400·100 = 40,000 steps at 4 steps/s = 10,000 s; generate 500·100 = 50,000 images
    # at 10 img/s = 5,000 s; classify 60·50,000 = 3,000,000 images at 1,000 img/s = 3,000 s.
    e = gpu.estimate_gpu_hours(100, adapt_steps_s=4.0, generate_img_s=10.0, classify_img_s=1000.0)
    assert e["classes"] == 100
    assert e["adapt_h"] == pytest.approx(10_000 / 3600)
    assert e["generate_h"] == pytest.approx(5_000 / 3600)
    assert e["classify_h"] == pytest.approx(3_000 / 3600)
    assert e["total_h"] == pytest.approx(18_000 / 3600)
    # The workload is a parameter: 2 classes, 10 steps, 3 images, 1 epoch.
    e = gpu.estimate_gpu_hours(2, adapt_steps_s=1.0, generate_img_s=1.0, classify_img_s=1.0,
                               adapt_steps_per_class=10, images_per_class=3, classify_epochs=1)
    assert e["total_h"] == pytest.approx((20 + 6 + 6) / 3600)
    assert set(gpu.PAPER_DATASETS) >= {"ImageNet", "Flowers102"} and len(gpu.PAPER_DATASETS) == 10
    # The class text features are recomputed every classify step, at a cost that grows with the class count:
    # 100 classes, 1 ms per class per step, 3,000,000 images / 64 = 46,875 steps of 0.1 s = 4,687.5 s.
    e = gpu.estimate_gpu_hours(100, adapt_steps_s=4.0, generate_img_s=10.0, classify_img_s=1000.0,
                               classify_text_s_per_step=lambda c: 0.001 * c, classify_batch=64)
    assert e["classify_text_h"] == pytest.approx(46_875 * 0.1 / 3600)
    assert e["classify_h"] == pytest.approx((3_000 + 4_687.5) / 3600)
    assert e["total_h"] == pytest.approx((18_000 + 4_687.5) / 3600)


def test_the_gpu_machine_lacks_the_control_plane_libraries(tmp_path):
    # The simulation is what makes the run below mean "works on the GPU machine": it must hide what is missing
    # there (mlflow, kfp, optuna, boto3, kubernetes) and keep what is there.
    script = tmp_path / "imports.py"
    script.write_text("import importlib.util, sys\n"
                      "print(importlib.util.find_spec(sys.argv[1]) is not None)\n"
                      "__import__(sys.argv[1])\n")
    for name in ("mlflow", "kfp", "optuna", "boto3", "kubernetes"):
        proc = subprocess.run(gpu_machine.command(script, name), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and proc.stdout == "False\n", name
        assert f"ModuleNotFoundError: import of {name} halted" in proc.stderr, name
    for name in ("torch", "diffusers", "open_clip", "peft", "pydantic", "datadream.stages.generate"):
        proc = subprocess.run(gpu_machine.command(script, name), capture_output=True, text=True, timeout=120)
        assert (proc.returncode, proc.stdout) == (0, "True\n"), (name, proc.stderr[-2000:])


@pytest.mark.slow
def test_tiny_preset_runs_on_cpu_with_only_what_the_gpu_machine_has(tmp_path):
    out = tmp_path / "gpu.json"
    env = os.environ | {"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "DATADREAM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        gpu_machine.command(SCRIPT, "--preset", "tiny", "--threads", "1", "--json", out),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    stages = data["stages"]

    def positive(x) -> bool:
        return isinstance(x, int | float) and math.isfinite(x) and x > 0

    assert positive(stages["adapt"]["steps_s"])
    assert positive(stages["generate"]["ours"]["img_s"])
    assert positive(stages["classify"]["img_s"])
    for key in ("adapt_per_step", "generate_per_image", "classify_per_image"):
        assert positive(data["flops"][key]), key
    assert positive(data["peak"]["flops_s"])

    # The reference-vs-ours generation comparison is in the same run.
    gen = stages["generate"]
    assert positive(gen["reference"]["img_s"]) and positive(gen["speedup"])
    stage_names = {f["stage"] for f in data["figures"]}
    assert {"generate (ours)", "generate (reference)", "generate speed-up"} <= stage_names

    datasets = data["estimate"]["datasets"]
    assert len(datasets) == 10
    for name, e in datasets.items():
        for key in ("adapt_h", "generate_h", "classify_h", "total_h"):
            assert positive(e[key]), (name, key)
    assert datasets["ImageNet"]["total_h"] > datasets["Flowers102"]["total_h"]
    # Everything but the text features scales with the class count; those grow faster (more steps, and more
    # classes per step), so ImageNet's total is at least the linear share.
    def linear(e):
        return e["total_h"] - e["classify_text_h"]

    assert linear(datasets["ImageNet"]) / linear(datasets["Flowers102"]) == pytest.approx(1000 / 102)
    assert datasets["ImageNet"]["classify_text_h"] >= 0
    stage_rows = {f["stage"]: f for f in data["figures"]}
    assert positive(stages["classify"]["model_img_s"]) and "classify model fwd+bwd" in stage_rows
    assert positive(stage_rows["classify text features"]["value"])
    assert "partial" not in data  # the last write is the whole result

    # The table went to stdout; progress went to the log (stderr).
    assert "generate (reference)" in proc.stdout and "ImageNet" in proc.stdout
    assert "benchmarks.gpu" in proc.stderr
