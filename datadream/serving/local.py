"""Run the serving pod's command line on this machine: the local end-to-end test and benchmarks/serving.py.

`pod_process(deployment, ...)` turns a rendered Deployment (datadream.serving.manifests) into the argv and
environment its container runs, with only the bind address, the port and the scratch folder changed
and the ConfigMap/Secret values supplied by the caller. `start` launches it in its own process group,
`wait_ready` waits for /ping, `stop_process_group` ends it with every worker it forked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from datadream.serving import manifests


def pod_process(deployment: dict, *, port: int, scratch: Path, values: dict[str, str],
                host: str = "127.0.0.1") -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the Deployment's container. `values` fills the env entries the pod takes from its
    ConfigMap and Secret (absent keys are left out, as `optional` ones are in the pod); literal values
    under the pod's scratch folder are moved under `scratch`."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    argv = [*container.get("command", []), *container.get("args", [])]
    for flag, value in (("-h", host), ("-p", str(port))):
        argv[argv.index(flag) + 1] = value
    # The container's `mlflow` is this environment's (beside the running interpreter).
    argv[0] = str(Path(sys.executable).parent / argv[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != manifests.MODEL_VERSION_ENV}
    for entry in container["env"]:
        if "value" in entry:
            value = entry["value"]
            if value == manifests.SCRATCH or value.startswith(manifests.SCRATCH + "/"):
                value = str(scratch) + value[len(manifests.SCRATCH):]
            env[entry["name"]] = value
        elif entry["name"] in values:
            env[entry["name"]] = values[entry["name"]]
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # uvicorn by name
    Path(scratch).mkdir(parents=True, exist_ok=True)
    return argv, env


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """The server in a session of its own (so `stop_process_group` reaches its workers), output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> float:
    """Seconds until GET `url` answers below 500; RuntimeError with the log's tail if the process exits
    or the timeout passes first."""
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError), \
                urllib.request.urlopen(url, timeout=2) as r:
            if r.status < 500:
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s:\n{tail(log)}")
        time.sleep(0.2)


def tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session), SIGKILL what is left
    after `grace_s`; workers that outlive a leader which already exited are killed too."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
