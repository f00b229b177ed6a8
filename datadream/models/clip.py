"""CLIP (open_clip) from a preset name, a `local-dir:` folder or an open_clip name + pretrained tag,
and the LoRA that the classify stage trains on it (docs/method.md, Stage 3).

`tiny` builds a small random-init CLIP from the explicit config below and saves it as an open_clip
folder (`open_clip_config.json` + `open_clip_model.safetensors`), then loads it through the very
`local-dir:` path users point at their own mirrored weights. Weights are read as safetensors or
with `weights_only=True` only.

LoRA: peft wraps every `attn` (nn.MultiheadAttention) module of both towers, adapting the fused
q,k,v in_proj and out_proj. Targeting `out_proj` alone would be silently ignored by peft, because
nn.MultiheadAttention never calls out_proj's forward.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datadream.config import ClassifyConfig, ModelsConfig
from datadream.errors import UserError
from datadream.io import sha256_json, staged_dir
from datadream.models import cache_root

log = logging.getLogger(__name__)

# Small enough for CPU in seconds; both towers are real open_clip transformers whose attention is
# nn.MultiheadAttention, so LoRA lands where it lands on ViT-B/16.
# vision heads = width // head_width = 2; vocab_size 49408 is required by the bundled BPE tokenizer.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# OpenAI CLIP's normalisation, so the tiny model preprocesses exactly like ViT-B/16 at a smaller size.
TINY_CLIP_PREPROCESS: dict[str, Any] = {
    "size": 32,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
TINY_CLIP_SEED = 0
LOCAL_DIR = "local-dir:"


def tiny_clip_dir(models: ModelsConfig) -> Path:
    """Where `models.clip: tiny` lives; the name carries a hash of its config, so edits rebuild it."""
    key = sha256_json(
        {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": TINY_CLIP_PREPROCESS, "seed": TINY_CLIP_SEED}
    )
    return cache_root(models) / f"tiny-clip-{key[:12]}"


def build_tiny_clip(folder: str | os.PathLike) -> Path:
    """Build the tiny CLIP deterministically and save it as an open_clip folder (atomically, idempotent)."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder = Path(folder)
    if (folder / "open_clip_config.json").exists() and (folder / "open_clip_model.safetensors").exists():
        return folder
    with staged_dir(folder, shared_marker="open_clip_model.safetensors") as tmp:
        with torch.random.fork_rng(devices=[]):  # a fixed init that leaves the caller's RNG alone
            torch.manual_seed(TINY_CLIP_SEED)
            model = CLIP(**TINY_CLIP_CONFIG)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / "open_clip_model.safetensors")
        config = {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": TINY_CLIP_PREPROCESS}
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    log.info("built tiny CLIP in %s", folder)
    return folder


def _resolve(models: ModelsConfig) -> tuple[str, str | None]:
    """(open_clip model name, pretrained) for `models.clip` / `models.clip_pretrained`, validated."""
    import open_clip

    spec = models.clip.strip()
    if spec == "tiny":
        return LOCAL_DIR + str(build_tiny_clip(tiny_clip_dir(models))), None
    if spec.startswith(LOCAL_DIR):
        folder = spec[len(LOCAL_DIR):]
        if folder.startswith("s3://"):  # an open_clip folder on S3, mirrored into the cache (ETag-checked)
            from datadream import storage

            folder = storage.localize(folder)
        folder = Path(folder).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"models.clip={spec!r}: no open_clip_config.json in folder {folder}")
        return LOCAL_DIR + str(folder), None
    if spec not in open_clip.list_models():
        raise UserError(
            f"models.clip={spec!r}: not an open_clip model name (e.g. ViT-B-16), "
            "'local-dir:<folder>' or 'tiny'"
        )
    pretrained = models.clip_pretrained
    if pretrained is None:
        log.warning("models.clip_pretrained is null: %s starts from random weights", spec)
        return spec, None
    if pretrained in open_clip.list_pretrained_tags_by_model(spec):
        return spec, pretrained
    if pretrained.startswith("s3://"):  # a weights file on S3: its folder is mirrored, the file used
        from datadream import storage

        parent, _, name = pretrained.rpartition("/")
        pretrained = str(storage.localize(parent) / name)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return spec, str(path)  # open_clip reads .safetensors directly, anything else with weights_only=True
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec)) or "none"
    raise UserError(
        f"models.clip_pretrained={pretrained!r}: neither a weights file nor a tag of {spec} (tags: {tags})"
    )


def quick_gelu_of(name: str, pretrained: str | None) -> bool:
    """Whether the pretrained tag's weights expect QuickGELU (e.g. every `openai` tag)."""
    import open_clip

    if not pretrained or name.startswith(LOCAL_DIR) or Path(pretrained).expanduser().is_file():
        return False
    return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


def load_clip(models: ModelsConfig, device: str | torch.device = "cpu"):
    """(model, tokenizer, preprocess) for `models.clip`.

    preprocess = dict(image_size, mean, std, interpolation), from the model's open_clip config.

    The model is fp32 on `device` in eval mode; training stages autocast around it.
    """
    import open_clip

    name, pretrained = _resolve(models)
    cache = models.cache_dir  # None: Hugging Face's own cache, where images may have baked the weights
    # Without pretrained weights (an architecture at random init, for benchmarks) the weights must still
    # be the same in every process: classify and evaluate each build the model and must agree.
    # OpenAI's weights were trained with QuickGELU; open_clip only *warns* when a tag's activation
    # differs from the model config (ViT-B-16 + openai), so take it from the tag.
    quick_gelu = bool(quick_gelu_of(name, pretrained))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(
            name, pretrained=pretrained, device=device, cache_dir=cache, weights_only=True,
            require_pretrained=pretrained is not None, force_quick_gelu=quick_gelu,
        )
    model.eval()
    tokenizer = open_clip.get_tokenizer(name, cache_dir=cache)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    if isinstance(size, list | tuple):
        size = size[0] if len(set(size)) == 1 else list(size)
    preprocess = {
        "image_size": size,
        "mean": [float(m) for m in cfg["mean"]],
        "std": [float(s) for s in cfg["std"]],
        "interpolation": cfg.get("interpolation", "bicubic"),
    }
    return model, tokenizer, preprocess


# --- LoRA --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _lora_mha_class():
    """peft's LoRA layer for nn.MultiheadAttention, with a forward that never writes the base weights.

    peft 0.21.2 runs the adapted attention by merging ΔW into the stored in_proj/out_proj weights,
    calling the layer, and subtracting ΔW again. Float rounding then nudges the frozen weights on every
    forward (so "frozen" is not bitwise frozen and a resumed run drifts from an uninterrupted one), and
    out_proj's ΔW is added twice (huggingface/peft#3774). This subclass hands W + ΔW to the attention
    call through torch.func.functional_call instead: the stored weights are only read, ΔW counts once,
    and gradients reach lora_A/lora_B as before. lora_dropout has no effect either way, because the
    adapter acts through merged weights, not on the layer input.
    """
    from peft.tuners.lora.layer import MultiheadAttention as PeftLoraMHA
    from torch.func import functional_call

    class LoraMultiheadAttention(PeftLoraMHA):
        def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any):
            active = [a for a in self.active_adapters if a in self.lora_A]
            if self.disable_adapters or self.merged or not active:
                return super().forward(query, *args, **kwargs)
            self._check_forward_args(query, *args, **kwargs)
            base = self.get_base_layer()
            out_proj = base.out_proj  # peft's LoRA Linear around the real out_proj
            w_in = base.in_proj_weight + sum(self.get_delta_weight(a) for a in active)
            w_out = out_proj.base_layer.weight + sum(out_proj.get_delta_weight(a) for a in active)
            out, weights = functional_call(
                base, {"in_proj_weight": w_in, "out_proj.base_layer.weight": w_out}, (query, *args), kwargs
            )
            return out.to(query.dtype), weights

    return LoraMultiheadAttention


def add_clip_lora(model: nn.Module, cfg: ClassifyConfig, *, init_lora_weights: bool = True) -> nn.Module:
    """Inject LoRA (rank cfg.rank, alpha cfg.alpha) into every `attn` of both towers; freeze all else.

    Uses peft's own `inject_adapter_in_model`. `init_lora_weights=False` gives a non-zero B, so tests
    can prove the adapter changes outputs (peft's default B=0 is an identity). Raises UserError when a
    tower has no nn.MultiheadAttention to adapt (e.g. timm or Hugging Face towers).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if cfg.targets != "attn":
        raise UserError(f"classify.targets={cfg.targets!r}: only 'attn' is supported")
    towers = {"image": getattr(model, "visual", None), "text": getattr(model, "transformer", None)}
    for tower, module in towers.items():
        if module is None or not any(isinstance(m, nn.MultiheadAttention) for m in module.modules()):
            raise UserError(
                f"classify.targets='attn': the {tower} tower of this CLIP has no "
                "nn.MultiheadAttention to adapt"
            )
    if cfg.dropout > 0:
        log.info("classify.dropout=%s is not applied: peft's LoRA on nn.MultiheadAttention acts through "
                 "merged weights, so there is no layer input to drop out", cfg.dropout)
    lora = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=["attn"],
        init_lora_weights=init_lora_weights,
    )
    lora._register_custom_module({nn.MultiheadAttention: _lora_mha_class()})
    model = inject_adapter_in_model(lora, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    for tower, module in towers.items():
        if not any("lora_" in n for n, _ in module.named_parameters()):
            raise RuntimeError(f"LoRA was not injected into the {tower} tower")
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def get_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (peft's key naming), detached copies on CPU, ready for safetensors."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def set_lora_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "LoRA state") -> None:
    """Load adapter tensors saved by `get_lora_state`; every adapter tensor must be present and fit."""
    from peft import set_peft_model_state_dict

    expected = {k: v.shape for k, v in get_lora_state(model).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected.keys() & state.keys() if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise UserError(
            f"{source}: does not fit this CLIP's LoRA ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} wrong-shaped tensors, e.g. {first!r}); "
            "was it trained on another models.clip or rank?"
        )
    set_peft_model_state_dict(model, state)


# --- text features -----------------------------------------------------------------------------------


def _trimmable(model: nn.Module) -> bool:
    """Whether the text tower is open_clip's causal transformer pooled at the end-of-text token."""
    return (all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "ln_final", "transformer"))
            and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) in ("argmax", "eos"))


def trim_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Class prompts' token ids cut after the longest prompt's end-of-text token (a host tensor in, out).

    Under the causal mask no position attends to a later one, and the features are pooled at the
    end-of-text token, so the padding after it never reaches the result: `encode_text` on the trimmed
    ids equals open_clip's `encode_text` on the full 77-token context, at a fraction of the cost.
    """
    if not _trimmable(model):
        return tokens
    if model.text_pool_type == "eos":
        last = int((tokens == model.text_eos_id).int().argmax(-1).max())
    else:
        last = int(tokens.argmax(-1).max())
    return tokens[:, : last + 1].contiguous()


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text for a context of any length up to the model's (see trim_tokens)."""
    from open_clip.transformer import text_global_pool

    n = tokens.shape[1]
    if not _trimmable(model) or n == model.positional_embedding.shape[0]:
        return model.encode_text(tokens)
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return x


def apply_speed_options(model: nn.Module, run, device) -> list[str]:
    """run.compile for the classifier: both towers compiled in place, on any device."""
    if not run.compile:
        return []
    model.visual.compile()
    model.transformer.compile()
    return ["compile"]
