"""Settings presets, shipped inside the package and found through importlib.resources.

- `paper`: the paper's settings, each value with its source (docs/method.md); also the code defaults.
- `tiny`: small random-init models on CPU, seconds per stage (tests, `datadream demo`).
- `paper/<dataset>`: the paper preset plus one of the paper's ten datasets (layout, domain word).

This module imports nothing heavy: the CLI lists the names while it builds its parser.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DIR = Path(str(resources.files(__name__)))


def names() -> list[str]:
    """Every preset name: the top-level ones, then `paper/<dataset>`."""
    top = sorted(p.stem for p in DIR.glob("*.yaml"))
    return [*top, *(f"{p.parent.name}/{p.stem}" for p in sorted(DIR.glob("*/*.yaml")))]


def files(name: str) -> list[Path]:
    """The YAML files of preset `name`, base first: `paper/dtd` is paper.yaml, then paper/dtd.yaml."""
    if name not in names():
        raise KeyError(name)
    parts = name.split("/")
    return [DIR / f"{'/'.join(parts[: i + 1])}.yaml" for i in range(len(parts))]
