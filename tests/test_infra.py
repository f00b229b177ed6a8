"""infra/terraform: parses as HCL2, passes checkov, and agrees with what the pipeline expects of the cluster.

No Terraform binary or cloud account is used: the checks read the HCL with python-hcl2 and run checkov from its own
virtualenv ($CHECKOV_BIN, default .venv-checkov/bin/checkov).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 is a dev dependency: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[1]
TF = ROOT / "infra" / "terraform"
TF_FILES = sorted(TF.rglob("*.tf"))

# kfp SDK major.minor -> Kubeflow Pipelines standalone manifests major.minor (the backend release line that the
# SDK is built against; see infra/README.md).
KFP_SDK_TO_BACKEND = {"2.17": "2.17"}


def unq(value):
    """python-hcl2 keeps the quotes of string literals and block labels: '"gpu"' -> 'gpu'."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def plain(value):
    """A parsed HCL value with quotes stripped and parser bookkeeping (__is_block__, __comments__) dropped."""
    if isinstance(value, dict):
        return {unq(k): plain(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return unq(value)


def load(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return hcl2.load(f)


def blocks(kind: str, path: Path) -> dict:
    """{type: {name: body}} for resource/data blocks, or {name: body} for module/variable/output blocks."""
    out: dict = {}
    for entry in load(path).get(kind, []):
        for k, v in plain(entry).items():
            if kind in ("resource", "data"):
                out.setdefault(k, {}).update(v)
            else:
                out[k] = v
    return out


def local_values(path: Path) -> dict:
    out: dict = {}
    for entry in load(path).get("locals", []):
        out.update(plain(entry))
    return out


def test_every_tf_file_parses():
    assert len(TF_FILES) >= 20, f"expected the root module and its modules under {TF}"
    for path in TF_FILES:
        try:
            load(path)
        except Exception as e:  # the parser raises lark errors of several kinds
            pytest.fail(f"{path.relative_to(ROOT)} is not valid HCL2: {e}")


def test_one_module_per_concern_wired_from_root():
    modules = blocks("module", TF / "main.tf")
    for concern in ("network", "eks", "buckets", "database", "iam", "kfp", "mlflow", "config"):
        assert modules[concern]["source"] == f"./modules/{concern}"
        assert (TF / "modules" / concern / "main.tf").is_file()
    for example in ("terraform.tfvars.example", "backend.tf.example"):
        assert (TF / example).is_file()
    assert 'backend "s3"' in (TF / "backend.tf.example").read_text()


def test_versions_pinned():
    terraform = plain(load(TF / "versions.tf")["terraform"][0])
    assert terraform["required_version"] == ">= 1.5.7"
    providers = terraform["required_providers"][0]
    assert providers["aws"]["version"].startswith(">= 6.")
    assert {"kubernetes", "helm"} <= set(providers)
    assert blocks("module", TF / "modules" / "eks" / "main.tf")["eks"]["version"] == "~> 21.0"


def test_variables_and_outputs_documented():
    for path in TF_FILES:
        for name, body in blocks("variable", path).items():
            assert body.get("description"), f"variable {name} in {path.relative_to(ROOT)} has no description"
        for name, body in blocks("output", path).items():
            assert body.get("description"), f"output {name} in {path.relative_to(ROOT)} has no description"
    root_vars = blocks("variable", TF / "variables.tf")
    validated = [n for n, b in root_vars.items() if b.get("validation")]
    unvalidated = set(root_vars) - set(validated)
    assert unvalidated <= {"tags", "enable_spot_gpu_group", "db_multi_az", "hf_token"}, unvalidated
    outputs = blocks("output", TF / "outputs.tf")
    assert {"kfp_endpoint", "mlflow_url", "buckets", "pipeline_root"} <= set(outputs)


def _gpu_groups() -> dict:
    path = TF / "modules" / "eks" / "main.tf"
    groups = local_values(path)
    wiring = load(path)["module"][0]['"eks"']["eks_managed_node_groups"]
    assert "gpu = local.gpu_node_group" in wiring and "gpu_spot = local.spot_gpu_node_group" in wiring
    return {"gpu": groups["gpu_node_group"], "gpu_spot": groups["spot_gpu_node_group"]}


def test_gpu_node_groups_match_pipeline_placement():
    from pipelines.pipeline import ClusterSettings

    s = ClusterSettings()
    label_key, label_value = s.gpu_node_selector
    taint_key, taint_effect = s.gpu_toleration
    effects = {"NO_SCHEDULE": "NoSchedule", "NO_EXECUTE": "NoExecute", "PREFER_NO_SCHEDULE": "PreferNoSchedule"}
    groups = _gpu_groups()
    for name, group in groups.items():
        assert group["labels"][label_key] == label_value, name
        taints = list(group["taints"].values())
        assert len(taints) == 1, name
        assert taints[0]["key"] == taint_key, name
        assert effects[taints[0]["effect"]] == taint_effect, name
        assert group["min_size"] == 0 and group["desired_size"] == 0, f"{name} must scale to zero"
        assert "NVIDIA" in group["ami_type"], name
    assert groups["gpu"]["capacity_type"] == "ON_DEMAND"
    assert groups["gpu_spot"]["capacity_type"] == "SPOT"
    # The device plugin runs where the pipeline's GPU tasks land and tolerates the same taint.
    plugin = (TF / "modules" / "cluster-addons" / "main.tf").read_text()
    assert 'chart      = "nvidia-device-plugin"' in plugin
    eks_out = blocks("output", TF / "modules" / "eks" / "outputs.tf")
    assert eks_out["gpu_node_label"]["value"] == [label_key, label_value]
    assert eks_out["gpu_taint_key"]["value"] == taint_key


def test_configmap_and_secret_match_components():
    from pipelines.pipeline import ClusterSettings

    s = ClusterSettings()
    res = blocks("resource", TF / "modules" / "config" / "main.tf")
    cm = res["kubernetes_config_map_v1"]["datadream"]
    secret = res["kubernetes_secret_v1"]["datadream"]
    assert cm["metadata"][0]["name"] == s.config_map
    assert set(cm["data"]) == set(s.config_map_keys)
    assert secret["metadata"][0]["name"] == s.secret
    assert set(secret["data"]) == set(s.secret_keys)
    # The pipeline pods run in KFP standalone's namespace, where the ConfigMap/Secret are created.
    assert blocks("module", TF / "main.tf")["config"]["namespace"] == "${local.kfp_namespace}"
    assert local_values(TF / "main.tf")["kfp_namespace"] == "kubeflow"


def test_kfp_backend_matches_sdk():
    from importlib.metadata import version

    sdk = ".".join(version("kfp").split(".")[:2])
    assert sdk in KFP_SDK_TO_BACKEND, f"kfp SDK {sdk}: add its backend line to KFP_SDK_TO_BACKEND and infra"
    default = blocks("variable", TF / "variables.tf")["kfp_version"]["default"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", default)
    assert default.rsplit(".", 1)[0] == KFP_SDK_TO_BACKEND[sdk]
    kfp = (TF / "modules" / "kfp" / "main.tf").read_text()
    assert "manifests/kustomize/env/platform-agnostic?ref=${var.kfp_version}" in kfp
    launcher = blocks("resource", TF / "modules" / "kfp" / "main.tf")["kubernetes_config_map_v1"]["kfp_launcher"]
    assert launcher["metadata"][0]["name"] == "kfp-launcher"
    assert {"defaultPipelineRoot", "providers"} <= set(launcher["data"])
    assert local_values(TF / "main.tf")["pipeline_root"].startswith("s3://")


def test_buckets_encrypted_versioned_private_and_abort_multipart():
    res = blocks("resource", TF / "modules" / "buckets" / "main.tf")
    names = set(res["aws_s3_bucket"])
    assert names == {"data", "pipeline_root", "mlflow"}
    for b in names:
        ref = f"${{aws_s3_bucket.{b}.id}}"
        sse = res["aws_s3_bucket_server_side_encryption_configuration"][b]
        assert sse["bucket"] == ref
        assert sse["rule"][0]["apply_server_side_encryption_by_default"][0]["sse_algorithm"] == "aws:kms"
        ver = res["aws_s3_bucket_versioning"][b]
        assert ver["bucket"] == ref and ver["versioning_configuration"][0]["status"] == "Enabled"
        pab = res["aws_s3_bucket_public_access_block"][b]
        assert pab["bucket"] == ref
        for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
            assert pab[flag] is True, (b, flag)
        lc = res["aws_s3_bucket_lifecycle_configuration"][b]
        assert lc["bucket"] == ref
        aborts = [r for r in lc["rule"] if r["status"] == "Enabled" and r.get("abort_incomplete_multipart_upload")]
        assert aborts and aborts[0]["abort_incomplete_multipart_upload"][0]["days_after_initiation"] >= 1, b


def test_least_privilege_s3_access():
    """Pipeline pods cannot touch the MLflow bucket or write data; only the MLflow role writes MLflow artifacts."""
    text = (TF / "modules" / "iam" / "main.tf").read_text()
    res = blocks("resource", TF / "modules" / "iam" / "main.tf")
    policies = {name: body["policy"] for name, body in res["aws_iam_role_policy"].items()}
    assert "mlflow_bucket_arn" not in policies["pipeline"] and "mlflow_bucket_arn" not in policies["kfp_ui"]
    assert "s3:PutObject" not in policies["kfp_ui"]
    assert '"s3:PutObject"' in policies["mlflow"] and "mlflow_bucket_arn" in policies["mlflow"]
    # The pipeline writes only under its pipeline-root prefix; data is read-only.
    write_stmt = re.search(r'Sid\s*=\s*"ReadWritePipelineRoot".*?Resource\s*=\s*\[([^\]]*)\]', text, re.S)
    assert write_stmt and "pipeline_root_bucket_arn}/${var.pipeline_root_prefix}/*" in write_stmt.group(1)
    read_stmt = re.search(r'Sid\s*=\s*"ReadData".*?Action\s*=\s*\[([^\]]*)\]', text, re.S)
    assert read_stmt and "Put" not in read_stmt.group(1) and "Delete" not in read_stmt.group(1)
    assert set(res["aws_eks_pod_identity_association"]) >= {"pipeline", "mlflow"}


def test_mlflow_server_proxied_authenticated_cluster_internal():
    res = blocks("resource", TF / "modules" / "mlflow" / "main.tf")
    container = res["kubernetes_deployment_v1"]["mlflow"]["spec"][0]["template"][0]["spec"][0]["container"][0]
    args = container["args"]
    for flag in ("--serve-artifacts", "--artifacts-destination", "--allowed-hosts", "--app-name"):
        assert flag in args, flag
    assert args[args.index("--app-name") + 1] == "basic-auth"
    assert res["kubernetes_service_v1"]["mlflow"]["spec"][0]["type"] == "ClusterIP"
    hosts = blocks("module", TF / "main.tf")["mlflow"]["allowed_hosts"]
    assert "mlflow_service_dns}:*" in hosts  # the Service DNS name with a port, or clients get 403


def _checkov_bin() -> Path:
    path = Path(os.environ.get("CHECKOV_BIN") or ROOT / ".venv-checkov" / "bin" / "checkov")
    if not path.is_file():
        pytest.fail(
            f"checkov not found at {path}. Install it in its own virtualenv: "
            "python3.11 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov "
            "(or point $CHECKOV_BIN at a checkov executable)."
        )
    return path


def test_checkov_has_no_failed_checks():
    cmd = [str(_checkov_bin()), "-d", str(TF), "--framework", "terraform", "--quiet", "--compact", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON (rc={proc.returncode}): {proc.stderr[-2000:]}")
    report = report[0] if isinstance(report, list) else report
    summary = report["summary"]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for c in report.get("results", {}).get("failed_checks", [])
    ]
    assert not failed and summary["failed"] == 0, "\n".join(failed)
    assert summary["parsing_errors"] == 0
    assert summary["passed"] >= 150, summary  # the scan really covered the stack
    # Every suppression carries a reason.
    skips = [m for p in TF_FILES for m in re.finditer(r"checkov:skip=([A-Z0-9_]+)(.*)", p.read_text())]
    assert len(skips) == summary["skipped"], (len(skips), summary)
    for m in skips:
        assert len(m.group(2).lstrip(": ").strip()) >= 20, f"skip of {m.group(1)} needs a reason"


def test_mlflow_image_is_the_one_docker_builds():
    import subprocess

    tags = subprocess.run(["bash", str(ROOT / "docker" / "build.sh"), "--mlflow", "--print-tags"], check=True,
                          capture_output=True, text=True).stdout.split()
    variables = plain(load(TF / "variables.tf"))["variable"]
    default = next(v["mlflow_image"]["default"] for v in variables if "mlflow_image" in v)
    assert default == tags[0]
