"""The `datadream` pipeline: fewshot → adapt → generate → gather → classify → evaluate → summarize.

Class-wise mode fans adaptation *and* generation out over shards of classes (one GPU process per
shard loads SD once and trains its classes' adapters, then generates their images); dataset-wise
mode trains one adapter and fans generation out over the same shards. The number of shards is the
`gpus` parameter, so a run uses as many GPUs at once as it asks for (KFP's ParallelFor limit is a
compile-time number, so the fan-out width is set through the shard count instead).

`compile_pipeline` writes the YAML the Kubeflow UI runs; `run_local` runs the same pipeline function
with kfp.local's SubprocessRunner (the laptop default).
"""

# No `from __future__ import annotations`: KFP reads the pipeline signature's annotations as types.
import builtins
import contextlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from datadream.errors import UserError

log = logging.getLogger(__name__)

PIPELINE_NAME = "datadream"


@dataclass(frozen=True)
class ClusterSettings:
    """How tasks are placed on the cluster; set at compile time (infra/terraform must agree)."""

    image: str | None = None  # None = components.image_reference()
    gpu_node_selector: tuple[str, str] = ("datadream.io/node-pool", "gpu")
    gpu_toleration: tuple[str, str] = ("nvidia.com/gpu", "NoSchedule")  # key, effect (operator Exists)
    gpu_cpu: str = "8"
    gpu_memory: str = "48Gi"
    shm_size: str = "16Gi"
    cpu_cpu: str = "2"
    cpu_memory: str = "8Gi"
    retries: int = 2
    # Where KFP writes the steps' artifacts, e.g. s3://bucket/pipeline-root; None = the cluster's default
    # (the kfp-launcher ConfigMap's defaultPipelineRoot).
    pipeline_root: str | None = None
    # Settings reach the tasks from the cluster, never as pipeline parameters (secrets least of all).
    config_map: str = "datadream-config"
    config_map_keys: tuple[str, ...] = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                                        "DATADREAM_CACHE", "HF_HOME")
    secret: str = "datadream-secrets"
    # Where the register step serves a champion it promoted, with `deploy` on (infra/terraform/modules/serving).
    serving_namespace: str = "datadream-serving"
    secret_keys: tuple[str, ...] = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN",
                                    "OPTUNA_STORAGE")
    extra: dict = field(default_factory=dict)


def _common(task, s: ClusterSettings):
    from kfp import kubernetes as k8s

    k8s.use_config_map_as_env(task, s.config_map, {k: k for k in s.config_map_keys}, optional=True)
    k8s.use_secret_as_env(task, s.secret, {k: k for k in s.secret_keys}, optional=True)
    return task


def on_cpu(task, s: ClusterSettings):
    task.set_cpu_request(s.cpu_cpu).set_memory_request(s.cpu_memory)
    task.set_retry(num_retries=s.retries, backoff_duration="30s", backoff_factor=2.0)
    return _common(task, s)


def on_gpu(task, s: ClusterSettings):
    """One NVIDIA GPU on the GPU node group; /dev/shm in memory for DataLoader workers; retries."""
    from kfp import kubernetes as k8s

    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    task.set_cpu_request(s.gpu_cpu).set_memory_request(s.gpu_memory)
    task.set_retry(num_retries=s.retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")
    k8s.add_node_selector(task, *s.gpu_node_selector)
    k8s.add_toleration(task, key=s.gpu_toleration[0], operator="Exists", effect=s.gpu_toleration[1])
    k8s.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=s.shm_size)
    return _common(task, s)


# What the Kubeflow UI shows beside each pipeline parameter (KFP reads the pipeline function's "Args:"
# docstring into the compiled IR's inputDefinitions.parameters.<name>.description; `described` writes it).
PARAMETER_HELP = {
    "dataset": 'Labelled dataset: an ImageFolder path or s3:// URI (DATA/<class>/<image> or '
               'DATA/{train,val,test}/<class>/<image>); "demo" = the procedural demo dataset.',
    "shots": "Real images per class (k) sampled for adaptation and training, e.g. 16.",
    "seed": "Seed of the few-shot sampling, adaptation, generation and training.",
    "mode": '"class": one Stable Diffusion LoRA adapter per class (DataDream_cls); '
            '"dataset": one adapter for all classes (DataDream_dset).',
    "images_per_class": "Synthetic images generated per class (the paper: 500).",
    "train_on": 'Classifiers to train and evaluate, a JSON list of "synthetic", "synthetic+real", "real" '
                '(few-shot baseline) and "zero-shot" (no training), e.g. ["synthetic","synthetic+real"].',
    "gpus": "GPUs to use at once: the number of class shards adaptation and generation fan out over.",
    "sd_model": "Stable Diffusion model: Hugging Face id, folder or s3:// URI "
                "(stabilityai/stable-diffusion-2-1-base), or tiny.",
    "clip_model": "CLIP architecture: an open_clip model name (ViT-B-16), local-dir:FOLDER, or tiny.",
    "clip_pretrained": 'open_clip pretrained tag (openai) or a safetensors weights file; "" = none.',
    "preset": '"paper" (the paper\'s settings, docs/method.md) or "tiny" (random-init models for a CPU smoke run).',
    "config": "YAML layered on the preset: any setting, e.g. 'classify: {epochs: 30}' "
              "(datadream tune best writes one).",
    "register_name": "MLflow experiment and registry prefix (<name>-classifier, <name>-sd-lora); "
                     '"" = no tracking, no registration.',
    "promote_margin": "The gate: a new classifier becomes champion only if its test top-1 beats the "
                      "champion's by more than this.",
    "promote_floor": "The gate: the least test top-1 a champion must have.",
    "deploy": "When the gate promotes, serve the new champion on the cluster (datadream registry deploy); "
              "if the rollout fails, the champion moves back.",
}


def described(extra: dict[str, str] | None = None):
    """A decorator giving a pipeline function an "Args:" docstring that describes each of its
    parameters from PARAMETER_HELP and `extra` (KeyError if one is missing); KFP turns it into the
    parameter descriptions the Kubeflow UI shows."""
    import inspect

    helps = {**PARAMETER_HELP, **(extra or {})}

    def decorate(fn):
        if not fn.__doc__:
            raise ValueError(f"{fn.__name__}: give it a one-line docstring; the Args: section follows it")
        lines = [f"    {name}: {helps[name]}" for name in inspect.signature(fn).parameters]
        fn.__doc__ = "\n".join([fn.__doc__.strip(), "", "Args:", *lines])
        return fn

    return decorate


def build_pipeline(settings: ClusterSettings | None = None):
    """The pipeline function, with every component in `settings.image`."""
    from kfp import dsl

    import components

    s = settings or ClusterSettings()
    image = components.image_reference() if s.image is None else s.image
    ops = components.build(image)

    def tail(fs, synthetic, adapters, mode: str, p: dict):
        """classify + evaluate for each requested training set, a summary report, registration."""
        train_on, preset, config = p["train_on"], p["preset"], p["config"]
        clip_model, clip_pretrained = p["clip_model"], p["clip_pretrained"]
        mlflow_run = fs.outputs["mlflow_run"]
        with dsl.ParallelFor(train_on) as setting:
            clf = on_gpu(ops.classify(fewshot_set=fs.outputs["fewshot_set"], synthetic=synthetic,
                                      train_on=setting, clip_model=clip_model, clip_pretrained=clip_pretrained,
                                      preset=preset, config=config, mlflow_run=mlflow_run), s)
            ev = on_cpu(ops.evaluate(fewshot_set=fs.outputs["fewshot_set"], classifier=clf.outputs["classifier"],
                                     synthetic=synthetic, train_on=setting, mode=mode, preset=preset,
                                     config=config, mlflow_run=mlflow_run), s)
        on_cpu(ops.summarize(scores=dsl.Collected(ev.outputs["scores"]), synthetic=synthetic,
                             fewshot_set=fs.outputs["fewshot_set"], mlflow_run=mlflow_run), s)
        reg = on_cpu(ops.register(
            fewshot_set=fs.outputs["fewshot_set"], adapters=adapters, scores=dsl.Collected(ev.outputs["scores"]),
            register_name=p["register_name"], dataset=p["dataset"], data_hash=fs.outputs["data_hash"], mode=mode,
            shots=p["shots"], seed=p["seed"], sd_model=p["sd_model"], clip_model=clip_model,
            clip_pretrained=clip_pretrained, promote_margin=p["promote_margin"], promote_floor=p["promote_floor"],
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, mlflow_run=mlflow_run, deploy=p["deploy"],
            serving_image=image, serving_namespace=s.serving_namespace), s)
        reg.set_caching_options(False)  # a side effect in the registry: never replayed from cache

    @dsl.pipeline(
        name=PIPELINE_NAME,
        pipeline_root=s.pipeline_root,
        description="DataDream: LoRA-adapt Stable Diffusion to k shots per class, synthesize a training set, "
        "train a CLIP LoRA classifier on it and evaluate it on the real test split.",
    )
    @described()
    def datadream(
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
        deploy: bool = False,
    ):
        """One DataDream run: few-shot set, SD adapters, synthetic images, classifiers, registration."""
        p = dict(dataset=dataset, shots=shots, seed=seed, train_on=train_on, sd_model=sd_model,
                 clip_model=clip_model, clip_pretrained=clip_pretrained, preset=preset, config=config,
                 register_name=register_name, promote_margin=promote_margin, promote_floor=promote_floor,
                 deploy=deploy)
        fs = on_cpu(ops.fewshot(dataset=dataset, shots=shots, seed=seed, shards=gpus, mode=mode,
                                images_per_class=images_per_class, sd_model=sd_model, clip_model=clip_model,
                                clip_pretrained=clip_pretrained,
                                register_name=register_name, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                preset=preset, config=config), s)
        fs.set_caching_options(False)  # reads a mutable dataset location; downstream caches on data_hash
        fewshot_set, data_hash = fs.outputs["fewshot_set"], fs.outputs["data_hash"]
        shard_list = fs.outputs["shard_list"]
        run_id = fs.outputs["mlflow_run"]
        common = {"preset": preset, "config": config, "mlflow_run": run_id}

        with dsl.If(mode == "class", name="class-wise"):
            with dsl.ParallelFor(shard_list, name="class-shards") as shard:
                ad = on_gpu(ops.adapt(fewshot_set=fewshot_set, data_hash=data_hash, mode="class", shard=shard,
                                      sd_model=sd_model, **common), s)
                gen = on_gpu(ops.generate(fewshot_set=fewshot_set, adapters=ad.outputs["adapters"], shard=shard,
                                          images_per_class=images_per_class, sd_model=sd_model, **common), s)
            syn = on_cpu(ops.gather(shards=dsl.Collected(gen.outputs["synthetic"]), mlflow_run=run_id), s)
            ads = on_cpu(ops.gather_adapters(shards=dsl.Collected(ad.outputs["adapters"])), s)
            tail(fs, syn.outputs["synthetic"], ads.outputs["adapters"], "class", p)

        with dsl.Else(name="dataset-wise"):
            ad = on_gpu(ops.adapt(fewshot_set=fewshot_set, data_hash=data_hash, mode="dataset", shard="",
                                  sd_model=sd_model, **common), s)
            with dsl.ParallelFor(shard_list, name="generate-shards") as shard:
                gen = on_gpu(ops.generate(fewshot_set=fewshot_set, adapters=ad.outputs["adapters"], shard=shard,
                                          images_per_class=images_per_class, sd_model=sd_model, **common), s)
            syn = on_cpu(ops.gather(shards=dsl.Collected(gen.outputs["synthetic"]), mlflow_run=run_id), s)
            tail(fs, syn.outputs["synthetic"], ad.outputs["adapters"], "dataset", p)

    return datadream


PIPELINES = ("datadream", "datadream-tune")


def pipeline_function(name: str = PIPELINE_NAME, settings: ClusterSettings | None = None):
    """The pipeline called `name`: "datadream" (a run) or "datadream-tune" (a search campaign)."""
    if name == PIPELINE_NAME:
        return build_pipeline(settings)
    if name == "datadream-tune":
        from pipelines.tune_pipeline import build_tune_pipeline

        return build_tune_pipeline(settings)
    raise UserError(f"--pipeline {name!r}: expected one of {', '.join(PIPELINES)}")


def compile_pipeline(package_path: str | os.PathLike, settings: ClusterSettings | None = None,
                     parameters: dict | None = None, name: str = PIPELINE_NAME) -> Path:
    """Compile to YAML; the same inputs give byte-identical output."""
    from kfp import compiler

    package_path = Path(package_path)
    package_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_function(name, settings), str(package_path), pipeline_parameters=parameters)
    log.debug("compiled %s -> %s", name, package_path)
    return package_path


def run_local(root: str | os.PathLike, arguments: dict, name: str = PIPELINE_NAME, *, verbose: bool = False,
              quiet: bool = False, label: str = "", logs_dir: Path | None = None) -> Path:
    """Run the pipeline with kfp.local's SubprocessRunner in this environment; returns the run folder.

    By default each task's output goes to `<run folder>/logs/<task>.log` (or `logs_dir`) and one line
    per finished task goes to stderr (pipelines/local_output.py); `quiet` keeps only failures and
    `verbose` streams kfp.local's whole log to stderr instead. A failed task raises PipelineFailed.
    """
    from kfp import local

    from pipelines.local_output import PipelineFailed, task_output

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # kfp.local runs ParallelFor iterations as concurrent processes; with torch's default of one thread
    # per core each, they oversubscribe the CPU many times over. One thread per task process instead.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The embedded MLflow default: a SQLite store beside the runs (mlflow ui --backend-store-uri …), and
    # for search campaigns an Optuna study beside them (the Secret's OPTUNA_STORAGE on a cluster). The
    # tasks inherit this process's environment; it is put back afterwards.
    defaults = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
                "OPTUNA_STORAGE": f"sqlite:///{root / 'optuna.db'}"}
    added = [k for k in defaults if not os.environ.get(k)]
    os.environ.update({k: defaults[k] for k in added})
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    before = set(root.iterdir())
    pipeline = pipeline_function(name)
    # kfp.local swaps builtins.print for an indenting one around each task and puts back what it saw;
    # with tasks running in parallel threads the swaps interleave and an indenting print can stay
    # installed for good, so this process's print is restored whatever happens.
    saved_print = builtins.print
    with contextlib.ExitStack() as stack:
        if verbose:  # kfp.local logs every task to stdout; stdout is for our results, so its log goes to stderr
            tasks = None
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        else:  # what is left on stdout is kfp.local's banner lines
            from google.protobuf import json_format

            ir = getattr(pipeline, "pipeline_spec", None)  # the compiled IR, to count the tasks ahead
            tasks = stack.enter_context(task_output(
                root, sys.stderr, quiet=quiet, label=label, logs_dir=logs_dir, arguments=arguments,
                spec=json_format.MessageToDict(ir) if ir is not None else None))
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        stack.enter_context(warnings.catch_warnings())
        # Resources, GPUs and Kubernetes settings are for the cluster; locally they are expected no-ops.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
        # The steps run in this environment, which has `datadream` installed like the image does.
        warnings.filterwarnings("ignore", message=".*non-Python base image")
        try:
            pipeline(**arguments)
        except TypeError as e:
            raise UserError(f"pipeline arguments: {e}") from None
        except RuntimeError:
            failed = tasks.failures() if tasks is not None else []
            if not failed:
                raise
            raise PipelineFailed(name, failed) from None
        finally:
            builtins.print = saved_print
            for k in added:
                os.environ.pop(k, None)
    new = sorted(set(root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise RuntimeError(f"kfp.local wrote no run folder under {root}")
    return new[-1]
