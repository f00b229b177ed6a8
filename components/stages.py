"""The pipeline's steps as plain functions; `components.build(image)` makes them KFP components.

Each is a *lightweight* component: KFP ships only the function's source, so every import is inside
the body, and the image (which has `datadream` installed) provides the rest. Each function only maps
KFP artifacts and parameters onto one `datadream.stages` call. The docstrings are what the Kubeflow
UI shows for each step.
"""

from typing import NamedTuple

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def fewshot(
    dataset: str,
    shots: int,
    seed: int,
    shards: int,
    mode: str,
    preset: str,
    config: str,
    fewshot_set: Output[Dataset],
) -> NamedTuple("FewShotOutputs", [("data_hash", str), ("shard_list", list[str])]):
    """Sample `shots` real images per class from `dataset` (an ImageFolder path).

    Args:
        dataset: ImageFolder root, DATA/<class>/<image> or DATA/{train,val,test}/<class>/<image>;
            "demo" makes the procedural demo dataset.
        shots: real images per class (k).
        seed: sampling seed.
        shards: how many class shards the GPU steps fan out over (the number of GPUs to use).
        mode: the run's adaptation mode, checked here before any GPU step starts.
        preset: base settings, paper or tiny.
        config: YAML text layered on the preset (any section of the config).
        fewshot_set: the FewShotSet: classes.json, train/val/test manifests, the shots themselves.

    Returns:
        data_hash: sha256 of the three manifests; downstream steps take it so caching follows content.
        shard_list: shard names "I/N" for the fan-out, at most one per class.
    """
    import json
    from collections import namedtuple
    from pathlib import Path

    from datadream.config import load_config
    from datadream.io import sha256_json
    from datadream.stages import fewshot as stage

    cfg = load_config(preset, text=config, overrides=[f"fewshot.shots={shots}", f"fewshot.seed={seed}",
                                                      f"adapt.mode={mode}"])
    if dataset == "demo":
        import tempfile

        from datadream.data.demo import make_demo_dataset

        dataset = make_demo_dataset(Path(tempfile.mkdtemp(prefix="datadream-demo-")) / "dataset", seed=0)
    out = stage.run(cfg, dataset, fewshot_set.path)
    summary = json.loads((Path(out) / "fewshot.json").read_text())
    n = max(1, min(shards, summary["classes"]))
    fewshot_set.metadata.update({"classes": summary["classes"], "shots": shots, "seed": seed,
                                 "rejected": summary["rejected"]["total"]})
    outputs = namedtuple("FewShotOutputs", ["data_hash", "shard_list"])
    return outputs(sha256_json(summary["manifest_sha256"]), [f"{i}/{n}" for i in range(n)])


def adapt(
    fewshot_set: Input[Dataset],
    data_hash: str,
    mode: str,
    shard: str,
    sd_model: str,
    preset: str,
    config: str,
    adapters: Output[Model],
):
    """LoRA fine-tuning of Stable Diffusion (UNet + text encoder) on the few-shot images; GPU.

    Args:
        fewshot_set: the FewShotSet from the fewshot step.
        data_hash: content hash of the few-shot manifests (keys the cache on content).
        mode: "class" (one adapter per class of this shard) or "dataset" (one adapter for all classes).
        shard: "I/N" to train only the classes of shard I (class-wise fan-out); "" for all.
        sd_model: Stable Diffusion Hugging Face id or folder (e.g. stabilityai/stable-diffusion-2-1-base).
        preset: base settings, paper or tiny.
        config: YAML text layered on the preset.
        adapters: diffusers-format LoRA weights per class (or one for the dataset) + adapter.json.
    """
    from datadream.config import load_config
    from datadream.stages import adapt as stage

    cfg = load_config(preset, text=config, overrides=[f"adapt.mode={mode}", f"models.sd={sd_model}"])
    stage.run(cfg, fewshot_set.path, adapters.path, shard=shard or None)
    adapters.metadata.update({"mode": mode, "shard": shard, "base_model": sd_model, "rank": cfg.adapt.rank,
                              "data_hash": data_hash})


def generate(
    fewshot_set: Input[Dataset],
    adapters: Input[Model],
    shard: str,
    images_per_class: int,
    sd_model: str,
    preset: str,
    config: str,
    synthetic: Output[Dataset],
):
    """Generate `images_per_class` images for each class of `shard` with the adapted SD; GPU.

    Args:
        fewshot_set: the FewShotSet (classes and prompts).
        adapters: the adapters of this shard (class-wise) or the dataset adapter.
        shard: "I/N": which classes to generate.
        images_per_class: synthetic images per class (the paper: 500).
        sd_model: the Stable Diffusion model the adapters were trained on.
        preset: base settings, paper or tiny.
        config: YAML text layered on the preset.
        synthetic: the SyntheticSet of this shard: images + manifest.jsonl (prompt, seed, adapter).
    """
    from datadream.config import load_config
    from datadream.stages import generate as stage

    cfg = load_config(preset, text=config,
                      overrides=[f"generate.images_per_class={images_per_class}", f"models.sd={sd_model}"])
    stage.run(cfg, fewshot_set.path, adapters.path, synthetic.path, shard=shard or None)
    synthetic.metadata.update({"shard": shard, "images_per_class": images_per_class})


def gather(shards: Input[list[Dataset]], synthetic: Output[Dataset]):
    """Gather the synthetic images of every class shard into one SyntheticSet.

    Args:
        shards: the SyntheticSets of the generate fan-out.
        synthetic: all classes' images and one manifest.
    """
    from datadream.stages import generate as stage

    stage.merge([s.path for s in shards], synthetic.path)
    synthetic.metadata["shards"] = len(shards)


def classify(
    fewshot_set: Input[Dataset],
    synthetic: Input[Dataset],
    train_on: str,
    clip_model: str,
    clip_pretrained: str,
    preset: str,
    config: str,
    classifier: Output[Model],
):
    """Fine-tune CLIP with LoRA into a classifier; the epoch is chosen on the val split; GPU.

    Args:
        fewshot_set: the FewShotSet (real shots, val split).
        synthetic: the gathered SyntheticSet.
        train_on: "synthetic", "synthetic+real", "real" (baseline) or "zero-shot" (no training).
        clip_model: open_clip model name (e.g. ViT-B-16).
        clip_pretrained: open_clip pretrained tag or weights file (e.g. openai); "" for none.
        preset: base settings, paper or tiny.
        config: YAML text layered on the preset.
        classifier: LoRA + class head as safetensors, classifier.json (classes, model, preprocessing).
    """
    from datadream.config import load_config
    from datadream.stages import classify as stage

    overrides = [f"models.clip={clip_model}", f"models.clip_pretrained={clip_pretrained or 'null'}"]
    if train_on == "zero-shot":
        overrides += ["classify.train_on=real", "classify.epochs=0"]
    else:
        overrides += [f"classify.train_on={train_on}"]
    cfg = load_config(preset, text=config, overrides=overrides)
    stage.run(cfg, fewshot_set.path, synthetic.path, classifier.path)
    classifier.metadata.update({"train_on": train_on, "clip_model": clip_model})


def evaluate(
    fewshot_set: Input[Dataset],
    classifier: Input[Model],
    synthetic: Input[Dataset],
    train_on: str,
    mode: str,
    preset: str,
    config: str,
    scores: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
):
    """Evaluate the classifier on the real test split; CPU or GPU.

    Args:
        fewshot_set: the FewShotSet (test split).
        classifier: the classify step's classifier.
        synthetic: the SyntheticSet it was trained on (sample images for the report).
        train_on: the classifier's training data, for labels.
        mode: the adaptation mode, for labels.
        preset: base settings, paper or tiny.
        config: YAML text layered on the preset.
        scores: metrics.json (top-1, top-5, per-class, confusion matrix) + confusion.csv + setting.json.
        metrics: top-1, top-5 and mean per-class accuracy, shown in the UI.
        confusion: the confusion matrix, shown in the UI.
        report: results table, per-class accuracy and a sample grid per class.
    """
    import json
    import shutil
    from pathlib import Path

    from datadream.config import load_config
    from datadream.io import atomic_write_json
    from datadream.report import render_html, write_report
    from datadream.stages import evaluate as stage

    cfg = load_config(preset, text=config)
    work = Path(scores.path)
    result = stage.run(cfg, classifier.path, Path(fewshot_set.path) / "test.jsonl", work)
    setting = {"train_on": train_on, "mode": mode,
               "label": train_on if train_on in ("zero-shot", "real") else f"{train_on} ({mode}-wise)"}
    atomic_write_json(work / "setting.json", setting)
    shutil.copyfile(Path(classifier.path) / "classifier.json", work / "classifier.json")
    for name in ("top1", "top5", "mean_per_class"):
        metrics.log_metric(name, float(result[name]))
    confusion.log_confusion_matrix(result["classes"], result["confusion"])
    clf = json.loads((work / "classifier.json").read_text())
    html = render_html(f"DataDream — {setting['label']}",
                       [{"setting": setting["label"], "metrics": result, "classifier": clf}],
                       synthetic_dir=synthetic.path, fewshot_dir=fewshot_set.path)
    write_report(report.path, html)


def summarize(scores: Input[list[Artifact]], synthetic: Input[Dataset], fewshot_set: Input[Dataset],
              report: Output[HTML]):
    """One report for the run: every classifier's results side by side, and the synthetic samples.

    Args:
        scores: the evaluate steps' scores.
        synthetic: the gathered SyntheticSet.
        fewshot_set: the FewShotSet.
        report: results table, per-class accuracy, confusion matrix and sample grid.
    """
    import json
    from pathlib import Path

    from datadream.report import render_html, write_report

    results = []
    for s in scores:
        d = Path(s.path)
        setting = json.loads((d / "setting.json").read_text())
        results.append({"setting": setting["label"], "metrics": json.loads((d / "metrics.json").read_text()),
                        "classifier": json.loads((d / "classifier.json").read_text())})
    write_report(report.path, render_html("DataDream run", results, synthetic_dir=synthetic.path,
                                          fewshot_dir=fewshot_set.path))
