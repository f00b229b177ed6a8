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
from pipelines import parameters as params_
from pipelines.cluster import ClusterSettings, on_cpu, on_gpu

PIPELINE_NAME = "datadream-tune"
DESCRIPTION = ("DataDream search campaign: Optuna trials over SD and CLIP LoRA rank and learning rate on "
               "parallel GPU workers sharing one study, scored by val top-1; then optionally a full datadream run "
               "with the best settings, registered through the promotion gate.")


def build_tune_pipeline(datadream, settings: ClusterSettings | None = None):
    """The campaign pipeline; `datadream` is the run pipeline it ends with (pipelines.pipeline builds it)."""
    from kfp import dsl

    import components

    s = settings or ClusterSettings()
    ops = components.build(components.image_reference() if s.image is None else s.image)

    def datadream_tune(**p):
        study, storage, workers, preset, config = p["study"], p["storage"], p["workers"], p["preset"], p["config"]
        prep = on_cpu(ops.tune_prepare(**{k: p[k] for k in ("dataset", "shots", "seed", "mode", "sd_model",
                                                            "clip_model", "clip_pretrained", "register_name")},
                                       study=study, storage=storage, workers=workers, preset=preset, config=config), s)
        prep.set_caching_options(False)  # the study is state outside KFP
        # The condition always holds (tune_prepare refuses workers < 1); it is there for kfp.local, which
        # finds a task's output list for a ParallelFor only inside a sub-DAG (kfp 2.17: "Parent pipeline
        # input argument … not found" at the top level).
        with dsl.If(workers >= 1, name="search"):
            with dsl.ParallelFor(prep.outputs["worker_list"], name="workers") as worker:
                w = on_gpu(ops.tune_worker(fewshot_set=prep.outputs["fewshot_set"], study=study, storage=storage,
                                           trials=p["trials"], worker=worker, register_name=p["register_name"],
                                           preset=preset, run_config=prep.outputs["run_config"]), s)
                w.set_caching_options(False)
            best = on_cpu(ops.tune_best(study=study, storage=storage, preset=preset,
                                        run_config=prep.outputs["run_config"]), s).after(w)
            best.set_caching_options(False)
            with dsl.If(p["run_best"] == True, name="run-best"):  # noqa: E712 - a KFP condition, not a comparison
                datadream(**{**params_.arguments_of(p), "config": best.outputs["config"]})

    return dsl.pipeline(name=PIPELINE_NAME, pipeline_root=s.pipeline_root, description=DESCRIPTION)(
        params_.pipeline_function(PIPELINE_NAME, params_.TUNE, datadream_tune, "A search campaign over LoRA rank "
                                  "and learning rate, then optionally a run with the best settings."))
