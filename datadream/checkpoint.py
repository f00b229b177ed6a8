"""Resumable checkpoints, published atomically.

A checkpoint is a folder `ckpt-<step>/` holding `weights.safetensors` (trainable tensors),
`state.pt` (optimizer and scheduler state: tensors and numbers only, read back with
`weights_only=True`) and `COMMITTED.json` (step, sha256 of each file, extra metadata). It is built
under a temporary name and renamed into place after COMMITTED.json is written, so a kill at any
moment leaves either the previous checkpoint or the new one, never a half one. Resume picks the
newest folder whose COMMITTED.json checks out and ignores the rest.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from datadream.io import atomic_write_bytes, atomic_write_json, mkdtemp, sha256_file

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt-(\d+)$")


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep: int = 1,
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(mkdtemp(prefix=f".ckpt-{step}.", suffix=".tmp", dir=root))
    try:
        # Serialised in memory and written by us: a full disk is then an OSError naming the file, where
        # torch's zip writer would say only "unexpected pos".
        atomic_write_bytes(tmp / "weights.safetensors",
                           save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(tmp / "state.pt", buf.getvalue())
        files = {n: sha256_file(tmp / n) for n in ("weights.safetensors", "state.pt")}
        atomic_write_json(tmp / "COMMITTED.json", {"step": step, "files": files, "meta": meta or {}})
        final = root / f"ckpt-{step}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Rotate only after the new one is in place.
    for old in sorted(_committed(root), key=lambda p: _step(p))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step(p: Path) -> int:
    return int(_NAME.match(p.name)[1])


def _committed(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "COMMITTED.json").exists()]


def load_latest(root: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest intact checkpoint under `root`, or None. Damaged ones are logged and skipped."""
    root = Path(root)
    if not root.is_dir():
        return None
    for path in sorted(_committed(root), key=_step, reverse=True):
        try:
            commit = json.loads((path / "COMMITTED.json").read_text())
            for name, digest in commit["files"].items():
                if sha256_file(path / name) != digest:
                    raise ValueError(f"{name} checksum mismatch")
            tensors = load_file(path / "weights.safetensors", device=str(map_location))
            state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
        except Exception as e:  # a damaged checkpoint is skipped, never trusted
            log.warning("skipping damaged checkpoint %s: %s", path, e)
            continue
        return Checkpoint(int(commit["step"]), tensors, state, commit.get("meta", {}))
    return None
