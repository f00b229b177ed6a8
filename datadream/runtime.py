"""Device, precision and seeding shared by the training and generation stages.

torch is imported inside the functions that use it: `derive_seed` is also what the few-shot sampler
and the dataset formats use, and a pipeline step that only samples should not pay torch's import.
"""

from __future__ import annotations

import hashlib
import logging
import random
from typing import TYPE_CHECKING

from datadream.config import RunConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def resolve_device(run: RunConfig) -> torch.device:
    import torch

    if run.device == "cuda" and not torch.cuda.is_available():
        from datadream.errors import UserError

        raise UserError("run.device='cuda' but no CUDA device is available; use run.device=auto or cpu")
    if run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(run.device)


def autocast_dtype(run: RunConfig, device: torch.device) -> torch.dtype | None:
    """The dtype to autocast to, or None for plain fp32 (always on CPU)."""
    import torch

    if device.type != "cuda" or run.precision == "fp32":
        return None
    if run.precision == "fp16":
        return torch.float16
    if run.precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts, e.g. (seed, class slug, image index).

    Stable across processes and Python versions (unlike hash()), so a resumed or sharded run draws
    the same randomness as an uninterrupted one.
    """
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    import torch

    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# --- step metrics ---------------------------------------------------------------------------------------
# The stages report step metrics (loss, lr, throughput, val top-1) through `step_metrics()` without
# knowing where they go: a tracked step (datadream.steps) registers MLflow's writer here, so a stage
# run inside it logs to the step's active run, and an untracked one costs nothing.


class NoStepMetrics:
    """Step metrics that go nowhere."""

    def add(self, metrics, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_) -> None:
        pass


_step_metrics_factory = None


def register_step_metrics(factory) -> None:
    """`factory()` makes the step-metrics writer of the current (tracked) run; tracking calls this."""
    global _step_metrics_factory
    _step_metrics_factory = factory


def step_metrics():
    """A writer with `add(metrics, step)` and `flush()` (a context manager too) for the running stage."""
    return _step_metrics_factory() if _step_metrics_factory is not None else NoStepMetrics()


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on `device`, or a no-op context for plain fp32 (dtype None)."""
    import contextlib

    import torch

    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor to `device` without waiting for the device's queue (pinned, non-blocking on CUDA)."""
    if device.type != "cuda" or t.is_cuda:
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
