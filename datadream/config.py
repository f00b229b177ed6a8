"""Typed configuration: one section per stage, YAML files, `--set section.key=value` overrides.

The defaults of every field are the paper's settings (ExplainableML/DataDream, ECCV 2024), each
citing its source in its description (docs/method.md lists them); the `paper` preset
(datadream/presets/paper.yaml) spells them out and a test keeps the two equal. `tiny` is the CPU
preset; `paper/<dataset>` adds one of the paper's datasets (datadream/presets/__init__.py).
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from datadream import presets
from datadream.errors import UserError

CONFIG_DIR = presets.DIR  # the preset YAML files, package data
TEMPLATE_FIELDS = ("domain", "name")  # what data.template may use


class Section(BaseModel):
    # Every number is finite (`.inf`, `.nan` and `1e400` are refused); sizes also have upper bounds that fit a GPU.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunConfig(Section):
    seed: int = Field(1, description="Master seed for training and generation (docs/method.md: seeds 1, 5, 10).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on GPU (fp16 where bf16 is unsupported), fp32 on CPU."
    )
    compile: bool = Field(
        False,
        description="torch.compile the UNet and text encoder (adapt), the UNet and VAE (generate) and both CLIP "
        "towers (classify), in place, on any device (inductor: Triton kernels on CUDA, C++ on CPU, which needs a "
        "C compiler). The first steps pay the compilation (minutes for SD on CPU); results change by float "
        "rounding only.",
    )
    channels_last: bool = Field(
        False, description="UNet and VAE weights and activations in channels-last memory format (CUDA only)."
    )
    attention: Literal["sdpa", "flash", "classic"] = Field(
        "sdpa",
        description="SD attention kernel: sdpa = torch's scaled_dot_product_attention, which picks the kernel "
        "(diffusers' default); flash = SDPA limited to flash-attention, with the math kernel where flash cannot "
        "run (CUDA only); classic = diffusers' AttnProcessor (explicit softmax, no SDPA).",
    )


class DataConfig(Section):
    format: Literal[
        "imagefolder", "imagenet", "caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "flowers102",
        "oxford_pets", "stanford_cars", "sun397",
    ] = Field(
        "imagefolder",
        description="On-disk layout of --dataset: imagefolder, or one of the paper's ten datasets as downloaded, "
        "using CoOp's split_zhou_*.json when present, else the official split files (docs/method.md, Datasets and "
        "Stage 0; layouts in datadream/data/formats.py). It does not set data.domain: the presets "
        "paper/<dataset> set both.",
    )
    domain: str = Field(
        "",
        description="Domain word put in prompts, e.g. 'texture' for DTD (docs/method.md, Datasets). Empty for none.",
    )
    template: str = Field(
        "a {domain}photo of a {name}",
        description="Prompt template; {domain} is the domain word plus a space (docs/method.md, Stage 1: prompt).",
    )
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Per-class share held out as val when the dataset has no val split."
    )
    test_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Per-class share held out as test when the dataset has no test split."
    )
    split_seed: int = Field(0, description="Seed of the val/test carve-out; fixed so test sets agree across seeds.")
    max_image_pixels: int = Field(
        89_478_485, gt=0, le=2**31,
        description="Pillow decompression-bomb threshold (width×height); larger is an error."
    )

    @field_validator("template")
    @classmethod
    def _known_fields(cls, v: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            raise ValueError(f"not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
        unknown = [f for f in fields if f not in TEMPLATE_FIELDS]
        if unknown:
            raise ValueError(f"unknown field {{{unknown[0]}}}; a template may use {{domain}} and {{name}}")
        if "name" not in fields:
            raise ValueError("the template must contain {name}, or every class gets the same prompt")
        return v

    def prompt(self, name: str) -> str:
        domain = f"{self.domain.strip()} " if self.domain.strip() else ""
        return self.template.format(domain=domain, name=name)


class ModelsConfig(Section):
    sd: str = Field(
        "stabilityai/stable-diffusion-2-1-base",
        description="Stable Diffusion: a Hugging Face id, a diffusers folder (local or s3://), 'tiny' (CPU preset) or "
        "'sd21-base-random' (SD 2.1 base architecture at random init, for benchmarks) (docs/method.md, Stage 1).",
    )
    sd_revision: str | None = Field(None, description="Pinned revision (commit sha) of the SD model on the Hub.")
    clip: str = Field(
        "ViT-B-16",
        description="open_clip model name, 'local-dir:<folder or s3://…>', or 'tiny' (docs/method.md, Stage 3: "
        "ViT-B/16).",
    )
    clip_pretrained: str | None = Field(
        "openai", description="open_clip pretrained tag or a weights file, local or s3:// (docs/method.md, Stage 3: "
        "openai)."
    )
    cache_dir: str | None = Field(
        None, description="Where built or downloaded models are cached (default ~/.cache/datadream)."
    )


def cache_root(models: ModelsConfig) -> Path:
    """Where built (tiny, random-init) and downloaded models are kept: models.cache_dir, then
    $DATADREAM_CACHE, then ~/.cache/datadream."""
    return Path(models.cache_dir or os.environ.get("DATADREAM_CACHE") or Path.home() / ".cache" / "datadream")


class FewShotConfig(Section):
    shots: int = Field(
        16, ge=1, le=10_000, description="Real images per class, k (docs/method.md, Stage 0: 16 is headline)."
    )
    seed: int = Field(1, description="Sampling seed (docs/method.md, Stage 0: seeds 1, 5, 10).")


class AdaptConfig(Section):
    mode: Literal["class", "dataset"] = Field(
        "class", description="class = one LoRA per class; dataset = one LoRA on all classes (docs/method.md, Stage 1)."
    )
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (docs/method.md, Stage 1: 16).")
    alpha: float = Field(
        16.0, gt=0, le=1e5, description="LoRA alpha; scale = alpha/rank (docs/method.md, Stage 1: 16)."
    )
    unet_targets: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"], description="UNet attention projections (docs/method.md, Stage 1)."
    )
    train_text_encoder: bool = Field(True, description="LoRA on the text encoder too (docs/method.md, Stage 1: on).")
    text_targets: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "out_proj"], description="Text encoder projections (docs/method.md, Stage 1)."
    )
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate (docs/method.md, Stage 1: 1e-4).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1) (docs/method.md, Stage 1).")
    weight_decay: float = Field(1e-2, ge=0, le=10, description="AdamW weight decay (docs/method.md, Stage 1: 1e-2).")
    eps: float = Field(1e-8, gt=0, le=1, description="AdamW eps (docs/method.md, Stage 1: 1e-8).")
    grad_clip: float = Field(1.0, gt=0, le=1e6, description="Gradient-norm clip (docs/method.md, Stage 1: 1.0).")
    warmup_steps: int = Field(
        100, ge=0, le=10**7, description="Cosine schedule warm-up steps (docs/method.md, Stage 1: 100)."
    )
    epochs: int = Field(
        200, ge=1, le=10**6, description="Epochs over the adapter's images (docs/method.md, Stage 1: 200)."
    )
    max_steps: int | None = Field(
        None, ge=1, le=10**8, description="Cap on optimizer steps (search fidelity); None = epochs."
    )
    batch_size: int = Field(8, ge=1, le=1024, description="Images per step (docs/method.md, Stage 1: 8).")
    resolution: int | None = Field(
        512, ge=8, le=4096,
        description="Training resolution in px (docs/method.md, Stage 1: 512); None = the model's own."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet.")
    checkpoint_every: int = Field(100, ge=1, le=10**8, description="Publish a resumable checkpoint every N steps.")


class GenerateConfig(Section):
    images_per_class: int = Field(
        500, ge=1, le=100_000, description="Synthetic images per class (docs/method.md, Stage 2: 500)."
    )
    guidance_scale: float = Field(
        2.0, ge=0, le=100, description="Classifier-free guidance (docs/method.md, Stage 2: 2.0)."
    )
    steps: int = Field(
        50, ge=1, le=1000, description="Denoising steps, model's scheduler (docs/method.md, Stage 2: 50)."
    )
    lora_scale: float = Field(
        1.0, ge=0, le=100, description="Adapter scale at inference (docs/method.md, Stage 2: 1.0)."
    )
    batch_size: int = Field(10, ge=1, le=1024, description="Images per pipeline call (tune to the GPU's memory).")
    resolution: int | None = Field(
        None, ge=8, le=4096, description="Output size in px; None = the model's own (512 for SD 2.1 base)."
    )


class AssessConfig(Section):
    enabled: bool = Field(
        True, description="Measure the synthetic set with the frozen base CLIP after generation: quality.json "
        "(CLIPScore, class agreement, diversity, near copies, FD and precision/recall; docs/method.md).",
    )
    copy_threshold: float = Field(
        0.95, gt=0, le=1, description="A synthetic image whose CLIP cosine similarity to a real shot of its class "
        "is at least this is a near copy (docs/method.md: why 0.95).",
    )
    filter: Literal["none", "disagree", "bottom_fraction"] = Field(
        "none", description="Drop and replace images: none (the paper does not filter); disagree = those zero-shot "
        "CLIP assigns to another class; bottom_fraction = the class's lowest-CLIPScore filter_fraction. Both also "
        "drop near copies.",
    )
    filter_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of a class's images dropped by filter=bottom_fraction."
    )
    max_rounds: int = Field(
        3, ge=0, description="Rounds of replacements (fresh per-image seeds) before a class is left short."
    )
    batch_size: int = Field(64, ge=1, description="Images per CLIP forward pass when computing features.")

    @model_validator(mode="after")
    def _filter_needs_features(self) -> AssessConfig:
        if self.filter != "none" and not self.enabled:
            raise ValueError(f"filter={self.filter!r} needs enabled=true (it filters on the CLIP features)")
        return self


class ClassifyConfig(Section):
    train_on: Literal["synthetic", "synthetic+real", "real"] = Field(
        "synthetic", description="Training data: synthetic only, synthetic plus the real shots, or real only."
    )
    rank: int = Field(16, ge=1, le=1024, description="CLIP LoRA rank (docs/method.md, Stage 3: 16).")
    alpha: float = Field(32.0, gt=0, le=1e5, description="CLIP LoRA alpha (docs/method.md, Stage 3: 32).")
    dropout: float = Field(
        0.1, ge=0, lt=1,
        description="LoRA dropout (docs/method.md, Stage 3: 0.1). Not applied with targets='attn': peft's "
        "LoRA on nn.MultiheadAttention acts through merged weights, so lora_dropout has no effect "
        "(peft 0.21.2).",
    )
    targets: Literal["attn"] = Field(
        "attn",
        description="LoRA on every attention block of both towers: peft wraps nn.MultiheadAttention, adapting "
        "the fused q,k,v projection and out_proj (docs/method.md, Stage 3 note on open_clip 3.3).",
    )
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate (docs/method.md, Stage 3: 1e-4).")
    weight_decay: float = Field(1e-4, ge=0, le=10, description="AdamW weight decay (docs/method.md, Stage 3: 1e-4).")
    min_lr: float = Field(1e-8, ge=0, le=1, description="Cosine schedule floor (docs/method.md, Stage 3: 1e-8).")
    warmup_steps: int = Field(50, ge=0, le=10**7, description="Linear warm-up steps before the cosine decay.")
    epochs: int = Field(60, ge=0, le=10**5, description="Epochs; 0 = zero-shot (docs/method.md, Stage 3: 60, LoFT).")
    batch_size: int = Field(64, ge=1, le=65_536, description="Images per step (docs/method.md, Stage 3: 64).")
    real_weight: float = Field(
        0.8, ge=0, le=1, description="Loss weight of real images in synthetic+real (docs/method.md, Stage 3: 0.8)."
    )
    augment: bool = Field(True, description="docs/method.md, Stage 3 augmentations (RandAugment … solarize).")
    mix_p: float = Field(0.2, ge=0, le=1, description="Probability of Mixup/CutMix on a batch (docs/method.md: 0.2).")
    logit_scale: float = Field(100.0, gt=0, le=1000, description="logits = scale·cos (docs/method.md, Stage 3: 100).")
    val_every: int = Field(1, ge=1, le=10**5, description="Evaluate on val (for epoch selection) every N epochs.")
    num_workers: int = Field(4, ge=0, le=256, description="DataLoader worker processes.")


class EvaluateConfig(Section):
    batch_size: int = Field(256, ge=1, le=65_536, description="Images per forward pass.")


# Settings a search campaign may vary, and their types (adapt = SD LoRA, classify = CLIP LoRA).
SEARCHABLE: dict[str, type] = {"adapt.rank": int, "adapt.lr": float, "classify.rank": int, "classify.lr": float}


class ParamRange(Section):
    """One search dimension: `choices` (categorical) or `low`..`high` (uniform, or log-uniform with `log`)."""

    choices: list[float] | None = Field(None, min_length=1, description="Categorical values.")
    low: float | None = Field(None, description="Lower bound (inclusive).")
    high: float | None = Field(None, description="Upper bound (inclusive).")
    log: bool = Field(False, description="Sample low..high on a log scale.")

    @model_validator(mode="after")
    def _check(self) -> ParamRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("expected choices: [...] or both low and high")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low:g}")
        return self


def _default_space() -> dict[str, ParamRange]:
    return {
        "adapt.rank": ParamRange(choices=[4, 8, 16, 32, 64]),
        "adapt.lr": ParamRange(low=1e-5, high=1e-3, log=True),
        "classify.rank": ParamRange(choices=[4, 8, 16, 32]),
        "classify.lr": ParamRange(low=1e-5, high=1e-3, log=True),
    }


class TuneConfig(Section):
    search: list[str] = Field(
        ["adapt.rank", "adapt.lr"], min_length=1,
        description=f"Which settings a campaign searches; any of {', '.join(SEARCHABLE)}.",
    )
    space: dict[str, ParamRange] = Field(
        default_factory=_default_space,
        description="Range of each searchable setting. A rank's LoRA alpha follows it (alpha/rank kept).",
    )
    fidelity: dict[str, Any] = Field(
        {"generate.images_per_class": 100, "adapt.epochs": 50, "classify.epochs": 20},
        description="Overrides ('section.key': value) applied to every trial to make it cheaper.",
    )
    train_on: Literal["synthetic", "synthetic+real"] = Field(
        "synthetic", description="The trial classifier's training data; its val top-1 is the objective."
    )
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="Stops trials whose val top-1 per epoch trails the others'."
    )
    pruner_warmup_epochs: int = Field(1, ge=0, description="Epochs before a trial may be pruned (median).")
    startup_trials: int = Field(10, ge=0, description="Random trials before TPE models the space.")
    sampler_seed: int | None = Field(0, description="TPE sampler seed (None = random).")
    heartbeat_s: int = Field(60, ge=1, description="Trial heartbeat interval (SQL storage).")
    grace_s: int = Field(180, ge=1, description="A trial without a heartbeat this long is failed and retried.")
    max_retry: int = Field(2, ge=0, description="Retries of a trial whose worker died.")
    min_class_agreement: float | None = Field(
        None, ge=0, le=1, description="Prune a trial before it trains the classifier when its synthetic set's "
        "mean class agreement (quality.json) is below this; None = never (needs assess.enabled).",
    )

    @field_validator("search")
    @classmethod
    def _known_search(cls, v: list[str]) -> list[str]:
        unknown = [k for k in v if k not in SEARCHABLE]
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r}; searchable: {', '.join(SEARCHABLE)}")
        if len(set(v)) != len(v):
            raise ValueError("a parameter is listed twice")
        return v

    @field_validator("space")
    @classmethod
    def _known_space(cls, v: dict[str, ParamRange]) -> dict[str, ParamRange]:
        unknown = [k for k in v if k not in SEARCHABLE]
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r}; searchable: {', '.join(SEARCHABLE)}")
        return {**_default_space(), **v}

    @field_validator("fidelity")
    @classmethod
    def _fidelity_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if k.count(".") != 1 or k.startswith("tune.")]
        if bad:
            raise ValueError(f"key {bad[0]!r}: expected 'section.key' of a stage setting")
        return v

    @model_validator(mode="after")
    def _searched_have_ranges(self) -> TuneConfig:
        for name in self.search:
            r = self.space[name]
            if SEARCHABLE[name] is int and r.choices is not None and any(c != int(c) or c < 1 for c in r.choices):
                raise ValueError(f"space.{name}: ranks must be whole numbers ≥ 1, got {r.choices}")
            if name.endswith(".lr") and ((r.choices is not None and min(r.choices) <= 0) or
                                         (r.low is not None and r.low <= 0)):
                raise ValueError(f"space.{name}: learning rates must be > 0")
        return self


class Config(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    fewshot: FewShotConfig = FewShotConfig()
    adapt: AdaptConfig = AdaptConfig()
    generate: GenerateConfig = GenerateConfig()
    assess: AssessConfig = AssessConfig()
    classify: ClassifyConfig = ClassifyConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tune: TuneConfig = TuneConfig()

    @field_validator("run", "data", "models", "fewshot", "adapt", "generate", "assess", "classify", "evaluate",
                     "tune", mode="before")
    @classmethod
    def _section_is_mapping(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, dict | Section):
            raise ValueError("expected a mapping of keys to values")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --- loading ---------------------------------------------------------------------------------------


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    from datadream.io import read_text

    return _parse_yaml(read_text(path, "config file"), f"config file {path}")


def _parse_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    return data


def preset_files(name: str) -> list[Path]:
    """The YAML files of a preset, base first; an unknown name is a UserError listing the known ones."""
    try:
        return presets.files(name)
    except KeyError:
        raise UserError(f"--preset {name!r}: unknown preset; expected one of {', '.join(presets.names())}") from None


def parse_override(text: str) -> dict:
    """'adapt.rank=8' -> {'adapt': {'rank': 8}}; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected section.key=value")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise UserError(f"--set {text!r}: empty part in key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"--set {key.strip()}: value {raw!r} is not valid YAML ({str(e).splitlines()[0]}); quote a "
                        f"string, e.g. --set '{key.strip()}=\"{raw}\"'") from None
    for p in reversed(parts):
        value = {p: value}
    return value


def layered_overrides(files: list[str | Path] = (), overrides: list[str] = ()) -> dict:
    """--config files then --set overrides merged into one mapping (for passing on as YAML text)."""
    data: dict = {}
    for f in files:
        data = deep_merge(data, _read_yaml(Path(f)))
    for o in overrides:
        data = deep_merge(data, parse_override(o))
    return data


def _format_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        section = e["loc"][:-1]
        model: Any = Config
        for s in section:
            model = model.model_fields[s].annotation if s in model.model_fields else None
            if model is None:
                break
        known = ", ".join(model.model_fields) if model is not None else ""
        return f"{source}: unknown config key {key!r}" + (f" (known here: {known})" if known else "")
    return f"{source}: config key {key!r}: {e['msg']}; got {e.get('input')!r}"


def load_config(
    preset: str | None = "paper", files: list[str | Path] = (), overrides: list[str] = (), text: str = ""
) -> Config:
    """Layer: preset YAML -> each --config file -> each --set override.

    `text` is YAML given inline (a pipeline's config parameter), layered after the files.
    Validated after every layer, so an error names the layer (file or --set) that introduced it.
    """
    layers: list[tuple[str, dict]] = []
    if preset:
        layers += [(f"preset {preset} ({path})", _read_yaml(path)) for path in preset_files(preset)]
    layers += [(f"config file {f}", _read_yaml(Path(f))) for f in files]
    if text.strip():
        layers.append(("inline config", _parse_yaml(text, "inline config")))
    layers += [(f"--set {o}", parse_override(o)) for o in overrides]
    data: dict = {}
    config = Config()
    for source, layer in layers:
        data = deep_merge(data, layer)
        try:
            config = Config.model_validate(data)
        except ValidationError as e:
            raise UserError(_format_error(e, source)) from None
    return config
