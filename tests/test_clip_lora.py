"""CLIP loading and the LoRA the classify stage trains: it must change outputs and touch nothing else."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from datadream.config import ClassifyConfig, ModelsConfig
from datadream.errors import UserError
from datadream.models.clip import (
    TINY_CLIP_CONFIG,
    add_clip_lora,
    build_tiny_clip,
    get_lora_state,
    load_clip,
    lora_parameters,
    set_lora_state,
    tiny_clip_dir,
)

LORA = ClassifyConfig(rank=4, alpha=8.0)


@pytest.fixture
def clip(tiny):
    model, tokenizer, preprocess = load_clip(tiny().models)
    return model, tokenizer, preprocess


def _inputs(tokenizer, preprocess):
    size = preprocess["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return images, tokenizer(["a photo of a cat", "a photo of a dog"])


def test_tiny_clip_round_trips_through_its_folder(tiny, tmp_path):
    models = tiny().models
    folder = build_tiny_clip(tiny_clip_dir(models))
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"] == TINY_CLIP_CONFIG
    assert (folder / "open_clip_model.safetensors").exists()
    # Building again is a no-op; building elsewhere gives the same weights; loading through the
    # `local-dir:` path users use gives the same model as `tiny`.
    assert build_tiny_clip(folder) == folder
    other = build_tiny_clip(tmp_path / "copy")
    via_tiny, _, pre_tiny = load_clip(models)
    via_dir, _, pre_dir = load_clip(ModelsConfig(clip=f"local-dir:{other}", clip_pretrained=None))
    assert pre_tiny == pre_dir and pre_tiny["image_size"] == 32
    a, b = via_tiny.state_dict(), via_dir.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_with_nonzero_init_changes_image_and_text_embeddings(clip):
    model, tokenizer, preprocess = clip
    images, text = _inputs(tokenizer, preprocess)
    with torch.no_grad():
        base_image, base_text = model.encode_image(images), model.encode_text(text)
        model = add_clip_lora(model, LORA, init_lora_weights=False)
        lora_image, lora_text = model.encode_image(images), model.encode_text(text)
    assert not torch.allclose(base_image, lora_image, atol=1e-4)
    assert not torch.allclose(base_text, lora_text, atol=1e-4)


def test_default_init_is_the_identity(clip):
    model, tokenizer, preprocess = clip
    images, text = _inputs(tokenizer, preprocess)
    with torch.no_grad():
        base = model.encode_image(images), model.encode_text(text)
        model = add_clip_lora(model, LORA)
        adapted = model.encode_image(images), model.encode_text(text)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(base, adapted, strict=True))


def test_only_lora_trains_and_both_towers_have_it(clip):
    model, _, _ = clip
    model = add_clip_lora(model, LORA, init_lora_weights=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in lora_parameters(model)) > 0
    for tower in ("visual.", "transformer."):
        adapted = [n for n in trainable if n.startswith(tower)]
        layers = TINY_CLIP_CONFIG["vision_cfg" if tower == "visual." else "text_cfg"]["layers"]
        # Per block: lora_A/B on the fused q,k,v in_proj and on out_proj.
        assert len(adapted) == 4 * layers, adapted
        assert any(".attn.lora_A" in n for n in adapted) and any("out_proj.lora_A" in n for n in adapted)


def test_optimizer_steps_change_only_lora_and_base_weights_stay_bitwise_equal(clip):
    model, tokenizer, preprocess = clip
    images, text = _inputs(tokenizer, preprocess)
    model = add_clip_lora(model, LORA, init_lora_weights=False)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = get_lora_state(model)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    for _ in range(3):
        image, txt = model.encode_image(images, normalize=True), model.encode_text(text, normalize=True)
        loss = nn.functional.cross_entropy(100 * image @ txt.t(), torch.arange(2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    base_after = {n: p.detach() for n, p in model.named_parameters() if "lora_" not in n}
    assert base_after.keys() == base_before.keys()
    changed = [n for n in base_before if not torch.equal(base_before[n], base_after[n])]
    assert changed == []  # peft's own MHA forward would drift in_proj/out_proj by float rounding
    lora_after = get_lora_state(model)
    assert all(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)


def test_adapted_attention_equals_attention_with_merged_weights():
    """ΔW counts exactly once, for in_proj and for out_proj (huggingface/peft#3774 adds out_proj's twice)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual, self.transformer = Block(), Block()

    torch.manual_seed(0)
    model = TwoTowers()
    reference = Block()
    reference.load_state_dict(model.visual.state_dict())
    model = add_clip_lora(model, LORA, init_lora_weights=False)
    attn = model.visual.attn
    with torch.no_grad():
        reference.attn.in_proj_weight += attn.get_delta_weight("default")
        reference.attn.out_proj.weight += attn.base_layer.out_proj.get_delta_weight("default")
    x = torch.randn(2, 5, 16)
    assert torch.allclose(model.visual(x), reference(x), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(model.eval().visual(x), reference.eval()(x), atol=1e-6)


def test_lora_state_round_trips(clip, tiny):
    model, _, _ = clip
    model = add_clip_lora(model, LORA, init_lora_weights=False)
    state = get_lora_state(model)
    fresh, _, _ = load_clip(tiny().models)
    fresh = add_clip_lora(fresh, LORA)
    set_lora_state(fresh, state)
    assert all(torch.equal(state[k], v) for k, v in get_lora_state(fresh).items())
    with pytest.raises(UserError, match="does not fit"):
        set_lora_state(fresh, {k: v for k, v in list(state.items())[1:]})
    other_rank, _, _ = load_clip(tiny().models)
    other_rank = add_clip_lora(other_rank, ClassifyConfig(rank=2, alpha=4.0))
    with pytest.raises(UserError, match="wrong-shaped"):
        set_lora_state(other_rank, state)


@pytest.mark.parametrize(
    ("clip_name", "pretrained", "message"),
    [
        ("ViT-Nonexistent-99", None, r"models\.clip='ViT-Nonexistent-99'"),
        ("local-dir:/no/such/folder", None, r"models\.clip='local-dir:/no/such/folder'"),
        ("ViT-B-16", "/no/such/w.safetensors", r"models\.clip_pretrained='/no/such/w\.safetensors'"),
        ("ViT-B-16", "not-a-tag", r"models\.clip_pretrained='not-a-tag'"),
    ],
)
def test_bad_model_names_are_user_errors(clip_name, pretrained, message):
    with pytest.raises(UserError, match=message):
        load_clip(ModelsConfig(clip=clip_name, clip_pretrained=pretrained))


def test_random_init_architecture_is_the_same_in_every_process(tiny):
    # classify and evaluate each build the base model; at random init (benchmarks) they must agree.
    from datadream.models.clip import load_clip

    models = tiny("models.clip=ViT-B-32", "models.clip_pretrained=null").models
    a, _, _ = load_clip(models)
    b, _, _ = load_clip(models)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_openai_tags_get_quick_gelu():
    # open_clip only warns when ViT-B-16 (GELU) meets OpenAI weights (trained with QuickGELU).
    from datadream.models.clip import quick_gelu_of

    assert quick_gelu_of("ViT-B-16", "openai") is True
    assert quick_gelu_of("ViT-B-16", "laion2b_s34b_b88k") is False
    assert quick_gelu_of("ViT-B-16", None) is False


def test_text_features_on_the_trimmed_context_equal_the_full_context(clip):
    from datadream.models.clip import encode_text, trim_tokens

    model, tokenizer, _ = clip
    model = add_clip_lora(model, LORA, init_lora_weights=False)  # a non-identity adapter, as in training
    tokens = tokenizer(["a photo of a cat", "a photo of a very long and rather unusual dog", "x"])
    trimmed = trim_tokens(model, tokens)
    # Cut right after the longest prompt's end-of-text token, which every prompt keeps.
    assert trimmed.shape[1] == int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]
    assert torch.equal(trimmed.argmax(-1), tokens.argmax(-1))
    with torch.no_grad():
        full = model.encode_text(tokens)
        short = encode_text(model, trimmed)
        straight = encode_text(model, tokens)
    # Causal mask + pooling at the end-of-text token: the padding never reaches the features. Only the
    # matmul shapes differ, so the results agree to float rounding.
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)
    # The full context is passed straight to open_clip: the same call, so the same bits (in the same grad
    # mode: with autograd on, peft's LoRA on nn.MultiheadAttention merges its weights by another path).
    assert torch.equal(straight, full)
