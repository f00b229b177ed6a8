"""What a person sees while kfp.local runs a pipeline (`datadream pipeline run --local`, `datadream demo`).

kfp.local streams every task's whole output into this process: the executor_input JSON, progress
redraws, INFO lines, parallel tasks interleaved without names. While `task_output(...)` is active:

- each task's output goes to its own file, `<logs>/<task>.log` (a retry appends to it);
- one line per finished task on `stream`: `✓ adapt 0/1  12 s  [4/25]` (✗ on failure, followed by the
  last lines of the failed attempt, without the executor_input JSON, and the log's path);
- kfp.local's own INFO log lines are dropped (its warnings and errors pass).

`quiet` prints only failures; verbose callers do not use this at all and get kfp.local's stream.
The hook is `kfp.local.subprocess_task_handler.run_local_subprocess` (kfp 2.17), the one function
through which the SubprocessRunner starts a task; it is put back on exit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from datadream.errors import InfraError

if TYPE_CHECKING:
    from pipelines.warm_start import WarmStarter

TAIL_LINES = 20
# kfp 2.17's local ParallelFor runs at most two iterations at once (ParallelExecutor.conservative_max).
KFP_LOCAL_LOOP_WORKERS = 2
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONDITION = re.compile(r"^(!\()?inputs\.parameter_values\['([^']+)'\] (==|!=) (.+?)(\))?$")
_UNKNOWN = object()


@dataclass
class Task:
    """One task of a local run, named as a person reads it."""

    name: str  # "adapt 0/1", "classify synthetic+real", "fewshot"
    log: Path
    root: Path  # kfp.local's task folder (its outputs)
    attempts: int = 0


@dataclass
class Finished:
    task: Task
    ok: bool
    seconds: float
    attempt: int


@dataclass
class TaskOutput:
    """Runs task processes with their output in log files and reports each as it finishes."""

    pipeline_root: Path
    stream: IO[str]
    quiet: bool = False
    label: str = ""  # printed before each task name, e.g. "class-wise"
    logs_dir: Path | None = None  # default: <run folder>/logs
    spec: dict | None = None  # the pipeline's IR (PipelineSpec as a dict), to count the tasks ahead
    arguments: dict = field(default_factory=dict)
    warm: WarmStarter | None = None  # tasks forked from a warm process (pipelines/warm_start.py); None: cold
    finished: list[Finished] = field(default_factory=list)
    _tasks: dict[Path, Task] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)  # re-entered by the interrupt handler
    _running: set[subprocess.Popen] = field(default_factory=set)
    _stopped: bool = False

    # --- naming ---------------------------------------------------------------------------------

    def task_for(self, full_command: list[str]) -> Task:
        executor_input = _executor_input(full_command)
        root = Path(executor_input["outputs"]["outputFile"]).parent
        params = executor_input.get("inputs", {}).get("parameterValues", {})
        base = re.sub(r"-\d+$", "", root.name)  # "classify-2" (second branch) -> "classify"
        detail = next((str(params[k]) for k in ("shard", "train_on", "worker") if params.get(k) not in (None, "")),
                      "")
        name = f"{base} {detail}".strip()
        with self._lock:
            if root not in self._tasks:
                run_dir = self.pipeline_root / root.relative_to(self.pipeline_root).parts[0]
                logs = self.logs_dir or run_dir / "logs"
                slug = re.sub(r"[^A-Za-z0-9+]+", "-", name.replace("/", "of")).strip("-")
                taken = {t.log for t in self._tasks.values()}
                log, n = logs / f"{slug}.log", 2
                while log in taken:
                    log, n = logs / f"{slug}-{n}.log", n + 1
                self._tasks[root] = Task(name, log, root)
            task = self._tasks[root]
            task.attempts += 1
            return task

    # --- the hook -------------------------------------------------------------------------------

    def run_local_subprocess(self, full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        """Drop-in for kfp.local.subprocess_task_handler.run_local_subprocess: same arguments, exit code."""
        task = self.task_for(full_command)
        attempt = task.attempts
        task.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(env_vars or {})}
        # The log is not a terminal: a progress bar there is one line per redraw.
        env["TQDM_DISABLE"] = "1"
        if "OMP_NUM_THREADS" not in os.environ:  # the caller's setting wins
            env["OMP_NUM_THREADS"] = str(self.threads_for(task.root))
        t0 = time.monotonic()
        with open(task.log, "a" if attempt > 1 else "w", encoding="utf-8") as f:
            if attempt > 1:
                f.write(f"\n===== attempt {attempt} =====\n")
            start = f.tell()
            f.flush()
            if self._stopped:  # interrupted: nothing new starts (kfp.local would still retry)
                f.write("not started: the run was interrupted\n")
                returncode = 130
            else:
                returncode = self.warm.run(full_command, env, task.log) if self.warm is not None else None
            if returncode is None:
                with self._lock:
                    # its own process group: `stop` ends the `sh` of the command and the python under it
                    proc = subprocess.Popen(full_command, stdout=f, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, process_group=0)
                    self._running.add(proc)
                returncode = proc.wait()
                with self._lock:
                    self._running.discard(proc)
        seconds = time.monotonic() - t0
        self._report(Finished(task, returncode == 0, seconds, attempt), start, returncode)
        return returncode

    # --- reporting ------------------------------------------------------------------------------

    def _report(self, done: Finished, start: int, returncode: int) -> None:
        with self._lock:
            self.finished.append(done)
            if self._stopped:  # interrupted: the tasks ended because of it, which was said once
                return
            ok_count = len({f.task.root for f in self.finished if f.ok})
            total = self.total()
            if done.ok and self.quiet:
                return
            where = f"[{ok_count}/{total}]" if total else f"[{ok_count}]"
            label = f"{self.label}  " if self.label else ""
            again = f" (attempt {done.attempt})" if done.attempt > 1 else ""
            if not done.ok and done.attempt <= self.retries(done.task.root.name):
                self.stream.write(f"↻ {label}{done.task.name:<24} {done.seconds:>4.0f} s  attempt {done.attempt} "
                                  f"failed (exit {returncode}), retrying; log: {done.task.log}\n")
                self.stream.flush()
                return
            mark = "✓" if done.ok else "✗"
            lines = [f"{mark} {label}{done.task.name:<24} {done.seconds:>4.0f} s  {where}{again}"]
            if not done.ok:
                lines.append(f"    exit {returncode}; last lines of the attempt:")
                lines += [f"    | {line}" for line in failure_tail(done.task.log, start)]
                lines.append(f"    full log: {done.task.log}")
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()

    def _outputs(self) -> dict:
        """The finished tasks' output parameters, as "<task>-<output>": value."""
        outputs = {}
        for task in list(self._tasks.values()):
            path = task.root / "executor_output.json"
            if path.is_file():
                with contextlib.suppress(ValueError, OSError):
                    values = json.loads(path.read_text()).get("parameterValues", {})
                    outputs.update({f"{task.root.name}-{k}": v for k, v in values.items()})
        return outputs

    def total(self) -> int | None:
        """How many tasks the run will have, once the loop sizes are known (None before)."""
        if self.spec is None:
            return None
        return count_tasks(self.spec, self.arguments, self._outputs())

    def threads_for(self, root: Path) -> int:
        """torch threads for the task in `root`: the cores shared by the tasks kfp.local runs beside it.

        A task alone (adapt, generate of one shard) gets every core; each of two loop iterations that run
        at once gets half. Where the loop is unknown, one thread, which never oversubscribes.
        """
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        loops = [m.group(1) for part in root.relative_to(self.pipeline_root).parts
                 if (m := re.fullmatch(r"(for-loop-\d+)-iteration-\d+", part))]
        if loops and not self.spec:
            return 1
        at_once, outputs = 1, self._outputs() if loops else {}
        for loop in loops:
            n = concurrent_iterations(self.spec, self.arguments, outputs, loop)
            if n is None:
                return 1
            at_once *= n
        return max(1, cores // at_once)

    def retries(self, task_name: str) -> int:
        """The retry count of the task called `task_name` in the pipeline's IR (0 when unknown)."""
        for name, task in _dag_tasks(self.spec or {}):
            if name == task_name:
                return int(task.get("retryPolicy", {}).get("maxRetryCount", 0))
        return 0

    def stop(self) -> None:
        """An interrupt: no task starts from now on, and the cold task processes still running end
        (the warm ones end with their helper, `WarmStarter.close`)."""
        with self._lock:
            self._stopped = True
            running = list(self._running)
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    def failures(self) -> list[Finished]:
        """The tasks whose last attempt failed."""
        last = {f.task.root: f for f in self.finished}
        return [f for f in last.values() if not f.ok]


def _executor_input(full_command: list[str]) -> dict:
    i = full_command.index("--executor_input")
    return json.loads(full_command[i + 1])


def failure_tail(log: Path, start: int = 0, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` lines of a log from byte `start`: no executor_input JSON, no colour codes, no redraws."""
    with open(log, encoding="utf-8", errors="replace", newline="") as f:  # keep "\r" redraws apart
        f.seek(start)
        text = f.read()
    kept, in_json = [], False
    for raw in text.split("\n"):  # not splitlines(), which would split the redraws too
        line = _ANSI.sub("", raw.split("\r")[-1]).rstrip()
        if in_json:
            in_json = line != "}"
            continue
        if line.endswith("Got executor_input:"):
            in_json = True
            continue
        if line.strip():
            kept.append(line)
    return kept[-lines:]


def _loop_items(task: dict, value) -> list | None:
    """The items a ParallelFor task iterates over (None while they are unknown)."""
    items = task["parameterIterator"]["items"]
    v = json.loads(items["raw"]) if "raw" in items else value(items.get("inputParameter", ""))
    if isinstance(v, str):
        with contextlib.suppress(ValueError):
            v = json.loads(v)
    return v if isinstance(v, list) else None


def _channel_values(spec: dict, arguments: dict, outputs: dict):
    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    params = {k: v.get("defaultValue") for k, v in declared.items()} | dict(arguments)

    def value(channel: str) -> Any:
        name = channel.removeprefix("pipelinechannel--")
        if name in params:
            return params[name]
        return outputs.get(name, _UNKNOWN)

    return value


def concurrent_iterations(spec: dict, arguments: dict, outputs: dict, loop: str) -> int | None:
    """How many iterations of the ParallelFor `loop` ("for-loop-3") kfp.local runs at once: its items,
    at most its parallelism limit and at most KFP_LOCAL_LOOP_WORKERS (kfp 2.17 runs two at a time)."""
    for _, t in _dag_tasks(spec):
        if t.get("componentRef", {}).get("name") == f"comp-{loop}" and "parameterIterator" in t:
            items = _loop_items(t, _channel_values(spec, arguments, outputs))
            if items is None:
                return None
            limit = int(t.get("iteratorPolicy", {}).get("parallelismLimit", 0)) or len(items)
            return max(1, min(len(items), limit, KFP_LOCAL_LOOP_WORKERS))
    return None


def _dag_tasks(spec: dict) -> Iterator[tuple[str, dict]]:
    """Every task of the pipeline's IR, (name, task spec), in the root DAG and in each component's."""
    for comp in [spec.get("root", {}), *spec.get("components", {}).values()]:
        yield from comp.get("dag", {}).get("tasks", {}).items()


def count_tasks(spec: dict, arguments: dict, outputs: dict) -> int | None:
    """Executor tasks a run of `spec` will start: conditions evaluated, ParallelFor loops multiplied.

    A loop over a task's output counts once that output is in `outputs` ("<task>-<output>": value);
    until then, or for a condition this does not understand, the answer is None.
    """
    components = spec["components"]
    value = _channel_values(spec, arguments, outputs)

    def dag(d: dict) -> int | None:
        n = 0
        for t in d.get("tasks", {}).values():
            condition = t.get("triggerPolicy", {}).get("condition")
            if condition:
                holds = _condition(condition, value)
                if holds is None:
                    return None
                if not holds:
                    continue
            times = 1
            if "parameterIterator" in t:
                v = _loop_items(t, value)
                if v is None:
                    return None
                times = len(v)
            comp = components[t["componentRef"]["name"]]
            inner = dag(comp["dag"]) if "dag" in comp else 1
            if inner is None:
                return None
            n += times * inner
        return n

    return dag(spec["root"]["dag"])


def _condition(text: str, value) -> bool | None:
    m = _CONDITION.match(text.strip())
    if not m or bool(m.group(1)) != bool(m.group(5)):
        return None
    left = value(m.group(2))
    literal = m.group(4)
    try:
        right = literal[1:-1] if literal[:1] == literal[-1:] == "'" else json.loads(literal)
    except ValueError:
        return None
    if left is _UNKNOWN:
        return None
    holds = (left == right) if m.group(3) == "==" else (left != right)
    return not holds if m.group(1) else holds


class _DropKfpInfo(logging.Filter):
    """kfp.local logs each task's start, streamed-log banner, outputs and end at INFO through the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}kfp{os.sep}" not in record.pathname


@contextlib.contextmanager
def task_output(pipeline_root: Path, stream: IO[str], *, quiet: bool = False, label: str = "",
                logs_dir: Path | None = None, spec: dict | None = None,
                arguments: dict | None = None, warm: WarmStarter | None = None) -> Iterator[TaskOutput]:
    """While active, kfp.local's SubprocessRunner tasks run through a `TaskOutput` (see the module doc)."""
    from kfp.local import subprocess_task_handler

    out = TaskOutput(Path(pipeline_root), stream, quiet=quiet, label=label, logs_dir=logs_dir, spec=spec,
                     arguments=dict(arguments or {}), warm=warm)
    original = subprocess_task_handler.run_local_subprocess
    root = logging.getLogger()
    drop = _DropKfpInfo()
    subprocess_task_handler.run_local_subprocess = out.run_local_subprocess
    root.addFilter(drop)
    try:
        yield out
    finally:
        subprocess_task_handler.run_local_subprocess = original
        root.removeFilter(drop)


class PipelineFailed(InfraError):
    """A local run stopped because a task failed; the message names the task(s) and their logs (the
    CLI prints it as one line and exits 1: the failing task's last lines are already on the screen)."""

    def __init__(self, pipeline: str, failed: list[Finished]):
        self.failed = failed
        names = ", ".join(f"{f.task.name} (log: {f.task.log})" for f in failed)
        super().__init__(f"pipeline {pipeline} failed: {names}")


def _short(path: Path) -> str:
    """`path` relative to the working folder when it lies below it (what a person types next)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _report_of(run: Path) -> Path | None:
    """A run's one report a browser opens: `<run>/report.html`, else its summary's report artifact."""
    candidates = [Path(run) / "report.html", *sorted(Path(run).glob("summarize*/report.html")),
                  *sorted(Path(run).glob("summarize*/report"))]
    return next((c for c in candidates if c.is_file()), None)


def where_to_look(runs: list[Path], logs: Path, mlflow_db: Path) -> str:
    """The lines after a local run: its reports, the task logs and how to open MLflow."""
    lines = ["", "where to look next:"]
    reports = [r for r in map(_report_of, runs) if r is not None]
    lines += [f"  report     {_short(p)}" for p in reports]
    lines.append(f"  task logs  {_short(logs)}/")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (f"sqlite:///{_short(mlflow_db)}" if Path(mlflow_db).is_file()
                                                    else "")
    if uri.startswith(("http://", "https://")):
        lines.append(f"  MLflow     {uri}")
    elif uri:  # a database the embedded UI can open
        lines.append(f"  MLflow     mlflow ui --backend-store-uri {uri}")
        experiment = _latest_experiment(Path(mlflow_db)) if uri.startswith("sqlite:///") else None
        if experiment is not None:  # MLflow 3 opens an experiment in its GenAI view unless the link says otherwise
            lines.append(f"  then open  http://127.0.0.1:5000/#/experiments/{experiment}?workflowType=machine_learning")
    return "\n".join(lines)


def _latest_experiment(db: Path) -> str | None:
    """The experiment of the newest run in a local MLflow SQLite store (None if there is none)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT experiment_id FROM runs ORDER BY start_time DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None
