"""The pipelines' parameters, defined once: name, type, default, the help the Kubeflow UI shows, and the
config setting each one overrides. Both pipeline functions get their signatures from here, and
`datadream pipeline run --local` and `datadream demo` take their laptop defaults from here.

A parameter with a `setting` is folded into the config the steps run with (`config_overrides`); the
others steer the DAG (fan-out, which classifiers, registration) or are the config itself.
"""

# No `from __future__ import annotations`: KFP reads the built signatures' annotations as types.
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Parameter:
    name: str
    type: type
    default: Any
    help: str
    setting: str | None = None  # the config key it sets, e.g. "fewshot.shots"


RUN = (
    Parameter("dataset", str, "demo", "Labelled dataset: an ImageFolder path or s3:// URI (DATA/<class>/<image> or "
              'DATA/{train,val,test}/<class>/<image>); "demo" = the procedural demo dataset.'),
    Parameter("shots", int, 16, "Real images per class (k) sampled for adaptation and training, e.g. 16.",
              "fewshot.shots"),
    Parameter("seed", int, 1, "Seed of the few-shot sampling, adaptation, generation and training.", "fewshot.seed"),
    Parameter("mode", str, "class", '"class": one Stable Diffusion LoRA adapter per class (DataDream_cls); '
              '"dataset": one adapter for all classes (DataDream_dset).', "adapt.mode"),
    Parameter("images_per_class", int, 500, "Synthetic images generated per class (the paper: 500).",
              "generate.images_per_class"),
    Parameter("train_on", list, ["synthetic"], 'Classifiers to train and evaluate, a JSON list of "synthetic", '
              '"synthetic+real", "real" (few-shot baseline) and "zero-shot" (no training), e.g. '
              '["synthetic","synthetic+real"].'),
    Parameter("gpus", int, 1, "GPUs to use at once: the number of class shards adaptation and generation fan out "
              "over."),
    Parameter("sd_model", str, "stabilityai/stable-diffusion-2-1-base", "Stable Diffusion model: Hugging Face id, "
              "folder or s3:// URI (stabilityai/stable-diffusion-2-1-base), or tiny.", "models.sd"),
    Parameter("clip_model", str, "ViT-B-16", "CLIP architecture: an open_clip model name (ViT-B-16), "
              "local-dir:FOLDER, or tiny.", "models.clip"),
    Parameter("clip_pretrained", str, "openai", 'open_clip pretrained tag (openai) or a safetensors weights file; '
              '"" = none.', "models.clip_pretrained"),
    Parameter("preset", str, "paper", '"paper" (the paper\'s settings, docs/method.md) or "tiny" (random-init '
              "models for a CPU smoke run)."),
    Parameter("config", str, "", "YAML layered on the preset: any setting, e.g. 'classify: {epochs: 30}' "
              "(datadream tune best writes one)."),
    Parameter("register_name", str, "datadream", "MLflow experiment and registry prefix (<name>-classifier, "
              '<name>-sd-lora); "" = no tracking, no registration.'),
    Parameter("promote_margin", float, 0.0, "The gate: a new classifier becomes champion only if its test top-1 "
              "beats the champion's by more than this."),
    Parameter("promote_floor", float, 0.0, "The gate: the least test top-1 a champion must have."),
    Parameter("deploy", bool, False, "When the gate promotes, serve the new champion on the cluster (datadream "
              "registry deploy); if the rollout fails, the champion moves back."),
)

# The search's own parameters; the others are the datadream pipeline's, for the trials and the final run.
_TUNE_HELP = {
    "config": "YAML layered on the preset, including the search (tune.search, tune.space, tune.fidelity, "
              "tune.pruner).",
    "register_name": "MLflow registry prefix; the campaign is tracked in experiment <register_name>-tune, the "
                     'final run in <register_name>; "" = no MLflow.',
}
TUNE = (
    Parameter("study", str, "datadream", "Optuna study name; re-running with the same name resumes the campaign."),
    Parameter("storage", str, "", 'Study storage URL without a password; "" = $OPTUNA_STORAGE from the '
              "datadream-secrets Secret."),
    Parameter("trials", int, 20, "Finished trials the campaign should reach, all workers together."),
    Parameter("workers", int, 2, "GPU worker tasks running trials at once."),
    Parameter("run_best", bool, True, "After the search, run the datadream pipeline with the best settings and "
              "register it."),
    *(dataclasses.replace(p, help=_TUNE_HELP.get(p.name, p.help)) for p in RUN),
)

BY_NAME = {p.name: p for p in TUNE}

# A run on one machine (`datadream pipeline run --local`, `datadream demo`): tiny models, the demo data.
LOCAL = {"dataset": "demo", "preset": "tiny", "shots": 4, "images_per_class": 12, "sd_model": "tiny",
         "clip_model": "tiny", "clip_pretrained": "", "train_on": ["synthetic", "synthetic+real"]}
# A campaign on one machine: a few trials on two kfp.local worker processes, then a run with the best.
LOCAL_TUNE = {**LOCAL, "trials": 4, "workers": 2, "train_on": ["synthetic+real"]}


def local_defaults(pipeline: str) -> dict[str, Any]:
    return dict(LOCAL_TUNE if pipeline == "datadream-tune" else LOCAL)


def config_overrides(**values: Any) -> list[str]:
    """`section.key=value` overrides for the config settings among `values` (parameter name -> value)."""
    out = []
    for name, value in values.items():
        setting = BY_NAME[name].setting
        if setting is None:
            raise KeyError(f"parameter {name!r} sets no config key")
        out.append(f"{setting}={'null' if value in ('', None) else value}")
    return out


def from_config(config) -> dict[str, Any]:
    """The values of the parameters that set a config key, read from `config` (a datadream Config)."""
    data = config.to_dict()
    out = {}
    for p in RUN:
        if p.setting is not None:
            section, key = p.setting.split(".")
            value = data[section][key]
            out[p.name] = "" if value is None else value
    return out


def docstring(summary: str, params: tuple[Parameter, ...]) -> str:
    """The pipeline's docstring; KFP reads its "Args:" into the compiled IR's
    inputDefinitions.parameters.<name>.description, which the Kubeflow UI shows beside each parameter."""
    return summary + "\n\nArgs:\n" + "".join(f"    {p.name}: {p.help}\n" for p in params)


def pipeline_function(name: str, params: tuple[Parameter, ...], body: Callable[..., Any], summary: str):
    """A function with the signature `params` (name, type, default) that calls `body(**arguments)`; KFP's
    `dsl.pipeline` reads the signature and the docstring."""
    signature = inspect.Signature([
        inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default, annotation=p.type)
        for p in params])

    def pipeline(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return body(**bound.arguments)

    pipeline.__signature__ = signature
    pipeline.__name__ = pipeline.__qualname__ = name.replace("-", "_")
    pipeline.__doc__ = docstring(summary, params)
    return pipeline


def arguments_of(values: Mapping[str, Any], params: tuple[Parameter, ...] = RUN) -> dict[str, Any]:
    """The entries of `values` that are parameters of `params`."""
    names = {p.name for p in params}
    return {k: v for k, v in values.items() if k in names}
