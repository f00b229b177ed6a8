"""Run a script as on a bare GPU machine: only PyTorch's stack and what the benchmark ships beside it.

A GPU machine rented for a benchmark has a Python with torch, torchvision, transformers, accelerate,
safetensors, numpy, pillow, pyyaml, tqdm, scipy and matplotlib (and what those need), and nothing else.
The benchmark brings diffusers, open_clip_torch, peft, ftfy, wcwidth and pydantic as wheels and runs
the project from its source tree. mlflow, kfp, optuna, boto3 and kubernetes are not there, so any import of
them on the benchmark's path fails there, after the machine's minutes have started to count.

`command(script, *args)` builds a command line that runs `script` in this interpreter with every other
installed distribution hidden: a top-level module of a distribution outside that set is put in
sys.modules as None, so `import mlflow` raises ModuleNotFoundError and `importlib.util.find_spec("mlflow")`
answers None, as on the machine.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

# What the GPU machine's Python has (its own packages) and what the benchmark ships to it (--no-deps wheels).
MACHINE = ("torch", "torchvision", "transformers", "accelerate", "safetensors", "numpy", "pillow", "pyyaml",
           "tqdm", "scipy", "matplotlib")
SHIPPED = ("diffusers", "open_clip_torch", "peft", "ftfy", "wcwidth", "pydantic", "pydantic_core",
           "annotated_types", "typing_inspection")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def available() -> set[str]:
    """Normalised names of the distributions the machine has: MACHINE and SHIPPED with all they require (the
    benchmark ran there, so what the shipped wheels need was there), and the project itself, without its own
    requirements."""
    from packaging.requirements import Requirement

    dists = {_norm(d.metadata["Name"]): d for d in md.distributions()}
    seen: set[str] = set()
    todo = [_norm(n) for n in MACHINE + SHIPPED]
    while todo:
        name = todo.pop()
        if name in seen or name not in dists:
            continue
        seen.add(name)
        for line in dists[name].requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_norm(req.name))
    return seen | {"datadream"}


def hidden_modules() -> list[str]:
    """Top-level modules installed here that the GPU machine lacks."""
    keep = available()
    hidden = set()
    for module, owners in md.packages_distributions().items():
        if module in sys.stdlib_module_names or not module.isidentifier():
            continue
        if not any(_norm(o) in keep for o in owners):
            hidden.add(module)
    return sorted(hidden)


_BOOT = """
import runpy, sys
for name in {hidden!r}:
    sys.modules[name] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def command(script, *args) -> list[str]:
    """argv that runs `script args…` in this interpreter as on the GPU machine."""
    return [sys.executable, "-c", _BOOT.format(hidden=hidden_modules()), str(script), *map(str, args)]
