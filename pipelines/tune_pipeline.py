"""The `datadream-tune` pipeline: a search campaign, then (optionally) a full run with the best settings.

    tune_prepare (CPU: check settings and storage, few-shot set, study)
      → ParallelFor(workers) { tune_worker (GPU: trials against the shared study) }
      → tune_best (CPU: best.yaml, and the run's config with the best settings)
      → if run_best: the `datadream` pipeline with that config; its register step's gate decides
        whether the result becomes champion.

The study storage is shared by all workers (Postgres in the cluster). Its URL comes from
$OPTUNA_STORAGE in the datadream-secrets Secret; the `storage` parameter may name one only when it
holds no password. The fan-out width is the `workers` parameter (tune_prepare returns that many items).
"""

# No `from __future__ import annotations`: KFP reads the pipeline signature's annotations as types.
from pipelines.pipeline import ClusterSettings, build_pipeline, described, on_cpu, on_gpu

PIPELINE_NAME = "datadream-tune"
# The search's own parameters; the others are the datadream pipeline's, for the trials and the final run.
TUNE_HELP = {
    "study": "Optuna study name; re-running with the same name resumes the campaign.",
    "storage": 'Study storage URL without a password; "" = $OPTUNA_STORAGE from the datadream-secrets Secret.',
    "trials": "Finished trials the campaign should reach, all workers together.",
    "workers": "GPU worker tasks running trials at once.",
    "run_best": "After the search, run the datadream pipeline with the best settings and register it.",
    "config": "YAML layered on the preset, including the search (tune.search, tune.space, tune.fidelity, "
              "tune.pruner).",
    "register_name": "MLflow registry prefix; the campaign is tracked in experiment <register_name>-tune, the "
                     'final run in <register_name>; "" = no MLflow.',
}


def build_tune_pipeline(settings: ClusterSettings | None = None):
    from kfp import dsl

    import components

    s = settings or ClusterSettings()
    ops = components.build(components.image_reference() if s.image is None else s.image)
    datadream = build_pipeline(s)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        pipeline_root=s.pipeline_root,
        description="DataDream search campaign: Optuna trials over SD and CLIP LoRA rank and learning rate on "
        "parallel GPU workers sharing one study, scored by val top-1; then optionally a full datadream run "
        "with the best settings, registered through the promotion gate.",
    )
    @described(TUNE_HELP)
    def datadream_tune(
        study: str = "datadream",
        storage: str = "",
        trials: int = 20,
        workers: int = 2,
        run_best: bool = True,
        dataset: str = "demo",
        shots: int = 16,
        seed: int = 1,
        mode: str = "class",
        images_per_class: int = 500,
        train_on: list = ["synthetic"],  # noqa: B006 - a KFP parameter default, never mutated
        gpus: int = 1,
        sd_model: str = "stabilityai/stable-diffusion-2-1-base",
        clip_model: str = "ViT-B-16",
        clip_pretrained: str = "openai",
        preset: str = "paper",
        config: str = "",
        register_name: str = "datadream",
        promote_margin: float = 0.0,
        promote_floor: float = 0.0,
    ):
        """A search campaign over LoRA rank and learning rate, then optionally a run with the best settings."""
        prep = on_cpu(ops.tune_prepare(dataset=dataset, shots=shots, seed=seed, mode=mode, sd_model=sd_model,
                                       clip_model=clip_model, clip_pretrained=clip_pretrained, study=study,
                                       storage=storage, workers=workers, register_name=register_name,
                                       preset=preset, config=config), s)
        prep.set_caching_options(False)  # the study is state outside KFP
        # The condition always holds (tune_prepare refuses workers < 1); it is there for kfp.local, which
        # finds a task's output list for a ParallelFor only inside a sub-DAG (kfp 2.17: "Parent pipeline
        # input argument … not found" at the top level).
        with dsl.If(workers >= 1, name="search"):
            with dsl.ParallelFor(prep.outputs["worker_list"], name="workers") as worker:
                w = on_gpu(ops.tune_worker(fewshot_set=prep.outputs["fewshot_set"], study=study, storage=storage,
                                           trials=trials, worker=worker, register_name=register_name,
                                           preset=preset, run_config=prep.outputs["run_config"]), s)
                w.set_caching_options(False)
            best = on_cpu(ops.tune_best(study=study, storage=storage, preset=preset,
                                        run_config=prep.outputs["run_config"]), s).after(w)
            best.set_caching_options(False)
            with dsl.If(run_best == True, name="run-best"):  # noqa: E712 - a KFP condition, not a comparison
                datadream(dataset=dataset, shots=shots, seed=seed, mode=mode, images_per_class=images_per_class,
                          train_on=train_on, gpus=gpus, sd_model=sd_model, clip_model=clip_model,
                          clip_pretrained=clip_pretrained, preset=preset, config=best.outputs["config"],
                          register_name=register_name, promote_margin=promote_margin,
                          promote_floor=promote_floor)

    return datadream_tune
