"""MLflow model registry: register the classifier and the SD adapters, gate and roll back `champion`.

Two registered models per registry name NAME:

    NAME-classifier   pyfunc model logged from code (datadream/serving/classifier_model.py): the classify
                      output folder, the base CLIP weights unless `tiny`, and the `datadream` package
                      itself (code_paths), so `models:/NAME-classifier@champion` loads and serves alone
    NAME-sd-lora      `mlflow.diffusers` flavor: every adapter of one adapt output (see register_adapters)

Every new version gets the alias `candidate`. Where things live (the registry UI shows a version's
tags in one cell, so they are few):

    model version tags        what lineage and the gate need (VERSION_TAGS: dataset, mode, data_hash,
                              git_sha, kfp_run_id, mlflow_run_id, adapter_version, test_top1, test_top5)
                              and the gate's verdict `gate.decision`
    model version description the gate's reason, e.g. "promoted: test_top1 0.7708 beats champion version 2 …"
    lineage/<model>.json      artifact of the registering run: everything else (manifest hash, shots, seed,
                              base models, fingerprints, all test metrics, the package version, …)
    registered model tag      `champion_history`: JSON list of the versions that held `champion`, oldest
                              first, the current one last; `rollback` pops it
    LoggedModel metrics       the test metrics again, linked to the model (MLflow 3 `model_id`)

The gate (`promote_if_better`) makes a version champion only if its metric reaches the floor and beats
the champion's by more than the margin; a tie keeps the champion. Whenever a classifier version becomes
champion (gate, `promote`, `rollback`), the NAME-sd-lora version named by its `adapter_version` tag
becomes champion too, so the two champions always belong together. Read-modify-write of the history tag
is not atomic: run one promotion per registered model at a time (one pipeline's register step).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from datadream.artifacts import ADAPTERS_MARKER, CLASSIFIER_MARKER
from datadream.errors import UserError

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
HISTORY_TAG = "champion_history"
HISTORY_MAX = 100
KIND_TAG = "datadream.kind"
Kind = Literal["classifier", "adapters"]
KINDS: tuple[str, ...] = ("classifier", "adapters")
# Lineage kept as version tags (the rest goes to lineage/<model>.json); the gate reads test_top1.
VERSION_TAGS = ("dataset", "mode", "data_hash", "git_sha", "kfp_run_id", "mlflow_run_id", "adapter_version",
                "test_top1", "test_top5")

# What serving needs besides mlflow (which MLflow adds itself), pinned as in pyproject.toml; a test
# checks that every entry appears there verbatim.
SERVING_REQUIREMENTS = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open_clip_torch==3.3.0",
    "peft==0.21.2",
    "transformers>=5.0,<5.23",
    "safetensors>=0.4",
    "pillow>=12.2",
    "numpy>=1.26",
    "tqdm>=4.66",
    "pyyaml>=6.0",
    "pydantic>=2.7,<3",
]

_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}")
_VERSION = re.compile(r"[1-9][0-9]*")
_PACKAGE_DIR = Path(__file__).resolve().parent
_MODEL_CODE = _PACKAGE_DIR / "serving" / "classifier_model.py"
_CLASSIFIER_FILES = ("lora.safetensors", "head.safetensors", CLASSIFIER_MARKER)
_OPEN_CLIP_PREFERRED = {"open_clip_model.safetensors": 0, "open_clip_pytorch_model.safetensors": 1,
                        "model.safetensors": 2}
_ADAPTER_INDEX = ADAPTERS_MARKER
_ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"


# --- names -----------------------------------------------------------------------------------------------


def validate_name(name: str) -> str:
    """`name` if it is a usable registry name, else UserError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"registry name {name!r}: use 1–64 letters, digits, '-', '_' or '.', "
                        "not starting with '-'")
    return name


def classifier_name(name: str) -> str:
    return f"{validate_name(name)}-classifier"


def adapters_name(name: str) -> str:
    return f"{validate_name(name)}-sd-lora"


def registered_name(name: str, kind: Kind = "classifier") -> str:
    if kind == "classifier":
        return classifier_name(name)
    if kind == "adapters":
        return adapters_name(name)
    raise UserError(f"registry kind {kind!r}: expected one of {', '.join(KINDS)}")


# --- helpers ---------------------------------------------------------------------------------------------


def _client(tracking_uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri) if tracking_uri else MlflowClient()


def _not_found(e: MlflowException) -> bool:
    return e.error_code == "RESOURCE_DOES_NOT_EXIST"


def _get_model(client: MlflowClient, model: str):
    try:
        return client.get_registered_model(model)
    except MlflowException as e:
        if _not_found(e):
            raise UserError(f"registered model {model!r} not found (tracking URI {client.tracking_uri})") from None
        raise


def _get_version(client: MlflowClient, model: str, version: str | int):
    version = str(version)
    _get_model(client, model)
    if not _VERSION.fullmatch(version):
        raise UserError(f"registered model {model!r} version {version!r}: expected a positive integer")
    try:
        return client.get_model_version(model, version)
    except MlflowException as e:
        if _not_found(e):
            raise UserError(f"registered model {model!r} has no version {version}") from None
        raise


def _champion(client: MlflowClient, model: str):
    """The champion's ModelVersion, or None. (A missing alias is INVALID_PARAMETER_VALUE on some stores
    and RESOURCE_DOES_NOT_EXIST on others, so look at the model's alias map instead.)"""
    version = (_get_model(client, model).aliases or {}).get(CHAMPION)
    return client.get_model_version(model, str(version)) if version is not None else None


def _history(client: MlflowClient, model: str) -> list[str]:
    raw = _get_model(client, model).tags.get(HISTORY_TAG)
    try:
        history = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        log.warning("registry: %s tag %s is not JSON (%r); starting a new history", model, HISTORY_TAG, raw)
        return []
    return [str(v) for v in history] if isinstance(history, list) else []


def _set_champion(client: MlflowClient, model: str, version: str, history: list[str]) -> None:
    client.set_registered_model_alias(model, CHAMPION, version)
    client.set_registered_model_tag(model, HISTORY_TAG, json.dumps(history[-HISTORY_MAX:]))


def _push_champion(client: MlflowClient, model: str, version: str, previous: str | None) -> None:
    """Make `version` champion and append it to the history (with the old champion if it was missing)."""
    history = _history(client, model)
    if previous is not None and (not history or history[-1] != previous):
        history.append(previous)  # champion set by hand outside this module: keep it for rollback
    history.append(version)
    _set_champion(client, model, version, history)


def _follow_adapters(client: MlflowClient, name: str, classifier_version) -> None:
    """Make the adapters a classifier version was trained from (its `adapter_version` tag) the champion
    of NAME-sd-lora. A classifier without the tag, or a deleted adapter version, leaves it alone."""
    adapter_version = classifier_version.tags.get("adapter_version")
    if not adapter_version:
        return
    model = adapters_name(name)
    try:
        client.get_model_version(model, adapter_version)
    except MlflowException as e:
        if not _not_found(e):
            raise
        log.warning("registry: %s version %s is gone; its champion is left as it was", model, adapter_version)
        return
    champion = _champion(client, model)
    before = str(champion.version) if champion is not None else None
    if before != str(adapter_version):
        _push_champion(client, model, str(adapter_version), before)
        log.info("registry: %s champion -> version %s (follows the classifier)", model, adapter_version)


def _tag_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _lineage_tags(lineage: dict) -> dict[str, str]:
    return {str(k): _tag_value(v) for k, v in (lineage or {}).items() if v is not None}


def _metric_values(metrics: dict) -> dict[str, int | float]:
    """Numeric top-level entries of a metrics.json as test_<key> (per-class dicts are left out)."""
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out[key if key.startswith("test_") else f"test_{key}"] = value
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def _run(run_name: str) -> Iterator[None]:
    """Inside the active run if there is one (the pipeline's), else a run of our own."""
    if mlflow.active_run() is not None:
        yield
        return
    with mlflow.start_run(run_name=run_name):
        yield


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name}; not a finished {what} output")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


def example_image_b64(size: int = 32) -> str:
    """A small grey PNG, base64-encoded: the input example that fixes the served signature."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --- classifier ------------------------------------------------------------------------------------------


def _base_weights(model: dict, base_weights: str | Path | None, stage: Path) -> Path | None:
    """The base CLIP weights to ship with the classifier, staged under `stage`, or None for `tiny`.

    Without `base_weights`, a `local-dir:` model or a clip_pretrained that is a local file is shipped
    as is; for an open_clip tag (e.g. 'openai') the loaded model's weights are exported as safetensors.
    """
    clip, pretrained = str(model.get("clip", "")), model.get("clip_pretrained")
    if clip == "tiny":
        if base_weights is not None:
            log.warning("register: base_weights=%s ignored: the tiny CLIP is rebuilt from its config", base_weights)
        return None
    local_dir = clip.startswith("local-dir:")
    if base_weights is None:
        if local_dir:
            base_weights = clip[len("local-dir:"):]
        elif pretrained and Path(pretrained).expanduser().is_file():
            base_weights = pretrained
        else:
            # An open_clip tag (e.g. 'openai'): the weights are whatever classify loaded, in open_clip's
            # own cache; ship them as safetensors so that serving needs neither a download nor a pickle.
            return _export_base_clip(clip, pretrained, stage)
    src = Path(base_weights).expanduser()
    if local_dir:
        if not (src / "open_clip_config.json").is_file():
            raise UserError(f"register: base_weights={str(src)!r}: no open_clip_config.json in that folder "
                            f"(the classifier's base CLIP is {clip})")
        # The file open_clip itself would pick from that folder (factory._find_checkpoint_in_dir).
        weights = sorted(src.glob("*.safetensors"), key=lambda p: (_OPEN_CLIP_PREFERRED.get(p.name, 99), p.name))
        if not weights:
            raise UserError(f"register: base_weights={str(src)!r}: no .safetensors weights in that folder")
        out = stage / "base_clip"
        out.mkdir()
        shutil.copy2(src / "open_clip_config.json", out / "open_clip_config.json")
        shutil.copy2(weights[0], out / "open_clip_model.safetensors")
        return out
    if not src.is_file() or src.suffix != ".safetensors":
        raise UserError(f"register: base_weights={str(src)!r}: expected an existing open_clip .safetensors file "
                        "(only safetensors are shipped)")
    return src


def _export_base_clip(clip: str, pretrained: str | None, stage: Path) -> Path:
    """The loaded base model as an open_clip folder (config + safetensors), loaded back by `local-dir:`.

    The config records what the tag implied (QuickGELU for OpenAI weights), which a bare weights
    file would lose.
    """
    import open_clip
    from safetensors.torch import save_file

    from datadream.config import ModelsConfig
    from datadream.models.clip import load_clip, quick_gelu_of

    model, _, preprocess = load_clip(ModelsConfig(clip=clip, clip_pretrained=pretrained))
    model_cfg = open_clip.get_model_config(clip)
    if quick_gelu_of(clip, pretrained):
        model_cfg["quick_gelu"] = True
    out = stage / "base_clip"
    out.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    preprocess_cfg = {"size": preprocess["image_size"], "mean": preprocess["mean"], "std": preprocess["std"],
                      "interpolation": preprocess["interpolation"]}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    log.info("register: shipping the base CLIP %s (%s) as an open_clip folder", clip, pretrained)
    return out


def _new_version(model_name: str, info, record: dict[str, str], kind: str) -> str:
    """Finish a just-logged version: the lineage record as lineage/<model>.json in the active run, the
    VERSION_TAGS part of it as version tags, the model's kind, and the alias `candidate`."""
    version = str(info.registered_model_version)
    mlflow.log_dict({"model": model_name, "version": version, **record}, f"lineage/{model_name}.json")
    client = _client()
    for key, value in _version_tags(record).items():
        client.set_model_version_tag(model_name, version, key, value)
    client.set_registered_model_tag(model_name, KIND_TAG, kind)
    client.set_registered_model_alias(model_name, CANDIDATE, version)
    log.info("registry: %s version %s registered (alias %s)", model_name, version, CANDIDATE)
    return version


def _version_tags(record: dict[str, str]) -> dict[str, str]:
    return {k: record[k] for k in VERSION_TAGS if k in record}


def _clean_package_copy(stage: Path) -> Path:
    """The datadream package as code_paths: sources only, no bytecode caches."""
    dst = stage / "code" / "datadream"
    shutil.copytree(_PACKAGE_DIR, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def register_classifier(
    name: str,
    classifier_dir: str | Path,
    metrics: dict,
    lineage: dict,
    base_weights: str | Path | None = None,
) -> str:
    """Log the classifier as a pyfunc model, register it as NAME-classifier, alias it `candidate`.

    `metrics` is the evaluate stage's metrics.json (numeric entries become `test_<key>` model metrics);
    `lineage` (None values skipped) and the metrics make the version's lineage record: all of it in
    lineage/<model>.json, its VERSION_TAGS as tags. `base_weights`: see `_base_weights`. Returns the
    new version.
    """
    from datadream import __version__

    model_name = classifier_name(name)
    folder = Path(classifier_dir)
    meta = _read_json(folder / CLASSIFIER_MARKER, "classify")
    for file in _CLASSIFIER_FILES:
        if not (folder / file).is_file():
            raise UserError(f"{folder}: no {file}; not a finished classify output")
    values = _metric_values(metrics)
    base = meta.get("model") or {}
    record = {
        "clip": str(base.get("clip")),
        "clip_pretrained": str(base.get("clip_pretrained")),
        "num_classes": str(len(meta.get("classes", []))),
        "classifier_fingerprint": str(meta.get("fingerprint")),
        "datadream_version": __version__,
        **_lineage_tags(lineage),
        **{k: repr(v) for k, v in values.items()},
    }
    with tempfile.TemporaryDirectory(prefix="datadream-register-") as tmp:
        stage = Path(tmp)
        # Only the finished files: never a stale checkpoint or marker that happens to sit beside them.
        (stage / "classifier").mkdir()
        for file in _CLASSIFIER_FILES:
            shutil.copy2(folder / file, stage / "classifier" / file)
        artifacts = {"classifier": str(stage / "classifier")}
        weights = _base_weights(base, base_weights, stage)
        if weights is not None:
            artifacts["base_weights"] = str(weights)
        import pandas as pd

        with _run(f"register-{model_name}"):
            info = mlflow.pyfunc.log_model(
                name="classifier",
                python_model=str(_MODEL_CODE),
                artifacts=artifacts,
                code_paths=[str(_clean_package_copy(stage))],
                input_example=pd.DataFrame({"image": [example_image_b64()]}),
                pip_requirements=SERVING_REQUIREMENTS,
                metadata={"classes": [c["slug"] for c in meta.get("classes", [])],
                          "datadream_version": __version__},
                registered_model_name=model_name,
                tags=_version_tags(record),
            )
            if values:
                mlflow.log_metrics({k: float(v) for k, v in values.items()}, model_id=info.model_id)
            return _new_version(model_name, info, record, "classifier")


# --- adapters --------------------------------------------------------------------------------------------


def _check_unit(unit: str, source) -> None:
    """Unit names become file and folder names: one plain path component only."""
    if not isinstance(unit, str) or not unit or unit != Path(unit).name or unit.startswith("."):
        raise UserError(f"{source}: adapter unit {unit!r} is not a plain folder name")


def _flatten_adapters(adapters_dir: Path, index: dict, out: Path) -> dict:
    """The adapt output as one flat folder the diffusers flavor accepts; returns the index written there.

    Flat layout (the flavor only looks at top-level .safetensors files):
        pytorch_lora_weights.safetensors   dataset-wise: the one adapter (the flavor's default weight)
        <slug>.safetensors                 class-wise: one adapter per class
        <unit>.adapter.json                each adapter's own adapter.json
        adapter.json                       the adapt index, plus `files`: unit -> {weights, meta}
    """
    units = sorted(set(index["classes"].values()))
    if not units:
        raise UserError(f"{adapters_dir / _ADAPTER_INDEX}: no classes")
    weight_name = index.get("weight_name", _ADAPTER_WEIGHTS)
    files = {}
    out.mkdir()
    for unit in units:
        _check_unit(unit, adapters_dir / _ADAPTER_INDEX)
        src = adapters_dir / unit
        if not (src / weight_name).is_file() or not (src / _ADAPTER_INDEX).is_file():
            raise UserError(f"{src}: no {weight_name} or {_ADAPTER_INDEX}; not a finished adapter")
        weights = _ADAPTER_WEIGHTS if index.get("mode") == "dataset" else f"{unit}.safetensors"
        files[unit] = {"weights": weights, "meta": f"{unit}.adapter.json"}
        shutil.copy2(src / weight_name, out / weights)
        shutil.copy2(src / _ADAPTER_INDEX, out / files[unit]["meta"])
    flat_index = {**index, "files": files}
    (out / _ADAPTER_INDEX).write_text(json.dumps(flat_index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return flat_index


def register_adapters(name: str, adapters_dir: str | Path, lineage: dict) -> str:
    """Log every adapter of one adapt output as ONE version of NAME-sd-lora (diffusers flavor).

    The flavor takes one file or one folder, and in a folder it sees only top-level .safetensors, so
    the per-class subfolders of a class-wise output are flattened (see `_flatten_adapters`).
    Dataset-wise: `mlflow.diffusers.load_model(uri).load_pipeline(base_model=…)` applies the adapter.
    Class-wise: `pipe.load_lora_weights(m.adapter_path, weight_name=f"{slug}.safetensors")`; the flavor's
    own default weight (and its pyfunc) is the alphabetically first class. `download_adapters` turns a
    version back into the adapt folder layout that `generate` reads. Returns the new version.
    """
    model_name = adapters_name(name)
    folder = Path(adapters_dir)
    index = _read_json(folder / _ADAPTER_INDEX, "adapt")
    for key in ("mode", "base_model", "classes"):
        if key not in index:
            raise UserError(f"{folder / _ADAPTER_INDEX}: missing field {key!r}")
    record = {
        "mode": str(index["mode"]),
        "sd": str(index["base_model"]),
        "sd_revision": str(index.get("base_revision")),
        "rank": str(index.get("rank")),
        "num_classes": str(len(index["classes"])),
        "num_adapters": str(len(set(index["classes"].values()))),
        "adapters_fingerprint": str(index.get("fingerprint")),
        **_lineage_tags(lineage),
    }
    with tempfile.TemporaryDirectory(prefix="datadream-register-") as tmp:
        flat = Path(tmp) / "adapters"
        flat_index = _flatten_adapters(folder, index, flat)
        with _run(f"register-{model_name}"):
            info = mlflow.diffusers.log_model(
                adapter_path=str(flat),
                base_model=str(index["base_model"]),
                name="sd_lora",
                metadata={"mode": index["mode"], "classes": index["classes"], "files": flat_index["files"]},
                registered_model_name=model_name,
                tags=_version_tags(record),
            )
            return _new_version(model_name, info, record, "adapters")


def download_adapters(name: str, out_dir: str | Path, ref: str = CHAMPION) -> Path:
    """Rebuild the adapt output folder (`<unit>/pytorch_lora_weights.safetensors`, `<unit>/adapter.json`,
    index last) of NAME-sd-lora at `ref` (an alias or a version) in `out_dir`, ready for `generate`."""
    from datadream.io import staged_dir

    model_name, ref = adapters_name(name), str(ref)
    client = _client()
    if _VERSION.fullmatch(ref):
        version = str(_get_version(client, model_name, ref).version)
    else:
        version = (_get_model(client, model_name).aliases or {}).get(ref)
        if version is None:
            raise UserError(f"registered model {model_name!r} has no alias {ref!r}")
    with tempfile.TemporaryDirectory(prefix="datadream-download-") as tmp:
        model = mlflow.diffusers.load_model(f"models:/{model_name}/{version}", dst_path=tmp)
        flat = Path(model.adapter_path)
        index = json.loads((flat / _ADAPTER_INDEX).read_text(encoding="utf-8"))
        files = index.pop("files")
        weight_name = index.get("weight_name", _ADAPTER_WEIGHTS)
        for unit in files:
            _check_unit(unit, f"models:/{model_name}/{version}")
        with staged_dir(out_dir) as stage:
            for unit, f in files.items():
                (stage / unit).mkdir()
                shutil.copy2(flat / f["weights"], stage / unit / weight_name)
                shutil.copy2(flat / f["meta"], stage / unit / _ADAPTER_INDEX)
            (stage / _ADAPTER_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                encoding="utf-8")
    return Path(out_dir)


# --- promotion -------------------------------------------------------------------------------------------


def _metric_of(mv, metric: str) -> float | None:
    raw = mv.tags.get(metric)
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _record_decision(client: MlflowClient, model: str, version: str, decision: str, reason: str) -> None:
    """The gate's verdict on a version: the tag `gate.decision`, and the reason as its description (the
    column the registry UI shows)."""
    client.set_model_version_tag(model, version, "gate.decision", decision)
    client.update_model_version(model, version, description=f"{decision.replace('_', ' ')}: {reason}")


def promote_if_better(
    name: str,
    version: str | int,
    metric: str = "test_top1",
    margin: float = 0.0,
    floor: float = 0.0,
    *,
    tracking_uri: str | None = None,
) -> dict:
    """The promotion gate for NAME-classifier: `champion` moves to `version` only if its `metric` tag is
    ≥ floor and (there is no champion, or it beats the champion's by more than `margin`).

    The verdict is recorded on the version (the `gate.decision` tag, the reason as its description).
    Returns dict(decision 'promoted' or 'not_promoted', reason, champion_before, champion_after),
    versions as strings or None.
    """
    model = classifier_name(name)
    client = _client(tracking_uri)
    mv = _get_version(client, model, version)
    version = str(mv.version)
    value = _metric_of(mv, metric)
    if value is None:
        raise UserError(f"registered model {model!r} version {version} has no numeric tag {metric!r} to gate on")
    champion = _champion(client, model)
    before = str(champion.version) if champion is not None else None
    promoted = False
    if before == version:
        reason = f"version {version} is already the champion"
    elif value < floor:
        reason = f"{metric} {value:.4f} is below the floor {floor:.4f}"
    elif champion is None:
        promoted, reason = True, f"no champion yet; {metric} {value:.4f} reaches the floor {floor:.4f}"
    else:
        best = _metric_of(champion, metric)
        if best is None:
            reason = (f"champion version {before} has no {metric} tag to compare with; "
                      "promote by hand if intended")
        elif value == best:
            reason = f"{metric} {value:.4f} equals champion version {before}'s; a tie keeps the champion"
        elif value > best + margin:
            promoted, reason = True, (f"{metric} {value:.4f} beats champion version {before} ({best:.4f}) "
                                      f"by more than the margin {margin:g}")
        else:
            reason = (f"{metric} {value:.4f} does not beat champion version {before} ({best:.4f}) "
                      f"by more than the margin {margin:g}")
    if promoted:
        _push_champion(client, model, version, before)
        _follow_adapters(client, name, mv)
    decision = "promoted" if promoted else "not_promoted"
    _record_decision(client, model, version, decision,
                     f"{reason} (gate on {metric}: margin {margin:g}, floor {floor:g}; {_now()})")
    log.info("registry: %s version %s %s: %s", model, version, decision.replace("_", " "), reason)
    return {"decision": decision, "reason": reason, "champion_before": before,
            "champion_after": version if promoted else before}


def promote(name: str, version: str | int, *, kind: Kind = "classifier", tracking_uri: str | None = None) -> dict:
    """Make `version` the champion by hand (no gate); recorded like a gate decision."""
    model = registered_name(name, kind)
    client = _client(tracking_uri)
    version = str(_get_version(client, model, version).version)
    champion = _champion(client, model)
    before = str(champion.version) if champion is not None else None
    if before == version:
        return {"decision": "unchanged", "reason": f"version {version} is already the champion",
                "champion_before": before, "champion_after": before}
    _push_champion(client, model, version, before)
    if kind == "classifier":
        _follow_adapters(client, name, client.get_model_version(model, version))
    reason = "promoted by hand"
    _record_decision(client, model, version, "promoted",
                     f"{reason} (champion before: {f'version {before}' if before else 'none'}; {_now()})")
    return {"decision": "promoted", "reason": reason, "champion_before": before, "champion_after": version}


def rollback(name: str, *, kind: Kind = "classifier", tracking_uri: str | None = None) -> dict:
    """Move `champion` back to the previous champion in the history (deleted versions are skipped)."""
    model = registered_name(name, kind)
    client = _client(tracking_uri)
    history = _history(client, model)
    champion = _champion(client, model)
    current = str(champion.version) if champion is not None else None
    while history and history[-1] == current:
        history.pop()
    while history:
        try:
            client.get_model_version(model, history[-1])
            break
        except MlflowException as e:
            if not _not_found(e):
                raise
            history.pop()
    if not history:
        raise UserError(f"registered model {model!r} has no previous champion to roll back to")
    target = history[-1]
    _set_champion(client, model, target, history)
    if kind == "classifier":
        _follow_adapters(client, name, client.get_model_version(model, target))
    if current is not None:
        client.set_model_version_tag(model, current, "gate.rolled_back", f"replaced by version {target} at {_now()}")
    log.info("registry: %s champion rolled back %s -> %s", model, current, target)
    return {"decision": "rolled_back", "reason": f"champion back to version {target}",
            "champion_before": current, "champion_after": target}


def list_versions(name: str, *, kind: Kind = "classifier", tracking_uri: str | None = None) -> list[dict]:
    """Every version, oldest first: dict(version, aliases, metrics (test_* tags), created (ISO UTC),
    gate (gate.decision or None), description (the gate's reason), run_id, tags)."""
    model = registered_name(name, kind)
    client = _client(tracking_uri)
    aliases: dict[str, list[str]] = {}
    for alias, version in (_get_model(client, model).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name = '{model}'"):
        tags = dict(mv.tags)
        metrics = {k: v for k in sorted(tags) if k.startswith("test_") and (v := _metric_of(mv, k)) is not None}
        rows.append({
            "version": str(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            "metrics": metrics,
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
            "gate": tags.get("gate.decision"),
            "description": mv.description or "",
            "run_id": mv.run_id,
            "tags": tags,
        })
    return sorted(rows, key=lambda r: int(r["version"]))
