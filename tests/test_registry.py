"""MLflow registry on a SQLite store: register, load and serve the classifier, the promotion gate,
rollback, the `registry` CLI, and the SD adapters in the diffusers flavor."""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from helpers import colour_task
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from datadream import registry, registry_cli
from datadream.data.manifest import read_manifest
from datadream.errors import UserError
from datadream.stages import adapt, classify, evaluate

CLASSIFY = ("classify.epochs=3", "classify.batch_size=8", "classify.warmup_steps=1")
LINEAGE = {"dataset": "file:///data/colours", "manifest_sha256": "ab" * 32, "shots": 4, "seed": 1,
           "mode": "class", "sd": "tiny", "adapter_version": None, "git_sha": "0123abc", "kfp_run_id": None}


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A SQLite tracking + registry store with its own experiment and artifact folder, for this module."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    previous_uri, previous_experiment = tracking_utils._tracking_uri, fluent._active_experiment_id
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mlflow.set_tracking_uri(uri)
        fluent._active_experiment_id = None
        experiment = MlflowClient().create_experiment("registry-tests", artifact_location=(root / "artifacts").as_uri())
        mp.setenv("MLFLOW_EXPERIMENT_ID", experiment)  # runs of our own land here, never in ./mlruns
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(previous_uri)
            fluent._active_experiment_id = previous_experiment


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny):
    """A tiny CLIP LoRA classifier on three colours, its test images and its metrics."""
    root = tmp_path_factory.mktemp("registry-classifier")
    fewshot, synthetic = colour_task(root, shots=4, test=2, synthetic_per_class=4)
    test = read_manifest(fewshot / "test.jsonl")
    config = tiny(*CLASSIFY)
    out = classify.run(config, fewshot, synthetic, root / "classifier")
    metrics = evaluate.run(config, out, fewshot / "test.jsonl", root / "metrics")
    return out, [Path(r.path) for r in test], metrics


@pytest.fixture(scope="module")
def registered(tracking, classifier):
    folder, _, metrics = classifier
    with mlflow.start_run() as run:  # inside the caller's run, as in the pipeline
        version = registry.register_classifier("colours", folder, metrics, LINEAGE)
    return version, run.info.run_id


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def expected_labels(folder: Path, images: list[Path]) -> tuple[list[str], torch.Tensor]:
    clf = evaluate.load_classifier(folder, device="cpu")
    probs = clf.predict_proba([Image.open(p) for p in images])
    return [clf.classes[i].slug for i in probs.argmax(-1).tolist()], probs


# --- registering and loading the classifier ---------------------------------------------------------------


def test_register_tags_lineage_metrics_and_candidate(registered, classifier):
    version, run_id = registered
    _, _, metrics = classifier
    client = MlflowClient()
    mv = client.get_model_version_by_alias("colours-classifier", "candidate")
    assert str(mv.version) == version and mv.run_id == run_id
    tags = mv.tags  # a handful, for lineage and the gate; None values are left out
    assert tags == {"dataset": "file:///data/colours", "mode": "class", "git_sha": "0123abc",
                    "test_top1": repr(metrics["top1"]), "test_top5": repr(metrics["top5"])}
    # The rest of the lineage is a JSON artifact of the registering run.
    record = mlflow.artifacts.load_dict(f"runs:/{run_id}/lineage/colours-classifier.json")
    assert record["version"] == version and record["manifest_sha256"] == "ab" * 32 and record["shots"] == "4"
    assert record["clip"] == "tiny" and record["num_classes"] == "3" and float(record["test_n"]) == metrics["n"]
    assert "kfp_run_id" not in record and not any(k.startswith("test_per_class") for k in record)

    # MLflow 3: the metrics are linked to the logged model too; the model ships the package, no caches.
    logged = mlflow.get_logged_model(mv.source.removeprefix("models:/"))
    assert {m.key: m.value for m in logged.metrics}["test_top1"] == metrics["top1"]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/colours-classifier/{version}"))
    assert (local / "code" / "datadream" / "serving" / "classifier_model.py").is_file()
    assert not list(local.rglob("__pycache__"))
    assert sorted(p.name for p in (local / "artifacts" / "classifier").iterdir()) == sorted(
        ["classifier.json", "head.safetensors", "lora.safetensors"])
    requirements = (local / "requirements.txt").read_text()
    assert "open_clip_torch==3.3.0" in requirements and "peft==0.21.2" in requirements


def test_serving_requirements_match_pyproject():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pins = {d.replace(" ", "") for d in pyproject["project"]["dependencies"]}
    assert [r for r in registry.SERVING_REQUIREMENTS if r.replace(" ", "") not in pins] == []


def test_candidate_predicts_like_the_classifier_from_base64_and_paths(registered, classifier):
    folder, images, _ = classifier
    labels, probs = expected_labels(folder, images)
    model = mlflow.pyfunc.load_model("models:/colours-classifier@candidate")
    for column in ([b64(p) for p in images], [str(p) for p in images]):
        out = model.predict(pd.DataFrame({"image": column}))
        assert list(out.columns) == ["label", "name", "probability", "probabilities", "model_version"]
        assert out["model_version"].isna().all()  # not served by a Deployment: no version to report
        assert out["label"].tolist() == labels
        assert set(out["name"]) <= {"colour 0", "colour 1", "colour 2"}
        got = torch.tensor(out["probabilities"].tolist())
        assert got.shape == (len(images), 3)
        assert torch.allclose(got, probs, atol=1e-5)
        assert torch.allclose(torch.tensor(out["probability"].tolist()), probs.max(-1).values, atol=1e-5)
    # Both kinds in one request, decided per value.
    mixed = model.predict(pd.DataFrame({"image": [b64(images[0]), str(images[1])]}))
    assert mixed["label"].tolist() == labels[:2]


WITHOUT_INSTALLED_PACKAGE = """
import sys
# Hide the editable install of datadream: only the copy inside the model (code_paths) may be found.
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "") + repr(f)]
import importlib.util
assert importlib.util.find_spec("datadream") is None, "datadream is still importable"
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
print(model.predict(pd.DataFrame({"image": sys.argv[2:]}))["label"].tolist())
print(sys.modules["datadream"].__file__)
"""


@pytest.mark.slow
def test_model_loads_with_its_own_copy_of_datadream(registered, classifier, tmp_path):
    folder, images, _ = classifier
    labels, _ = expected_labels(folder, images)
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_INSTALLED_PACKAGE, "models:/colours-classifier@candidate",
         *(b64(p) for p in images)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted, module_file = proc.stdout.strip().splitlines()[-2:]
    assert predicted == repr(labels)
    assert "/code/datadream/" in module_file and not module_file.startswith(str(Path(registry.__file__).parent))


def test_predict_refuses_bad_images_naming_the_row(registered, classifier, tmp_path):
    _, images, _ = classifier
    model = mlflow.pyfunc.load_model("models:/colours-classifier@candidate")
    gif = tmp_path / "x.gif"
    Image.new("RGB", (8, 8)).save(gif)
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")  # 10^8 pixels in a few kB
    cases = {
        base64.b64encode(bomb.getvalue()).decode(): "row 1: image rejected.*bomb",
        base64.b64encode(b"not an image at all").decode(): "row 1: image rejected",
        base64.b64encode(gif.read_bytes()).decode(): "row 1: image rejected.*format",
        str(tmp_path / "missing.png"): "row 1: .* neither an existing file nor base64",
    }
    for value, message in cases.items():
        with pytest.raises(MlflowException, match=message):
            model.predict(pd.DataFrame({"image": [b64(images[0]), value]}))


def test_non_tiny_base_clip_ships_its_weights(tracking, classifier, tmp_path):
    """A classifier on a `local-dir:` CLIP carries that folder; serving works after the original is gone."""
    from datadream.config import ModelsConfig
    from datadream.models.clip import build_tiny_clip, tiny_clip_dir

    folder, images, metrics = classifier
    mirror = tmp_path / "mirror"
    shutil.copytree(build_tiny_clip(tiny_clip_dir(ModelsConfig(clip="tiny"))), mirror)
    moved = tmp_path / "classifier"
    shutil.copytree(folder, moved)
    meta = json.loads((moved / "classifier.json").read_text())
    meta["model"] = {"clip": f"local-dir:{mirror}", "clip_pretrained": None}
    (moved / "classifier.json").write_text(json.dumps(meta))

    version = registry.register_classifier("mirrored", moved, metrics, {})
    shutil.rmtree(mirror)
    model = mlflow.pyfunc.load_model(f"models:/mirrored-classifier/{version}")
    labels, _ = expected_labels(folder, images)
    assert model.predict(pd.DataFrame({"image": [b64(p) for p in images]}))["label"].tolist() == labels


def test_base_weights_must_be_a_safetensors_file(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    named = {"clip": "ViT-B-16", "clip_pretrained": "openai"}
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="safetensors"):
        registry._base_weights(named, tmp_path / "w.bin", stage)
    (tmp_path / "w.safetensors").write_bytes(b"x")
    assert registry._base_weights(named, tmp_path / "w.safetensors", stage) == tmp_path / "w.safetensors"
    assert registry._base_weights({"clip": "tiny", "clip_pretrained": None}, None, stage) is None
    with pytest.raises(UserError, match=r"open_clip_config\.json"):
        registry._base_weights({"clip": f"local-dir:{tmp_path}", "clip_pretrained": None}, None, stage)


def test_an_open_clip_model_without_a_weights_file_is_exported_as_safetensors(tmp_path, monkeypatch):
    # An open_clip name + tag (e.g. ViT-B-16 / openai) has no file of ours to ship: the model classify
    # loaded is exported. A registered small config at (seeded) random init stands in for the download.
    import open_clip
    import torch
    from safetensors.torch import load_file

    from datadream.models.clip import TINY_CLIP_CONFIG, load_clip

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "dd-test-small", dict(TINY_CLIP_CONFIG))
    stage = tmp_path / "stage"
    stage.mkdir()
    out = registry._base_weights({"clip": "dd-test-small", "clip_pretrained": None}, None, stage)
    assert (out / "open_clip_config.json").is_file()
    from datadream.config import ModelsConfig

    model, _, _ = load_clip(ModelsConfig(clip="dd-test-small", clip_pretrained=None))
    exported = load_file(out / "open_clip_model.safetensors")
    assert exported.keys() == model.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    # ... and the folder loads back as the same model, as the served classifier loads it.
    again, _, _ = load_clip(ModelsConfig(clip=f"local-dir:{out}", clip_pretrained=None))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))


def test_unfinished_classifier_folder_is_a_user_error(tracking, tmp_path):
    with pytest.raises(UserError, match="not a finished classify output"):
        registry.register_classifier("colours", tmp_path, {}, {})


# --- the gate, promotion and rollback ---------------------------------------------------------------------


def add_version(registered, name: str, top1: float | None) -> str:
    """Another version of NAME-classifier (same model files) with the given test_top1: the gate reads tags."""
    client = MlflowClient()
    source = client.get_model_version("colours-classifier", registered[0]).source
    model = registry.classifier_name(name)
    with contextlib.suppress(MlflowException):  # already there from an earlier call
        client.create_registered_model(model)
    tags = {"test_top1": repr(top1)} if top1 is not None else {}
    return str(client.create_model_version(model, source, tags=tags).version)


def champion(name: str) -> str:
    return str(MlflowClient().get_model_version_by_alias(registry.classifier_name(name), "champion").version)


def gate_tags(name: str, version: str) -> dict:
    """The gate's record on a version: its gate.* tags, and its description as "description"."""
    mv = MlflowClient().get_model_version(registry.classifier_name(name), version)
    return {**{k: v for k, v in mv.tags.items() if k.startswith("gate.")}, "description": mv.description}


def test_gate_promotes_only_a_clear_improvement(registered):
    v1, v2, v3, v4 = (add_version(registered, "gate", x) for x in (0.70, 0.65, 0.70, 0.80))

    first = registry.promote_if_better("gate", v1)
    assert first["decision"] == "promoted" and "no champion yet" in first["reason"]
    assert (first["champion_before"], first["champion_after"]) == (None, v1) and champion("gate") == v1

    worse = registry.promote_if_better("gate", v2)
    assert worse["decision"] == "not_promoted" and "does not beat" in worse["reason"]
    assert champion("gate") == v1

    equal = registry.promote_if_better("gate", v3)
    assert equal["decision"] == "not_promoted" and "equals" in equal["reason"] and "tie" in equal["reason"]

    within_margin = registry.promote_if_better("gate", v4, margin=0.2)
    assert within_margin["decision"] == "not_promoted" and "margin 0.2" in within_margin["reason"]
    better = registry.promote_if_better("gate", v4, margin=0.05)
    assert better["decision"] == "promoted" and (better["champion_before"], better["champion_after"]) == (v1, v4)
    assert champion("gate") == v4

    assert gate_tags("gate", v2)["gate.decision"] == "not_promoted"
    assert gate_tags("gate", v2)["description"].startswith(f"not promoted: {worse['reason']} (gate on test_top1")
    tags = gate_tags("gate", v4)  # the reason is the version's description (the registry UI's column)
    assert tags["gate.decision"] == "promoted" and tags["description"].startswith(
        f"promoted: test_top1 0.8000 beats champion version {v1} (0.7000) by more than the margin 0.05 "
        "(gate on test_top1: margin 0.05, floor 0; ")
    assert "no champion yet" in gate_tags("gate", v1)["description"]
    history = json.loads(MlflowClient().get_registered_model("gate-classifier").tags["champion_history"])
    assert history == [v1, v4]


def test_adapters_champion_follows_the_classifier_champion(registered):
    client = MlflowClient()
    source = client.get_model_version("colours-classifier", registered[0]).source
    client.create_registered_model("pair-sd-lora")
    a1, a2 = (str(client.create_model_version("pair-sd-lora", source).version) for _ in range(2))
    c1, c2 = (add_version(registered, "pair", top1) for top1 in (0.5, 0.7))
    client.set_model_version_tag("pair-classifier", c1, "adapter_version", a1)
    client.set_model_version_tag("pair-classifier", c2, "adapter_version", a2)

    def adapters_champion() -> str:
        return str(client.get_model_version_by_alias("pair-sd-lora", "champion").version)

    assert registry.promote_if_better("pair", c1)["decision"] == "promoted" and adapters_champion() == a1
    assert registry.promote_if_better("pair", c2)["decision"] == "promoted" and adapters_champion() == a2
    registry.rollback("pair")
    assert champion("pair") == c1 and adapters_champion() == a1
    registry.promote("pair", c2)
    assert adapters_champion() == a2
    untagged = add_version(registered, "pair", 0.9)  # no adapter_version: the adapters' champion stays
    registry.promote_if_better("pair", untagged)
    assert champion("pair") == untagged and adapters_champion() == a2


def test_gate_floor(registered):
    low = add_version(registered, "floor", 0.3)
    result = registry.promote_if_better("floor", low, floor=0.5)
    assert result["decision"] == "not_promoted" and "below the floor" in result["reason"]
    assert result["champion_after"] is None
    assert gate_tags("floor", low)["gate.decision"] == "not_promoted"
    with pytest.raises(MlflowException):
        champion("floor")
    untagged = add_version(registered, "floor", None)
    with pytest.raises(UserError, match="no numeric tag 'test_top1'"):
        registry.promote_if_better("floor", untagged)


def test_rollback_returns_to_the_previous_champion(registered):
    v1, v2, v3 = (add_version(registered, "roll", x) for x in (0.5, 0.6, 0.7))
    with pytest.raises(UserError, match="has no previous champion"):
        registry.rollback("roll")
    registry.promote_if_better("roll", v1)
    with pytest.raises(UserError, match="'roll-classifier' has no previous champion"):
        registry.rollback("roll")
    registry.promote_if_better("roll", v2)
    registry.promote("roll", v3)
    assert champion("roll") == v3
    result = registry.rollback("roll")
    assert (result["champion_before"], result["champion_after"]) == (v3, v2) and champion("roll") == v2
    assert "replaced by version" in MlflowClient().get_model_version("roll-classifier", v3).tags["gate.rolled_back"]
    registry.rollback("roll")
    assert champion("roll") == v1
    with pytest.raises(UserError, match="no previous champion"):
        registry.rollback("roll")


def test_promote_and_list_errors(registered):
    add_version(registered, "errs", 0.5)
    with pytest.raises(UserError, match="'errs-classifier' has no version 7"):
        registry.promote("errs", 7)
    with pytest.raises(UserError, match="version 'x'"):
        registry.promote("errs", "x")
    with pytest.raises(UserError, match="registered model 'nobody-classifier' not found"):
        registry.list_versions("nobody")
    with pytest.raises(UserError, match="registered model 'nobody-classifier' not found"):
        registry.promote("nobody", 1)
    for bad in ("x y", "-x", "", "a" * 65, "a/b"):
        with pytest.raises(UserError, match=r"^registry name"):
            registry.classifier_name(bad)
    assert registry.classifier_name("a.b_c-1") == "a.b_c-1-classifier"
    assert registry.adapters_name("flowers") == "flowers-sd-lora"


def test_list_versions(registered):
    version, run_id = registered
    rows = registry.list_versions("colours")
    row = next(r for r in rows if r["version"] == version)
    assert "candidate" in row["aliases"] and row["run_id"] == run_id
    assert set(row["metrics"]) >= {"test_top1", "test_top5"} and row["created"].endswith("+00:00")


# --- the `registry` CLI -----------------------------------------------------------------------------------


def cli(tracking_uri: str, *argv: str) -> None:
    parser = argparse.ArgumentParser(prog="datadream")
    registry_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["registry", *argv, "--tracking-uri", tracking_uri])
    assert args.command == "registry"
    registry_cli.run(args)


def printed(capsys) -> list[str]:
    """What the command printed, line by line (a progress bar elsewhere may leave '\r' + spaces)."""
    return [line.strip() for line in capsys.readouterr().out.replace("\r", "\n").splitlines() if line.strip()]


def test_cli_list_promote_rollback(registered, tracking, capsys):
    v1, v2 = add_version(registered, "cli", 0.5), add_version(registered, "cli", 0.75)
    capsys.readouterr()
    cli(tracking, "promote", "cli", v1)
    assert printed(capsys) == [f"cli-classifier: champion none -> {v1}"]
    cli(tracking, "promote", "cli", v2)
    assert printed(capsys) == [f"cli-classifier: champion {v1} -> {v2}"]
    cli(tracking, "promote", "cli", v2)
    assert printed(capsys) == [f"cli-classifier: version {v2} is already the champion"]
    cli(tracking, "list", "cli")
    lines = printed(capsys)
    assert len(lines) == 3
    assert lines[0].split() == ["VERSION", "ALIASES", "TEST_TOP1", "GATE", "CREATED", "REASON"]
    assert lines[1].split()[:4] == [v1, "-", "0.5000", "promoted"]
    assert lines[2].split()[:4] == [v2, "champion", "0.7500", "promoted"]
    reason = registry.list_versions("cli", tracking_uri=tracking)[1]["description"].partition(": ")[2]
    assert reason and lines[2].endswith(reason.split(" (gate on")[0])  # the gate's why, without its settings
    cli(tracking, "rollback", "cli")
    assert printed(capsys) == [f"cli-classifier: champion {v2} -> {v1} (rolled back)"]
    with pytest.raises(UserError, match="no previous champion"):
        cli(tracking, "rollback", "cli")
    with pytest.raises(UserError, match="has no version 99"):
        cli(tracking, "promote", "cli", "99")


def test_cli_needs_a_tracking_uri(tracking, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser(prog="datadream")
    registry_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(UserError, match="no tracking URI"):
        registry_cli.run(parser.parse_args(["registry", "list", "colours"]))
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_help_names_the_actions(capsys):
    parser = argparse.ArgumentParser(prog="datadream")
    registry_cli.add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["registry", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(action in out for action in ("list", "promote", "rollback"))
    with pytest.raises(SystemExit):
        parser.parse_args(["registry", "promote", "--help"])
    assert "--tracking-uri" in capsys.readouterr().out


# --- SD adapters in the diffusers flavor ------------------------------------------------------------------


@pytest.fixture(scope="module")
def class_adapters(tmp_path_factory, fewshot_set, tiny):
    config = tiny("adapt.epochs=1", "adapt.max_steps=1")
    return adapt.run(config, fewshot_set, tmp_path_factory.mktemp("registry-adapters") / "class", shard="0/3")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # several adapters on one pipeline: the point
def test_class_wise_adapters_register_as_one_version_and_load(tracking, class_adapters, tiny, tmp_path):
    from datadream.models.sd import load_sd_pipeline

    index = json.loads((class_adapters / "adapter.json").read_text())
    slugs = sorted(index["classes"])
    assert index["mode"] == "class" and len(slugs) == 2

    version = registry.register_adapters("colours", class_adapters, {"git_sha": "0123abc"})
    mv = MlflowClient().get_model_version_by_alias("colours-sd-lora", "candidate")
    assert str(mv.version) == version
    assert mv.tags == {"mode": "class", "git_sha": "0123abc"}
    record = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/lineage/colours-sd-lora.json")
    assert record["num_adapters"] == "2" and record["sd"] == "tiny" and record["version"] == version

    (tmp_path / "dl").mkdir()
    model = mlflow.diffusers.load_model("models:/colours-sd-lora@candidate", dst_path=str(tmp_path / "dl"))
    assert model.base_model == "tiny" and model.adapter_type == "lora"
    pipe = load_sd_pipeline(tiny().models)
    for slug in slugs:
        pipe.load_lora_weights(model.adapter_path, weight_name=f"{slug}.safetensors", adapter_name=slug)
    assert set(pipe.get_list_adapters()["unet"]) == set(slugs)

    # Back to the adapt layout that `generate` reads, byte for byte.
    out = registry.download_adapters("colours", tmp_path / "adapters", ref="candidate")
    assert adapt.read_index(out) == index
    for slug in slugs:
        for file in (adapt.WEIGHTS, "adapter.json"):
            assert (out / slug / file).read_bytes() == (class_adapters / slug / file).read_bytes()
    with pytest.raises(UserError, match="'colours-sd-lora' has no alias 'champion'"):
        registry.download_adapters("colours", tmp_path / "none")


@pytest.mark.slow
def test_dataset_wise_adapter_loads_with_the_flavors_pipeline(tracking, fewshot_set, tiny, tmp_path):
    from datadream.models.sd import resolve_sd

    config = tiny("adapt.mode=dataset", "adapt.max_steps=1")
    adapters = adapt.run(config, fewshot_set, tmp_path / "dataset")
    version = registry.register_adapters("dataset-wise", adapters, {})
    model = mlflow.diffusers.load_model(f"models:/dataset-wise-sd-lora/{version}")
    assert model.weight_name is None  # the standard file name: diffusers finds it alone
    pipe = model.load_pipeline(base_model=resolve_sd(config.models), device="cpu", torch_dtype=torch.float32)
    assert pipe.get_list_adapters()["unet"]
    out = registry.download_adapters("dataset-wise", tmp_path / "back", ref=version)
    assert (out / adapt.DATASET_UNIT / adapt.WEIGHTS).read_bytes() == (
        adapters / adapt.DATASET_UNIT / adapt.WEIGHTS).read_bytes()


# --- serving over HTTP ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def pod_server(name: str, tracking: str, scratch: Path):
    """The serving pod's own command line and environment (from `registry deploy --dry-run`'s Deployment)
    for NAME's champion, on loopback; yields the base URL."""
    from datadream.serving import deploy, local
    from datadream.serving.manifests import ServingSettings

    rendered = deploy.deploy(name, tracking_uri=tracking, dry_run=True, settings=ServingSettings(image="img:1"))
    deployment = next(yaml.safe_load_all(rendered))
    port = free_port()
    argv, env = local.pod_process(deployment, port=port, scratch=scratch, values={"MLFLOW_TRACKING_URI": tracking})
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    # Only where it listens differs from the pod's command line.
    expected = list(args)
    expected[args.index("-h") + 1], expected[args.index("-p") + 1] = "127.0.0.1", str(port)
    assert Path(argv[0]).name == "mlflow" and argv[1:] == expected
    log = scratch / "server.log"
    proc = local.start(argv, env, log)
    try:
        local.wait_ready(f"http://127.0.0.1:{port}/ping", proc, log, timeout_s=240)
        yield f"http://127.0.0.1:{port}"
    finally:
        local.stop_process_group(proc)


def invocations(base: str, images: list[str]) -> list[dict]:
    body = {"dataframe_split": {"columns": ["image"], "data": [[x] for x in images]}}
    request = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())["predictions"]


@pytest.mark.slow
def test_pod_command_serves_the_champion_and_the_promoted_version_after(registered, classifier, tracking, tmp_path):
    folder, images, _ = classifier
    labels, _ = expected_labels(folder, images[:2])
    v1, v2 = add_version(registered, "served", 0.5), add_version(registered, "served", 0.6)
    registry.promote("served", v1)
    with pod_server("served", tracking, tmp_path / "pod1") as base:
        predictions = invocations(base, [b64(p) for p in images[:2]])
        assert [p["label"] for p in predictions] == labels
        assert all(len(p["probabilities"]) == 3 for p in predictions)
        assert {p["model_version"] for p in predictions} == {v1}
        # A bad image is the client's fault: 400 with the row named, not a 500.
        with pytest.raises(urllib.error.HTTPError) as err:
            invocations(base, ["bm90IGFuIGltYWdl"])
        assert err.value.code == 400 and "row 0" in err.value.read().decode()
    registry.promote("served", v2)
    with pod_server("served", tracking, tmp_path / "pod2") as base:
        predictions = invocations(base, [b64(images[0])])
        assert predictions[0]["model_version"] == v2 and predictions[0]["label"] == labels[0]
