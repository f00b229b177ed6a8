"""Stable Diffusion from a preset name, a Hugging Face id or a local diffusers folder.

`tiny` builds a small random-init SD (UNet, VAE, CLIP text encoder, tokenizer, scheduler) from the
explicit config below and saves it as a diffusers folder, so tests and the demo load it through the
very code path that loads SD 2.1 base from a mirror folder. Only safetensors are read.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from datadream.config import ModelsConfig
from datadream.errors import UserError
from datadream.io import sha256_json, staged_dir
from datadream.models import cache_root

log = logging.getLogger(__name__)

# Small enough for CPU in seconds, big enough that LoRA has real matrices on every attention
# projection (sizes as in diffusers' LoRA tests, tests/lora/test_lora_layers_sd.py).
TINY_SD_CONFIG = {
    "unet": {
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "block_out_channels": [32, 64],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "sample_size": 64,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "projection_dim": 32,
        "hidden_act": "gelu",
    },
    # SD 2.1 base's scheduler (PNDM) with its betas, so the tiny model samples the same way.
    "scheduler": {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    },
    "seed": 0,
}

# Stable Diffusion 2.1 base's architecture (its unet/vae/text_encoder config.json), for benchmarks
# with real sizes at random init where no weights can be downloaded (docs/method.md, Stage 1).
SD21_BASE_RANDOM_CONFIG = {
    "unet": {
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
        "norm_num_groups": 32,
    },
    "vae": {
        "block_out_channels": [128, 256, 512, 512],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4,
        "layers_per_block": 2,
        "sample_size": 512,
    },
    "text_encoder": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "projection_dim": 512,
        "hidden_act": "gelu",
    },
    "scheduler": TINY_SD_CONFIG["scheduler"],
    "seed": 0,
}

# Names accepted for models.sd that build a random-init model instead of loading weights.
RANDOM_ARCHS = {"tiny": TINY_SD_CONFIG, "sd21-base-random": SD21_BASE_RANDOM_CONFIG}


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[str]]:
    """The CLIP BPE vocabulary that open_clip ships, as CLIPTokenizer's vocab.json + merges.

    Same construction as CLIP's simple tokenizer: byte symbols, the same with '</w>', the merges,
    then the two special tokens — 49,408 entries, so ids match SD's tokenizer.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77).save_pretrained(folder)


def build_random_sd(folder: str | os.PathLike, arch: dict = TINY_SD_CONFIG) -> Path:
    """Build a random-init SD pipeline deterministically and save it as a diffusers folder (atomically)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    # A parallel shard may build the same cache entry at the same time; both are identical.
    with staged_dir(folder, shared_marker="model_index.json") as tmp:
        cfg = arch
        torch.manual_seed(cfg["seed"])
        unet = UNet2DConditionModel(**cfg["unet"])
        torch.manual_seed(cfg["seed"])
        vae = AutoencoderKL(**cfg["vae"])
        torch.manual_seed(cfg["seed"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        write_clip_tokenizer(tmp / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=PNDMScheduler(**cfg["scheduler"]), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
    log.info("built random-init Stable Diffusion in %s", folder)
    return folder


def resolve_sd(models: ModelsConfig) -> str:
    """The local folder or Hub id that `from_pretrained` should read for `models.sd`."""
    spec = models.sd.strip()
    if spec in RANDOM_ARCHS:
        arch = RANDOM_ARCHS[spec]
        return str(build_random_sd(cache_root(models) / f"{spec}-sd-{sha256_json(arch)[:12]}", arch))
    if spec.startswith("s3://"):  # a diffusers folder on S3, mirrored into the cache (ETag-checked)
        from datadream import storage

        spec = str(storage.localize(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise UserError(f"models.sd={spec!r}: folder has no model_index.json (expected a diffusers folder)")
        return str(path)
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:  # a Hub id is exactly 'org/name'
        raise UserError(f"models.sd={spec!r}: folder not found")
    return spec  # a Hugging Face id


def _no_loading_bars() -> None:
    """diffusers' and transformers' per-component loading bars say nothing a log needs; off."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_sd_components(models: ModelsConfig):
    """tokenizer, text_encoder, vae, unet, noise_scheduler for training (fp32, CPU)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _no_loading_bars()

    src = resolve_sd(models)
    kw = {"revision": models.sd_revision} if models.sd_revision else {}
    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", use_safetensors=True, **kw)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", use_safetensors=True, **kw)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", use_safetensors=True, **kw)
    # Training noise follows the model's own scheduler config (betas, prediction type).
    noise_scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


# What the adapter trainer's loss implements (the noise, or the velocity of v-prediction models).
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(models: ModelsConfig) -> str:
    """The model's training target from its scheduler config, checked before any training: a
    `prediction_type` the trainer does not implement (e.g. "sample") is a UserError naming it."""
    from diffusers import DDPMScheduler

    src = resolve_sd(models)
    kw = {"revision": models.sd_revision} if models.sd_revision else {}
    prediction_type = DDPMScheduler.load_config(src, subfolder="scheduler", **kw).get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"models.sd {models.sd}: scheduler prediction_type {prediction_type!r} is not supported; "
                        f"expected one of {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def load_sd_pipeline(models: ModelsConfig, dtype=None):
    from diffusers import StableDiffusionPipeline

    _no_loading_bars()
    src = resolve_sd(models)
    kw = {"revision": models.sd_revision} if models.sd_revision else {}
    if dtype is not None:
        kw["torch_dtype"] = dtype
    pipe = StableDiffusionPipeline.from_pretrained(
        src, use_safetensors=True, safety_checker=None, requires_safety_checker=False, **kw
    )
    pipe.set_progress_bar_config(disable=True)
    from diffusers import PNDMScheduler

    if type(pipe.scheduler) is PNDMScheduler:  # SD 2.1 base's (and tiny's) scheduler: same steps, no host syncs
        pipe.scheduler = device_pndm_class().from_config(pipe.scheduler.config)
    return pipe


@lru_cache(maxsize=1)
def device_pndm_class():
    """diffusers' PNDMScheduler with its per-step coefficients looked up on the sample's device.

    The stock `_get_prev_sample` indexes the CPU `alphas_cumprod` with the timestep tensor the pipeline
    keeps on the GPU and branches on `prev_timestep >= 0` in Python: two host syncs per denoising step.
    Here the table lives beside the sample and the branch is a `torch.where`; the arithmetic is the same.
    """
    import torch
    from diffusers import PNDMScheduler

    class DevicePNDMScheduler(PNDMScheduler):
        def _table(self, device):
            cached = getattr(self, "_device_table", None)
            if cached is None or cached[0].device != device:
                cached = (self.alphas_cumprod.to(device), torch.as_tensor(self.final_alpha_cumprod).to(device))
                self._device_table = cached
            return cached

        def _get_prev_sample(self, sample, timestep, prev_timestep, model_output):
            if not torch.is_tensor(timestep):
                return super()._get_prev_sample(sample, timestep, prev_timestep, model_output)
            alphas, final = self._table(sample.device)
            t = timestep.reshape(1).to(alphas.device)
            prev = torch.as_tensor(prev_timestep).reshape(1).to(alphas.device)
            alpha_prod_t = alphas.index_select(0, t).squeeze(0)
            alpha_prod_t_prev = torch.where(prev >= 0, alphas.index_select(0, prev.clamp(min=0)), final).squeeze(0)
            beta_prod_t = 1 - alpha_prod_t
            beta_prod_t_prev = 1 - alpha_prod_t_prev
            if self.config.prediction_type == "v_prediction":
                model_output = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
            elif self.config.prediction_type != "epsilon":
                raise ValueError(f"prediction_type given as {self.config.prediction_type} must be one of `epsilon` "
                                 "or `v_prediction`")
            # PNDM paper, formula (9), as in diffusers' PNDMScheduler._get_prev_sample.
            sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
            model_output_denom_coeff = alpha_prod_t * beta_prod_t_prev ** (0.5) + (
                alpha_prod_t * beta_prod_t * alpha_prod_t_prev
            ) ** (0.5)
            return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff

    return DevicePNDMScheduler


class FusedLora:
    """One adapter at a time merged into the pipeline's weights, and the exact base weights put back after.

    `fuse(pipe, name, scale)` merges an adapter loaded with `load_lora_weights(..., adapter_name=name)` into
    the UNet and text encoder (generation then runs the plain layers: no LoRA branch per layer and step);
    `restore(pipe, name)` unfuses it, copies the saved base weights back (unfusing in bf16 leaves rounding
    behind, which would accumulate class after class) and deletes the adapter.
    """

    def __init__(self):
        self.saved: dict[tuple[str, str], object] = {}

    def _lora_layers(self, pipe):
        from peft.tuners.lora import LoraLayer

        for component in ("unet", "text_encoder"):
            module = getattr(pipe, component, None)
            if module is None:
                continue
            for name, m in module.named_modules():
                if isinstance(m, LoraLayer):
                    yield (component, name), m.get_base_layer()

    def fuse(self, pipe, name: str, scale: float) -> None:
        for key, base in self._lora_layers(pipe):
            if key not in self.saved:
                self.saved[key] = base.weight.detach().clone()
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale, adapter_names=[name])

    def restore(self, pipe, name: str) -> None:
        import torch

        pipe.unfuse_lora(components=["unet", "text_encoder"])
        with torch.no_grad():
            for key, base in self._lora_layers(pipe):
                base.weight.copy_(self.saved[key])
        pipe.delete_adapters(name)




# --- speed options (run.compile, run.channels_last, run.attention) --------------------------------------


def apply_speed_options(run, device, *, unet=None, vae=None, text_encoder=None) -> list[str]:
    """Apply the run section's speed options to the given SD modules, in place; returns what was applied.

    run.attention=classic sets diffusers' AttnProcessor and run.compile compiles (inductor: Triton kernels on
    CUDA, C++ on CPU, which needs a C compiler), on any device; channels_last acts on CUDA only. Compilation
    is nn.Module.compile, in place, so parameter names (and so LoRA state dict keys and checkpoints) do not
    change.
    """
    import torch

    applied = []
    if run.attention == "classic":
        from diffusers.models.attention_processor import AttnProcessor

        for m in (unet, vae):
            if m is not None:
                m.set_attn_processor(AttnProcessor())
        applied.append("attention=classic")
    if run.channels_last and getattr(device, "type", device) == "cuda":
        for m in (unet, vae):
            if m is not None:
                m.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if run.compile:
        # Generation swaps adapters per class and adapt re-initialises them per unit; raise dynamo's
        # recompile limit (default 8) so that it does not fall back to eager without saying so.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        for m in (unet, text_encoder):
            if m is not None:
                m.compile()
        if vae is not None:
            vae.decoder.compile()
        applied.append("compile")
    return applied


def attention_context(run, device):
    """The SDPA kernel choice for run.attention=flash (flash, math where flash cannot run); else nothing."""
    import contextlib

    if run.attention != "flash":
        return contextlib.nullcontext()
    if getattr(device, "type", device) != "cuda":
        raise UserError("run.attention=flash needs a CUDA device; use sdpa on CPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
