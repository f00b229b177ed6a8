"""Warm task processes for kfp.local: each task is still its own process, forked from a warm one.

kfp.local starts every task as a new Python process, and a DataDream task spends most of its life on
the CPU importing: about 2 s for mlflow, 2 s for torch, 2-3 s each for open_clip (with torchvision
and transformers) and diffusers (with peft), against about 1 s of work per task of the tiny demo.
Measured on a 2-core machine: about 150 CPU-seconds of imports in a `make demo` of 258 s wall time.

A `WarmStarter` runs one helper process (this module's `serve`) that imports those libraries once,
in the background and in that order, and forks one child per task. The child is what kfp.local would
have started: it points its stdin, stdout and stderr where the task's would go, takes the task's
environment and working folder, writes the component's source to a fresh temporary folder and runs
kfp's executor (`kfp.dsl.executor_main`) with the task's arguments, exactly as the component's
`sh -ec` command does. Its exit status is the task's. A task whose command is not that form, or
whose environment differs from the helper's in more than the thread settings, starts cold as before;
so does every task on a system other than Linux.

Forking after these imports is what torch's DataLoader does with its workers: no library is used
for compute before the fork (numpy's BLAS pool and pyarrow's allocator start threads at import, and
both re-initialise in a forked child). Each child sets torch's thread count from its environment,
since the helper's count was fixed at its own start.

Protocol: one JSON request per line on the helper's stdin ({"id", "command", "env", "cwd", "log"}),
one "<id> <exit code>" line per finished task on its stdout; EOF on stdin stops it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

log = logging.getLogger(__name__)

# What the steps import, roughly in the order a run needs it (fewshot, adapt, generate, classify).
PRELOAD = (
    "kfp.dsl.executor_main", "mlflow", "datadream.steps", "datadream.tracking", "torch",
    "datadream.stages.adapt", "diffusers", "peft", "datadream.models.sd", "datadream.stages.generate",
    "open_clip", "torchvision", "datadream.models.clip", "datadream.stages.classify", "datadream.stages.evaluate",
    "datadream.quality", "datadream.report", "datadream.plots", "matplotlib.figure", "datadream.registry",
    "mlflow.pyfunc", "mlflow.diffusers",
)
# Linux only: on macOS a child forked after system frameworks are loaded may crash, so tasks start cold there.
FORK_SAFE = sys.platform == "linux"
# Set per task by the caller; everything else in a task's environment must match the helper's.
PER_TASK_ENV = frozenset({"OMP_NUM_THREADS", "MKL_NUM_THREADS", "TQDM_DISABLE"})

# The command kfp (2.x) gives a lightweight component: sh -ec SCRIPT SOURCE ARG...; `python3` in it is
# replaced by kfp.local with the interpreter it runs.
_GAP = r"(?:[ \t]|\\\n)+"  # blanks, or an escaped line break
_SCRIPT = re.compile(
    r'\s*program_path=\$\(mktemp -d\)\s*\n'
    r'\s*printf "%s" "\$0" > "\$program_path/ephemeral_component\.py"\s*\n'
    rf'\s*_KFP_RUNTIME=true{_GAP}(?P<python>\S+){_GAP}-m{_GAP}kfp\.dsl\.executor_main{_GAP}'
    rf'--component_module_path{_GAP}"\$program_path/ephemeral_component\.py"{_GAP}"\$@"\s*'
)


def lightweight_task(command: list[str]) -> bool:
    """Whether `command` is kfp's lightweight-component command, run by this interpreter."""
    if len(command) < 4 or command[:2] != ["sh", "-ec"]:
        return False
    m = _SCRIPT.fullmatch(command[2])
    return bool(m) and m.group("python") == sys.executable


def _same_environment(a: dict[str, str], b: dict[str, str]) -> bool:
    keys = (set(a) | set(b)) - PER_TASK_ENV
    return all(a.get(k) == b.get(k) for k in keys)


class WarmStarter:
    """Runs kfp.local tasks as children of one warm helper process (see the module doc).

    `run(...)` returns the task's exit code, or None when the task must start cold (the caller then
    runs it as kfp.local would). The helper starts with the first task's environment; `close()` stops it.
    """

    def __init__(self, helper_log: Path | None = None, preload: tuple[str, ...] | None = None):
        self.helper_log = helper_log
        self.preload = PRELOAD if preload is None else tuple(preload)
        self._proc: subprocess.Popen | None = None
        self._env: dict[str, str] | None = None
        self._lock = threading.Lock()
        self._waiting: dict[int, Future] = {}
        self._next = 0
        self._broken = False

    @property
    def pid(self) -> int | None:
        """The helper's process id (None before the first task); every warm task is its child."""
        return self._proc.pid if self._proc is not None else None

    def run(self, command: list[str], env: dict[str, str], log_path: Path) -> int | None:
        if self._broken or not FORK_SAFE or not lightweight_task(command):
            return None
        with self._lock:
            if self._proc is None:
                try:
                    self._start(env)
                except OSError as e:  # no helper: every task starts cold, as kfp.local starts it
                    log.warning("warm start: the helper did not start (%s); tasks start cold", e)
                    self._broken = True
                    return None
            if not _same_environment(env, self._env):
                log.debug("warm start: the task's environment differs from the helper's; starting it cold")
                return None
            self._next += 1
            ident, done = self._next, Future()
            self._waiting[ident] = done
            request = {"id": ident, "command": command, "env": env, "cwd": os.getcwd(), "log": str(log_path)}
            try:
                self._proc.stdin.write((json.dumps(request) + "\n").encode())
                self._proc.stdin.flush()
            except OSError:  # the helper is gone: this and later tasks start cold
                self._waiting.pop(ident)
                self._broken = True
                return None
        return done.result()

    def _start(self, env: dict[str, str]) -> None:
        self._env = dict(env)
        err = open(self.helper_log, "a") if self.helper_log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "pipelines.warm_start", *self.preload],
                                          stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=err, env=env)
        finally:
            if err is not subprocess.DEVNULL:
                err.close()
        threading.Thread(target=self._read, name="warm-start-results", daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                ident, code = map(int, line.split())
            except ValueError:  # not a result line; the helper writes nothing else there
                log.debug("warm start: ignored %r from the helper", line)
                continue
            with self._lock:
                done = self._waiting.pop(ident, None)
            if done is not None:
                done.set_result(code)
        with self._lock:  # the helper ended: whatever still waits failed with it
            self._broken = True
            waiting, self._waiting = self._waiting, {}
        for done in waiting.values():
            done.set_result(1)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> WarmStarter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the helper process ------------------------------------------------------------------------------


def serve(preload: list[str], requests: int = 0, results: int = 1) -> None:
    """Fork one child per request line; import `preload` between requests; report exit codes."""
    # Ctrl-C reaches the tasks; the helper ends when its caller closes the requests (or dies), and then
    # ends the tasks still running.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    results_fd = os.dup(results)  # stdout is the results pipe: nothing an import prints may reach it
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, results)
    pending, children, buffer = list(preload), {}, b""
    while True:
        ready, _, _ = select.select([requests], [], [], 0 if pending else 0.05)
        if ready:
            chunk = os.read(requests, 1 << 20)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                sys.stdout.flush()  # nothing buffered before the fork may reach a task's log
                sys.stderr.flush()
                gc.freeze()  # what is loaded stays shared: the child's collector never touches (copies) it
                pid = os.fork()
                if pid == 0:
                    os.close(results_fd)
                    _exit(_child(request, null))
                children[pid] = request["id"]
        elif pending:
            name = pending.pop(0)
            try:
                importlib.import_module(name)
            except Exception as e:  # the task imports it itself and fails there, in its log
                print(f"warm start: not preloading {name}: {e!r}", file=sys.stderr)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            os.write(results_fd, f"{children.pop(pid)} {os.waitstatus_to_exitcode(status)}\n".encode())
    for pid in children:  # the caller is gone (an interrupt): its tasks end with it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def _child(request: dict, null: int) -> int:
    """In the forked child: become the task's process, run it, return its exit code."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in any Python program
    os.dup2(null, 0)
    fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "torch" in sys.modules:  # its thread count was read at the helper's start
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            sys.modules["torch"].set_num_threads(int(threads))
    try:
        _execute(request["command"])
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # as the interpreter would: the traceback, then exit 1
        import traceback

        traceback.print_exc()
        return 1
    return 0


def _exit(code: int) -> None:
    """End the child as the interpreter ends a program, less the teardown of every module.

    Python's own exit waits for the program's threads, runs its atexit handlers (MLflow ends its
    runs there, logging flushes) and flushes stdio, then frees every module; with everything the
    helper imported, that last part takes over 2 s per task on a 2-core machine, so it is skipped.
    """
    try:
        threading._shutdown()  # what Py_Finalize calls first: threading's exit hooks, non-daemon threads
        atexit._run_exitfuncs()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _execute(command: list[str]) -> None:
    """What `sh -ec SCRIPT SOURCE ARG...` does: the source in a fresh folder, then kfp's executor."""
    source, args = command[3], command[4:]
    folder = tempfile.mkdtemp()
    program = Path(folder) / "ephemeral_component.py"
    program.write_text(source)
    os.environ["_KFP_RUNTIME"] = "true"
    sys.argv = [sys.executable, "--component_module_path", str(program), *args]
    from kfp.dsl import executor_main

    try:
        executor_main.executor_main()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
