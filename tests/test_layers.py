"""The import plan (docs/architecture.md, "Steps: one glue layer"): every import points down a layer, the
marker files are named only in datadream/artifacts.py, and the library imports no entry point."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom-up; a module may import its own layer or one below it, never one above.
LAYERS = [
    ["datadream", "datadream.errors", "datadream.config", "datadream.io", "datadream.presets"],
    ["datadream.storage", "datadream.runtime", "datadream.checkpoint"],
    # artifacts: the contracts the stages write and the steps read; only constants at import time
    ["datadream.data", "datadream.models", "datadream.artifacts"],
    ["datadream.stages", "datadream.quality"],  # quality: the synthetic set's assessment, inside generate
    ["datadream.tracking", "datadream.report", "datadream.plots", "datadream.registry"],
    ["datadream.steps"],
    ["datadream.tuning"],
    ["datadream.cli", "datadream.tune_cli", "datadream.registry_cli", "datadream.demo", "datadream.serving",
     "components", "pipelines"],
]
MARKERS = ("fewshot.json", "adapter.json", "generate.json", "classifier.json", "metrics.json")


def layer_of(module: str) -> int | None:
    best = None
    for rank, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[1]):
                best = (rank, len(name))
    return best[0] if best else None


def modules() -> dict[str, Path]:
    found = {}
    for package in ("datadream", "components", "pipelines"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, those inside functions included."""
    out = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # `from x import y`: y may be a module
    return out


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) is None] == []


def test_imports_point_down_only():
    known = modules()
    upward = []
    for module, path in known.items():
        mine = layer_of(module)
        for line, name in imports(path, module):
            target = name if name in known else name.rpartition(".")[0]
            if target not in known:
                continue  # a third-party module, or a name imported from a module
            if layer_of(target) > mine:
                upward.append(f"{path.relative_to(ROOT)}:{line} {module} -> {target}")
    assert upward == []


def test_the_pipelines_do_not_import_each_other():
    pipeline = imports(ROOT / "pipelines" / "pipeline.py", "pipelines.pipeline")
    tune = imports(ROOT / "pipelines" / "tune_pipeline.py", "pipelines.tune_pipeline")
    assert not (any(n.startswith("pipelines.tune_pipeline") for _, n in pipeline)
                and any(n.startswith("pipelines.pipeline") for _, n in tune))


def test_the_stages_are_apart():
    """A stage is one step's method: it imports no other stage; what two share lives below them
    (datadream.data.loading, datadream.artifacts, datadream.runtime)."""
    crossing = [f"{path.relative_to(ROOT)}:{line} {module} -> {name}"
                for module, path in modules().items()
                if module.startswith("datadream.stages.") or module == "datadream.quality"
                for line, name in imports(path, module)
                if name.startswith("datadream.stages.") and name != module and not name.startswith(module + ".")]
    assert crossing == []


def test_marker_files_are_named_only_in_artifacts():
    pattern = re.compile("|".join(re.escape(f'"{m}"') + "|" + re.escape(f"'{m}'") for m in MARKERS))
    named = [f"{p.relative_to(ROOT)}:{i}" for m, p in modules().items() if m != "datadream.artifacts"
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert named == []


@pytest.mark.parametrize("module", ["datadream.stages.classify", "datadream.stages.adapt", "datadream.steps"])
def test_the_library_imports_no_kfp_and_no_mlflow(module):
    code = f"import sys, {module}; print(sorted(m for m in ('kfp', 'mlflow', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
