"""The docs stand alone: nothing the project ships points at notes that live outside the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Files beside the repository that a user of a clone, a wheel or an image does not have.
OUTSIDE = re.compile(r"\.\./shared|/work/shared|\b(?:REFERENCE|DESIGN)\.md|reliability-security\.md|"
                     r"kfp-mlflow-optuna\.md")
SHIPPED = ["README.md", "Makefile", "pyproject.toml", ".dockerignore", "docs", "datadream", "components",
           "pipelines", "benchmarks", "docker", "infra", "tests"]
TEXT = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".tf", ".hcl", ".json", ".cfg", ".lock", ""}


def shipped_files():
    for name in SHIPPED:
        path = ROOT / name
        for f in [path] if path.is_file() else sorted(path.rglob("*")):
            if f.is_file() and f.suffix in TEXT and "__pycache__" not in f.parts and f != Path(__file__).resolve():
                yield f


def test_nothing_shipped_points_outside_the_repository():
    found = [f"{f.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
             for f in shipped_files()
             for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if OUTSIDE.search(line)]
    assert not found, "\n".join(found)


def test_the_pattern_catches_what_it_should():
    for line in ("see ../shared/DESIGN.md", "(REFERENCE.md, Stage 1)", "notes/kfp-mlflow-optuna.md §0"):
        assert OUTSIDE.search(line), line
    assert not OUTSIDE.search("docs/method.md, Stage 1")


def test_every_doc_that_shipped_files_cite_exists():
    cited = {m for f in shipped_files() for m in re.findall(r"\bdocs/[\w-]+\.md", f.read_text(errors="replace"))}
    assert "docs/method.md" in cited and "docs/architecture.md" in cited
    assert [c for c in sorted(cited) if not (ROOT / c).is_file()] == []
