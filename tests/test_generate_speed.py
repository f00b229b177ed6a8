"""generate's speed-ups keep its results: the device-side PNDM step, fused adapters with exact base weights
restored, and PNG writes off the main thread (errors still reach the caller)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from datadream.models.sd import FusedLora, device_pndm_class, load_sd_pipeline
from datadream.stages.generate import PngWriter


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from datadream.config import load_config

    return load_sd_pipeline(load_config("tiny", overrides=[f"models.cache_dir={tmp_path_factory.mktemp('m')}"]).models)


def test_the_pipeline_uses_the_device_pndm_and_it_steps_like_diffusers(pipe):
    from diffusers import PNDMScheduler

    assert type(pipe.scheduler) is device_pndm_class()
    ours, stock = pipe.scheduler, PNDMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    a, b = sample.clone(), sample.clone()
    for s in (ours, stock):
        s.set_timesteps(10)
    for t in stock.timesteps:  # timestep tensors, as the pipeline passes them
        eps = torch.randn(2, 4, 8, 8, generator=g)
        a = ours.step(eps, t, a).prev_sample
        b = stock.step(eps, t, b).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _add_adapter(pipe, name, seed):
    from peft import LoraConfig

    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False),
                          adapter_name=name)


def test_fused_adapter_matches_the_unfused_one_and_base_weights_come_back_exactly(pipe):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    fused = FusedLora()
    for n, name in enumerate(("a", "b")):
        _add_adapter(pipe, name, n)
        pipe.unet.set_adapters([name])
        with torch.no_grad():
            unfused = pipe.unet(latents, 10, hidden).sample
            fused.fuse(pipe, name, 1.0)
            merged = pipe.unet(latents, 10, hidden).sample
        torch.testing.assert_close(merged, unfused, rtol=1e-4, atol=1e-5)
        fused.restore(pipe, name)
    # The adapters are gone (peft leaves its empty wrappers, hence the base_layer in the names).
    after = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit for bit, however many classes


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def test_png_writer_writes_what_a_serial_save_would_and_bounds_its_queue(tmp_path):
    writer = PngWriter(workers=2, max_pending=2)
    try:
        for i in range(6):
            writer.submit(tmp_path / f"{i}.png", _image(i))
            assert writer._slots._value >= 0
        writer.wait()
    finally:
        writer.shutdown()
    for i in range(6):
        buf = io.BytesIO()
        _image(i).save(buf, format="PNG")
        assert (tmp_path / f"{i}.png").read_bytes() == buf.getvalue()
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_png_writer_raises_a_write_error_in_the_caller(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    writer = PngWriter(workers=2, max_pending=4)
    try:
        writer.submit(tmp_path / "taken" / "0.png", _image(0))
        with pytest.raises((NotADirectoryError, FileExistsError)):
            writer.wait()
    finally:
        writer.shutdown()
