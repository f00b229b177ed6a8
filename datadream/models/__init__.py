"""Model loading: Stable Diffusion (`sd`) and CLIP (`clip`) from a preset, a Hub id or a folder."""

from __future__ import annotations

import os
from pathlib import Path

from datadream.config import ModelsConfig


def cache_root(models: ModelsConfig) -> Path:
    """Where built (tiny, random-init) and downloaded models are kept: models.cache_dir, then
    $DATADREAM_CACHE, then ~/.cache/datadream."""
    return Path(models.cache_dir or os.environ.get("DATADREAM_CACHE") or Path.home() / ".cache" / "datadream")
