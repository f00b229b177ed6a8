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
    script.write_text(
        "import importlib, importlib.util, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        print(name, importlib.util.find_spec(name) is not None, 'imported')\n"
        "    except ModuleNotFoundError as e:\n"
        "        print(name, importlib.util.find_spec(name) is not None, type(e).__name__, str(e).split(';')[0])\n"
    )
    missing = ("mlflow", "kfp", "optuna", "boto3", "kubernetes")
    present = ("torch", "diffusers", "open_clip", "peft", "pydantic", "datadream.stages.generate")
    proc = subprocess.run(gpu_machine.command(script, *missing, *present), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[:len(missing)] == [f"{n} False ModuleNotFoundError import of {n} halted" for n in missing]
    assert lines[len(missing):] == [f"{n} True imported" for n in present]


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


def _fake_try_all(monkeypatch, gpu, cost_s: float):
    """measure_* stand-ins on a fake clock: each stage measurement costs `cost_s`; compile doubles the rate and
    flash attention fails, as it can on a card without the kernel."""
    now = [0.0]

    def rate(cfg) -> float:
        if cfg.run.attention == "flash":
            raise RuntimeError("No available kernel")
        return 2.0 if cfg.run.compile else 1.0

    def measure_adapt(cfg, fewshot_dir, work, steps):
        now[0] += cost_s / 2
        return [gpu.Figure("adapt", rate(cfg), "steps/s", "")], work

    def measure_generate(cfg, fewshot_dir, adapters, work):  # the warm-up
        now[0] += cost_s / 2
        return gpu.Figure("generate", rate(cfg), "img/s", ""), work

    def measure_generate_rate(cfg, fewshot_dir, adapters, work, per_class):
        now[0] += cost_s / 2
        fig = gpu.Figure("generate", rate(cfg) * (1 + cfg.generate.batch_size / 8), "img/s", "")
        return fig, fig, work

    monkeypatch.setattr(gpu, "measure_adapt", measure_adapt)
    monkeypatch.setattr(gpu, "measure_generate", measure_generate)
    monkeypatch.setattr(gpu, "measure_generate_rate", measure_generate_rate)
    return lambda: now[0]


def test_try_all_measures_the_likeliest_options_first_and_skips_what_the_budget_cannot_fit(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from datadream.config import load_config

    gpu = _load_gpu_module()
    clock = _fake_try_all(monkeypatch, gpu, cost_s=10.0)
    args = SimpleNamespace(preset="tiny", images_per_class=(4, 8), adapt_steps=(2, 8))
    config, base = load_config("tiny"), gpu.Options(gen_batch=4)
    main_figures = {"adapt": gpu.Figure("adapt", 1.0, "steps/s", ""),
                    "generate": gpu.Figure("generate", 1.5, "img/s", "")}

    # No budget: every variant, the main run standing for the baseline, failures recorded, not fatal.
    result = gpu.run_try_all(config, args, tmp_path, tmp_path, tmp_path, base, main_figures=main_figures,
                             estimate_s={"adapt": 10.0, "generate": 10.0}, clock=clock)
    adapt_rows = [r["variant"] for r in result["adapt"]]
    gen_rows = [r["variant"] for r in result["generate"]]
    assert adapt_rows == ["adapt baseline (the main run)", "adapt compile", "adapt channels-last",
                          "adapt attention=flash", "adapt attention=classic (no SDPA)"]
    assert gen_rows[0] == "generate baseline (the main run)" and gen_rows[-1] == "generate baseline, again"
    assert {"generate batch 2", "generate batch 8"} <= set(gen_rows) and "generate batch 4" not in gen_rows
    flash = next(r for r in result["adapt"] if r["variant"] == "adapt attention=flash")
    assert flash["value"] is None and "No available kernel" in flash["error"]
    assert result["winners"]["adapt"] == {"variant": "adapt compile", "value": 2.0, "vs_baseline": 2.0}
    # batch 8: 1 × (1 + 8/8) = 2.0 img/s, below compile's 2 × 1.5 = 3.0
    assert result["winners"]["generate"] == {"variant": "generate compile", "value": 3.0, "vs_baseline": 2.0}
    assert result["winners"]["generate_repeat_spread"] == 0.0  # 1.5 in the main run and again at the end
    assert clock() == 10.0 * 9 + 5.0 * 2  # 11 variants measured; flash fails in its warm-up, half the cost

    # A budget for three variants: compile for both stages and channels-last for adapt, then only skips.
    clock = _fake_try_all(monkeypatch, gpu, cost_s=10.0)
    result = gpu.run_try_all(config, args, tmp_path, tmp_path, tmp_path, base, main_figures=main_figures,
                             estimate_s={"adapt": 10.0, "generate": 10.0}, deadline=35.0, clock=clock)
    measured = [r["variant"] for s in ("adapt", "generate") for r in result[s]
                if not r.get("skipped") and "main run" not in r["variant"]]
    assert sorted(measured) == ["adapt channels-last", "adapt compile", "generate compile"]
    skipped = [r for s in ("adapt", "generate") for r in result[s] if r.get("skipped")]
    assert len(skipped) == 8 and all(r["value"] is None and "time budget" in r["skipped"] for r in skipped)
    assert clock() == 30.0
    table = gpu.format_tables({"figures": [], "peak": {"flops_s": 1e12, "how": "-"},
                               "estimate": {"basis": "-", "datasets": {}}, "try_all": result}, "CPU")
    assert "skipped (time budget" in table and "winner, adapt: adapt compile" in table

    # With an option on in the main run, the baseline is measured first instead of reused.
    plan = gpu.try_all_plan(gpu.PRESETS["tiny"], gpu.Options(compile=True, gen_batch=4), reuse_baseline=False)
    assert plan[:2] == [("adapt", "baseline", gpu.Options(gen_batch=4)), ("generate", "baseline",
                                                                          gpu.Options(gen_batch=4))]
