"""The pipeline's steps as plain functions; `components.build(image)` makes them KFP components.

Each is a *lightweight* component: KFP ships only the function's source, so every import is inside
the body, and the image (which has `datadream` installed) provides the rest. Each function only maps
KFP artifacts and parameters onto one `datadream.steps` call. The docstrings are what the Kubeflow
UI shows for each step. A step with several outputs returns a plain tuple in the order of its
NamedTuple's fields, which KFP's executor accepts as it accepts the NamedTuple.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def fewshot(
    dataset: str, shots: int, seed: int, shards: int, mode: str, images_per_class: int, sd_model: str,
    clip_model: str, clip_pretrained: str, register_name: str, kfp_run_id: str, preset: str, config: str,
    fewshot_set: Output[Dataset],
) -> NamedTuple("FewShotOutputs", [("data_hash", str), ("shard_list", list[str]), ("mlflow_run", str)]):
    """Sample `shots` real images per class from `dataset` (an ImageFolder path).

    Args:
        dataset: ImageFolder root, DATA/<class>/<image> or DATA/{train,val,test}/<class>/<image>;
            "demo" makes the procedural demo dataset.
        shots: real images per class (k).
        seed: sampling seed.
        shards: how many class shards the GPU steps fan out over (the number of GPUs to use).
        mode, images_per_class, sd_model, clip_model, clip_pretrained: the run's settings that are
            pipeline parameters; checked here before any GPU step, and part of the config logged to MLflow.
        register_name: when set, the run is tracked in the MLflow experiment of that name: the tracking
            store is checked here, before any GPU step, and the run's parent MLflow run is opened.
        kfp_run_id: the KFP run, tagged on the MLflow run (a retry finds its run again by it).
        preset, config: base settings (paper or tiny) and YAML text layered on them (any section).
        fewshot_set: the FewShotSet: classes.json, train/val/test manifests, the shots themselves.
    Returns:
        data_hash: sha256 of the three manifests; downstream steps take it so caching follows content.
        shard_list: shard names "I/N" for the fan-out, at most one per class.
        mlflow_run: id of the run's parent MLflow run, which every later step logs under ("" = untracked).
    """
    from datadream import steps
    from pipelines.parameters import config_overrides

    with steps.final_user_errors(fewshot_set.uri):
        cfg = steps.resolve_config(preset, config, config_overrides(
            shots=shots, seed=seed, mode=mode, images_per_class=images_per_class, sd_model=sd_model,
            clip_model=clip_model, clip_pretrained=clip_pretrained))
        parent = steps.start_pipeline(cfg, register_name, kfp_run_id, dataset, mode) if register_name else ""
        out = steps.fewshot(cfg, dataset, fewshot_set.path, steps.in_pipeline(parent))
    n = max(1, min(shards, out.meta["classes"]))
    fewshot_set.metadata.update({"classes": out.meta["classes"], "shots": shots, "seed": seed,
                                 "rejected": out.meta["rejected"]["total"]})
    return (out.data_hash, [f"{i}/{n}" for i in range(n)], parent)


def adapt(
    fewshot_set: Input[Dataset], data_hash: str, mode: str, shard: str, sd_model: str, preset: str, config: str,
    mlflow_run: str, adapters: Output[Model],
):
    """LoRA fine-tuning of Stable Diffusion (UNet + text encoder) on the few-shot images; GPU.

    Args:
        fewshot_set: the FewShotSet from the fewshot step.
        data_hash: content hash of the few-shot manifests (keys the cache on content).
        mode: "class" (one adapter per class of this shard) or "dataset" (one adapter for all classes).
        shard: "I/N" to train only the classes of shard I (class-wise fan-out); "" for all.
        sd_model: Stable Diffusion Hugging Face id or folder (e.g. stabilityai/stable-diffusion-2-1-base).
        preset, config: base settings (paper or tiny) and YAML text layered on them.
        mlflow_run: the parent MLflow run from the fewshot step; "" = untracked.
        adapters: diffusers-format LoRA weights per class (or one for the dataset) + adapter.json.
    """
    from datadream import steps

    with steps.final_user_errors(adapters.uri):
        cfg = steps.resolve_config(preset, config, [f"adapt.mode={mode}", f"models.sd={sd_model}"])
        steps.adapt(cfg, fewshot_set.path, adapters.path, shard, steps.in_pipeline(mlflow_run))
    adapters.metadata.update({"mode": mode, "shard": shard, "base_model": sd_model, "rank": cfg.adapt.rank,
                              "data_hash": data_hash})


def generate(
    fewshot_set: Input[Dataset], adapters: Input[Model], shard: str, images_per_class: int, sd_model: str,
    preset: str, config: str, mlflow_run: str, synthetic: Output[Dataset],
):
    """Generate `images_per_class` images for each class of `shard` with the adapted SD; GPU.

    Args:
        fewshot_set: the FewShotSet (classes and prompts).
        adapters: the adapters of this shard (class-wise) or the dataset adapter.
        shard: "I/N": which classes to generate.
        images_per_class: synthetic images per class (the paper: 500).
        sd_model: the Stable Diffusion model the adapters were trained on.
        preset, config: base settings (paper or tiny) and YAML text layered on them.
        mlflow_run: the parent MLflow run from the fewshot step; "" = untracked.
        synthetic: the SyntheticSet of this shard: images + manifest.jsonl (prompt, seed, adapter).
    """
    from datadream import steps

    with steps.final_user_errors(synthetic.uri):
        overrides = [f"generate.images_per_class={images_per_class}", f"models.sd={sd_model}"]
        steps.generate(steps.resolve_config(preset, config, overrides), fewshot_set.path, adapters.path,
                       synthetic.path, shard, steps.in_pipeline(mlflow_run))
    synthetic.metadata.update({"shard": shard, "images_per_class": images_per_class})


def gather(shards: Input[list[Dataset]], mlflow_run: str, synthetic: Output[Dataset], quality: Output[Metrics]):
    """Gather the synthetic images of every class shard into one SyntheticSet, and show its quality.

    Args:
        shards: the SyntheticSets of the generate fan-out.
        mlflow_run: the parent MLflow run ("" = untracked); gather's run gets the quality metrics and the
            per-class table, the parent synthetic_class_agreement and synthetic_fd_clip.
        synthetic: all classes' images, one manifest, quality.json (measured with the base CLIP).
        quality: the synthetic set's overall quality (class agreement, CLIPScore, diversity, near copies,
            FD to the val split, precision and recall), shown in the UI.
    """
    from datadream import steps

    _, metrics = steps.gather([s.path for s in shards], synthetic.path, steps.in_pipeline(mlflow_run))
    synthetic.metadata["shards"] = len(shards)
    for name, value in metrics.items():
        quality.log_metric(name, value)


def gather_adapters(shards: Input[list[Model]], adapters: Output[Model]):
    """Gather the class-wise adapters of every shard into one Adapters folder with one index.

    Args:
        shards: the adapt fan-out's outputs.
        adapters: every class's LoRA + one adapter.json index.
    """
    from datadream import steps

    steps.gather_adapters([s.path for s in shards], adapters.path)
    adapters.metadata["shards"] = len(shards)


def classify(
    fewshot_set: Input[Dataset], synthetic: Input[Dataset], train_on: str, clip_model: str, clip_pretrained: str,
    preset: str, config: str, mlflow_run: str, classifier: Output[Model],
):
    """Fine-tune CLIP with LoRA into a classifier; the epoch is chosen on the val split; GPU.

    Args:
        fewshot_set: the FewShotSet (real shots, val split).
        synthetic: the gathered SyntheticSet.
        train_on: "synthetic", "synthetic+real", "real" (baseline) or "zero-shot" (no training).
        clip_model, clip_pretrained: open_clip model name (ViT-B-16) and pretrained tag or weights file ("" = none).
        preset, config: base settings (paper or tiny) and YAML text layered on them.
        mlflow_run: the parent MLflow run from the fewshot step; "" = untracked.
        classifier: LoRA + class head as safetensors, classifier.json (classes, model, preprocessing).
    """
    from datadream import steps

    with steps.final_user_errors(classifier.uri):
        overrides = [f"models.clip={clip_model}", f"models.clip_pretrained={clip_pretrained or 'null'}"]
        cfg = steps.resolve_config(preset, config, overrides)
        steps.classify(steps.classify_config(cfg, train_on), fewshot_set.path, synthetic.path, classifier.path,
                       steps.in_pipeline(mlflow_run), name=f"classify {train_on}")
    classifier.metadata.update({"train_on": train_on, "clip_model": clip_model})


def evaluate(
    fewshot_set: Input[Dataset], classifier: Input[Model], synthetic: Input[Dataset], train_on: str, mode: str,
    preset: str, config: str, mlflow_run: str, scores: Output[Artifact], metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics], report: Output[HTML],
):
    """Evaluate the classifier on the real test split; CPU or GPU.

    Args:
        fewshot_set: the FewShotSet (test split).
        classifier: the classify step's classifier.
        synthetic: the SyntheticSet it was trained on (sample images for the report).
        train_on, mode: the classifier's training data and the adaptation mode, for labels.
        preset, config: base settings (paper or tiny) and YAML text layered on them.
        mlflow_run: the parent MLflow run from the fewshot step; "" = untracked.
        scores: metrics.json (top-1, top-5, per-class, confusion matrix) + confusion.csv + setting.json.
        metrics: top-1, top-5 and mean per-class accuracy, shown in the UI.
        confusion: the confusion matrix, shown in the UI.
        report: results table, per-class accuracy and a sample grid per class.
    """
    from datadream import steps

    with steps.final_user_errors(scores.uri):
        result = steps.evaluate(steps.resolve_config(preset, config), classifier.path, fewshot_set.path, scores.path,
                                tracking=steps.in_pipeline(mlflow_run), name=f"evaluate {train_on}",
                                tags={"train_on": train_on})
    result.attach(classifier.path, steps.setting_label(train_on, mode))
    for name in ("top1", "top5", "mean_per_class"):
        metrics.log_metric(name, float(result.meta[name]))
    confusion.log_confusion_matrix(result.meta["classes"], result.meta["confusion"])
    steps.summarize([scores.path], synthetic.path, fewshot_set.path, report.path,
                    title=f"DataDream — {result.setting()['label']}",
                    run={"mode": mode, "gate": "decided after every classifier is evaluated (the run's summary)"})


def summarize(scores: Input[list[Artifact]], synthetic: Input[Dataset], fewshot_set: Input[Dataset], mode: str,
              decision: str, classifier_version: str, kfp_run_id: str, mlflow_run: str, report: Output[HTML]):
    """One report for the run: its facts and gate decision, every classifier's results side by side,
    confusion matrices and the synthetic samples; each classifier's test accuracy on the parent run.

    Args:
        scores, synthetic, fewshot_set: the evaluate steps' scores, the gathered SyntheticSet, the FewShotSet.
        mode: the adaptation mode.
        decision: the register step's gate decision ("skipped" when nothing was registered).
        classifier_version: the registered classifier version ("" when none).
        kfp_run_id: the KFP run.
        mlflow_run: the parent MLflow run; the report is logged to it as report.html and each classifier's
            test top-1/top-5 as its metrics ("" = untracked).
        report: run facts, results table, per-class accuracy, confusion matrices and sample grid.
    """
    from datadream import steps

    steps.summarize([s.path for s in scores], synthetic.path, fewshot_set.path, report.path,
                    steps.in_pipeline(mlflow_run),
                    run={"mode": mode, "gate": decision, "classifier_version": classifier_version or None,
                         "kfp_run_id": kfp_run_id, "mlflow_run_id": mlflow_run or None})


def register(
    fewshot_set: Input[Dataset], adapters: Input[Model], scores: Input[list[Artifact]], register_name: str,
    dataset: str, data_hash: str, mode: str, shots: int, seed: int, sd_model: str, clip_model: str,
    clip_pretrained: str, promote_margin: float, promote_floor: float, kfp_run_id: str, mlflow_run: str,
    deploy: bool = False, serving_image: str = "", serving_namespace: str = "datadream-serving",
) -> NamedTuple("RegisterOutputs", [("classifier_version", str), ("adapters_version", str), ("decision", str)]):
    """Register the adapters and the best classifier in MLflow; the gate decides on `champion`.

    The classifier with the best *val* top-1 among this run's is registered as
    `<register_name>-classifier` (alias `candidate`, lineage and test metrics as tags); it becomes
    `champion` only if its test top-1 reaches `promote_floor` and beats the current champion by more
    than `promote_margin`. The adapters become a version of `<register_name>-sd-lora`. Tracking goes to
    $MLFLOW_TRACKING_URI (from the datadream-config ConfigMap). An empty `register_name` skips it.

    Args:
        fewshot_set: the FewShotSet (lineage: its manifest hashes).
        adapters: the run's SD LoRA adapters (all classes, one index).
        scores: the evaluate steps' outputs (metrics, setting, classifier).
        register_name: registry prefix; "" = do not register.
        dataset, data_hash, mode, shots, seed, sd_model, clip_model, clip_pretrained: lineage tags.
        promote_margin, promote_floor: how much better than the champion, and how good at least, a candidate must be.
        kfp_run_id: the KFP run, for lineage.
        mlflow_run: the run's parent MLflow run (registration is its "register" child, and it is
            finished here); "" = find or open it by kfp_run_id.
        deploy: when the gate promotes, serve the new champion in `serving_namespace` with `serving_image`
            (the pipeline-runner needs the datadream-deployer Role there); a failed rollout moves the
            champion back, reported in `decision` (the step succeeds: a retry would register again).
    Returns:
        classifier_version, adapters_version: the new registry versions ("" when skipped).
        decision: the gate's decision ("promoted", "rejected: …", or "skipped"), then the deploy's outcome.
    """
    from datadream import steps

    lineage = {"dataset": dataset, "data_hash": data_hash, "shots": shots, "seed": seed, "mode": mode,
               "sd_model": sd_model, "clip_model": clip_model, "clip_pretrained": clip_pretrained,
               "kfp_run_id": kfp_run_id}
    r = steps.register(register_name, fewshot_set.path, adapters.path, [s.path for s in scores], lineage,
                       promote_margin, promote_floor, parent=mlflow_run)
    decision = r.decision
    if deploy and r.gate:
        from datadream.serving.deploy import deploy_after_gate
        from datadream.serving.manifests import ServingSettings

        settings = ServingSettings(namespace=serving_namespace, image=serving_image or None)
        decision += f"; {deploy_after_gate(register_name, r.gate, settings=settings)}"
    return (r.classifier_version, r.adapters_version, decision)


def tune_prepare(
    dataset: str, shots: int, seed: int, mode: str, sd_model: str, clip_model: str, clip_pretrained: str,
    study: str, storage: str, workers: int, register_name: str, preset: str, config: str,
    fewshot_set: Output[Dataset],
) -> NamedTuple("TunePrepareOutputs", [("run_config", str), ("worker_list", list[str])]):
    """Check the search settings and the study storage, sample the few-shot set, create the study.

    Args:
        dataset: ImageFolder path or URI; "demo" = the procedural demo dataset.
        shots, seed, mode, sd_model, clip_model, clip_pretrained: as in the datadream pipeline.
        study: Optuna study name (one campaign; re-running resumes it).
        storage: study storage URL without a password; "" = $OPTUNA_STORAGE from the datadream-secrets Secret.
        workers: parallel worker tasks (GPUs).
        register_name: the campaign's MLflow experiment is <register_name>-tune, checked and created
            here (before the workers start at once); "" = no MLflow.
        preset, config: base settings (paper or tiny) and YAML text layered on them (tune.search, …).
        fewshot_set: the FewShotSet every trial trains on.
    Returns:
        run_config: `config` with the pipeline's parameters folded in, for the workers.
        worker_list: one entry per worker, for the fan-out.
    """
    from datadream import tuning
    from pipelines.parameters import config_overrides

    overrides = config_overrides(shots=shots, seed=seed, mode=mode, sd_model=sd_model, clip_model=clip_model,
                                 clip_pretrained=clip_pretrained)
    return tuple(tuning.pipeline_prepare(preset, config, overrides, dataset, study, storage, workers,
                                         register_name, fewshot_set.path))


def tune_worker(
    fewshot_set: Input[Dataset], study: str, storage: str, trials: int, worker: str, register_name: str,
    preset: str, run_config: str,
):
    """One search worker on one GPU: runs trials until the study holds `trials` finished ones.

    Args:
        fewshot_set: the FewShotSet from tune_prepare.
        study: Optuna study name.
        storage: study storage URL; "" = $OPTUNA_STORAGE.
        trials: finished trials the campaign should reach (all workers together).
        worker: this worker's index (for the logs).
        register_name: the campaign is tracked in MLflow experiment <register_name>-tune; "" = no MLflow.
        preset, run_config: base settings (paper or tiny) and the campaign's settings from tune_prepare.
    """
    from datadream import tuning

    tuning.pipeline_worker(study, storage, trials, worker, register_name, preset, run_config, fewshot_set.path)


def tune_best(
    study: str, storage: str, preset: str, run_config: str, best: Output[Artifact],
) -> NamedTuple("TuneBestOutputs", [("config", str), ("best_value", float), ("best_trial", int)]):
    """Write the best trial's settings as a config file, and the run's config with them for the next run.

    Args:
        study: Optuna study name.
        storage: study storage URL; "" = $OPTUNA_STORAGE.
        preset: base settings, paper or tiny.
        run_config: the campaign's settings from tune_prepare.
        best: best.yaml, the best settings alone (for `--config` or a scheduled run's `config`).
    Returns:
        config: `run_config` with the best settings layered on (the datadream pipeline's `config`).
        best_value, best_trial: the best val top-1 and its trial number.
    """
    from datadream import tuning

    config, s = tuning.pipeline_best(study, storage, preset, run_config, best.path)
    best.metadata.update({"study": study, "trial": s.best_trial.number, "val_top1": s.best_value})
    return (config, float(s.best_value), int(s.best_trial.number))


def finish(register_name: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """The exit handler: ends the run's MLflow parent run FINISHED, or FAILED naming the failed steps.

    Args:
        register_name, kfp_run_id: the run's MLflow experiment ("" = untracked) and KFP run (its tag).
        status: the pipeline's final state, from KFP.
    """
    from datadream import steps

    steps.close_pipeline(register_name, kfp_run_id, status.state)
