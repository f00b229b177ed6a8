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
import json
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from datadream.errors import UserError
from pipelines import parameters as params_
from pipelines.cluster import ClusterSettings, on_cpu, on_gpu

if TYPE_CHECKING:
    from pipelines.warm_start import WarmStarter

log = logging.getLogger(__name__)

PIPELINE_NAME = "datadream"
DESCRIPTION = ("DataDream: LoRA-adapt Stable Diffusion to k shots per class, synthesize a training set, "
               "train a CLIP LoRA classifier on it and evaluate it on the real test split.")


def build_pipeline(settings: ClusterSettings | None = None):
    """The pipeline function, with every component in `settings.image`."""
    from kfp import dsl

    import components

    s = settings or ClusterSettings()
    image = components.image_reference() if s.image is None else s.image
    ops = components.build(image)

    def tail(fs, synthetic, adapters, mode: str, p: dict):
        """classify + evaluate for each requested training set, registration, a summary report."""
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
        reg = on_cpu(ops.register(
            fewshot_set=fs.outputs["fewshot_set"], adapters=adapters, scores=dsl.Collected(ev.outputs["scores"]),
            register_name=p["register_name"], dataset=p["dataset"], data_hash=fs.outputs["data_hash"], mode=mode,
            shots=p["shots"], seed=p["seed"], sd_model=p["sd_model"], clip_model=clip_model,
            clip_pretrained=clip_pretrained, promote_margin=p["promote_margin"], promote_floor=p["promote_floor"],
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, mlflow_run=mlflow_run, deploy=p["deploy"],
            serving_image=image, serving_namespace=s.serving_namespace), s)
        # The summary comes last: its report carries the gate's decision.
        on_cpu(ops.summarize(scores=dsl.Collected(ev.outputs["scores"]), synthetic=synthetic,
                             fewshot_set=fs.outputs["fewshot_set"], mode=mode, decision=reg.outputs["decision"],
                             classifier_version=reg.outputs["classifier_version"],
                             kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, mlflow_run=mlflow_run), s)
        reg.set_caching_options(False)  # a side effect in the registry: never replayed from cache

    def datadream(**p):
        dataset, shots, seed, mode = p["dataset"], p["shots"], p["seed"], p["mode"]
        images_per_class, sd_model, preset, config = p["images_per_class"], p["sd_model"], p["preset"], p["config"]
        # The exit handler runs whatever happens inside: it closes the MLflow parent run (FAILED, naming the
        # failed steps, when anything failed), so no run is left RUNNING.
        finish = on_cpu(ops.finish(register_name=p["register_name"], kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), s)
        finish.set_caching_options(False)
        with dsl.ExitHandler(finish, name="run"):
            fs = on_cpu(ops.fewshot(dataset=dataset, shots=shots, seed=seed, shards=p["gpus"], mode=mode,
                                    images_per_class=images_per_class, sd_model=sd_model, clip_model=p["clip_model"],
                                    clip_pretrained=p["clip_pretrained"],
                                    register_name=p["register_name"], kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
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

    return dsl.pipeline(name=PIPELINE_NAME, pipeline_root=s.pipeline_root, description=DESCRIPTION)(
        params_.pipeline_function(PIPELINE_NAME, params_.RUN, datadream,
                                  "One DataDream run: few-shot set, SD adapters, synthetic images, classifiers, "
                                  "registration."))


PIPELINES = ("datadream", "datadream-tune")


def pipeline_function(name: str = PIPELINE_NAME, settings: ClusterSettings | None = None):
    """The pipeline called `name`: "datadream" (a run) or "datadream-tune" (a search campaign)."""
    if name == PIPELINE_NAME:
        return build_pipeline(settings)
    if name == "datadream-tune":
        from pipelines.tune_pipeline import build_tune_pipeline

        return build_tune_pipeline(build_pipeline(settings), settings)
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


@contextlib.contextmanager
def _stop_on_interrupt(root: Path, before: set[Path], tasks, warm):
    """Ctrl-C during a local run ends it at once, exit status 130.

    kfp.local alone would take the interrupted steps for failures and wait out their retry backoff (30 s
    and more) before retrying them. Instead: no task starts any more, the running ones end, the run's
    MLflow runs still RUNNING end KILLED, and the process exits. Every finished step stays, so the same
    command resumes where it stopped.
    """
    def on_interrupt(signum, frame):
        sys.stderr.write("\n✗ interrupted: the running steps are stopped; the finished ones are kept, "
                         "and the same command again resumes the run\n")
        sys.stderr.flush()
        if tasks is not None:
            tasks.stop()
        if warm is not None:
            warm.close()
        for output in [p for run in set(root.iterdir()) - before for p in run.glob("fewshot*/executor_output.json")]:
            try:
                parent = json.loads(output.read_text()).get("parameterValues", {}).get("mlflow_run")
                if parent:
                    from datadream.steps import interrupt_pipeline

                    interrupt_pipeline(parent)
            except Exception as e:  # the exit must not wait on a tracking store that fails
                log.debug("interrupt: MLflow run of %s left as it is: %s", output.parent.parent, e)
        os._exit(130)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_local(root: str | os.PathLike, arguments: dict, name: str = PIPELINE_NAME, *, verbose: bool = False,
              quiet: bool = False, label: str = "", logs_dir: Path | None = None,
              warm: "WarmStarter | bool" = True) -> Path:
    """Run the pipeline with kfp.local's SubprocessRunner in this environment; returns the run folder.

    By default each task's output goes to `<run folder>/logs/<task>.log` (or `logs_dir`) and one line
    per finished task goes to stderr (pipelines/local_output.py); `quiet` keeps only failures and
    `verbose` streams kfp.local's whole log to stderr instead. A failed task raises PipelineFailed.
    Each task process is forked from a warm one that has imported the libraries already
    (pipelines/warm_start.py); pass a `WarmStarter` to share one between runs, or False to start each
    task cold. Each task gets the cores it shares with the tasks running beside it as torch threads,
    unless $OMP_NUM_THREADS says otherwise.
    """
    from kfp import local

    from pipelines.local_output import PipelineFailed, task_output
    from pipelines.warm_start import WarmStarter

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
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
    # Its logger context (the root logger's handlers and level, swapped per task) interleaves the same way
    # and can leave a handler on the devnull stdout of the run, closed afterwards: both are put back.
    root_logger = logging.getLogger()
    saved_logging = root_logger.handlers[:], root_logger.level
    with contextlib.ExitStack() as stack:
        if verbose:  # kfp.local logs every task to stdout; stdout is for our results, so its log goes to stderr
            tasks = None
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        else:  # what is left on stdout is kfp.local's banner lines
            from google.protobuf import json_format

            ir = getattr(pipeline, "pipeline_spec", None)  # the compiled IR, to count the tasks ahead
            if warm is True:  # its own helper (kfp.local's own stream, with -v, starts every task cold)
                warm = stack.enter_context(WarmStarter(root / "warm-start.log"))
            tasks = stack.enter_context(task_output(
                root, sys.stderr, quiet=quiet, label=label, logs_dir=logs_dir, arguments=arguments,
                spec=json_format.MessageToDict(ir) if ir is not None else None, warm=warm or None))
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        warm = warm if isinstance(warm, WarmStarter) else None  # a starter, or none at all
        if threading.current_thread() is threading.main_thread():
            stack.enter_context(_stop_on_interrupt(root, before, tasks, warm))
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
            # A step that failed on bad input left its one-line message beside its output: that is the answer.
            from datadream.steps import user_error_notes

            notes = [n for run in set(root.iterdir()) - before if run.is_dir() for n in user_error_notes(run)]
            if notes:
                raise UserError(notes[0]) from None
            failed = tasks.failures() if tasks is not None else []
            if not failed:
                raise
            raise PipelineFailed(name, failed) from None
        finally:
            builtins.print = saved_print
            root_logger.handlers[:], root_logger.level = saved_logging[0], saved_logging[1]
            for k in added:
                os.environ.pop(k, None)
    # The run folder is <pipeline name>-<timestamp>; the first run beside an empty root also creates
    # mlflow.db and mlartifacts/, which may be written after the run folder and must not be taken for it.
    new = sorted((p for p in set(root.iterdir()) - before if p.is_dir() and p.name.startswith(f"{name}-")),
                 key=lambda p: p.stat().st_mtime)
    if not new:
        raise RuntimeError(f"kfp.local wrote no run folder under {root}")
    from datadream.report import publish_local_reports

    publish_local_reports(new[-1])  # report.html copies a browser opens (KFP names the artifacts `report`)
    return new[-1]
