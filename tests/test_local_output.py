"""What a local pipeline run prints: a line per task, each task's output in its own log, failures with their tail."""


import os
import re
import sys
from pathlib import Path

import pytest
from kfp import compiler
from kfp_toy_pipeline import fanout_pipeline, work

import pipelines.pipeline as pp
import pipelines.warm_start as ws
from pipelines.local_output import PipelineFailed, TaskOutput, count_tasks, failure_tail


@pytest.fixture(scope="module")
def toy_spec(tmp_path_factory):
    import yaml

    path = tmp_path_factory.mktemp("toy") / "fanout.yaml"
    compiler.Compiler().compile(fanout_pipeline, str(path))
    return yaml.safe_load(path.read_text())


def test_count_tasks_follows_conditions_and_loops(toy_spec):
    # The loop runs over make-shards' output: unknown until that task has finished.
    assert count_tasks(toy_spec, {"n": 3}, {}) is None
    assert count_tasks(toy_spec, {"n": 3}, {"make-shards-Output": ["0/3", "1/3", "2/3"]}) == 4
    # The other branch skips the loop, whatever its size.
    assert count_tasks(toy_spec, {"branch": "b"}, {}) == 1


def test_failure_tail_drops_the_executor_input_json_and_redraws(tmp_path):
    log = tmp_path / "t.log"
    log.write_text("old attempt\n" + "\n".join([
        "[KFP Executor 2026 INFO]: Got executor_input:", "{", '    "inputs": {', '        "x": 1', "    }", "}",
        "\x1b[92mstarting\x1b[0m", "", "bar 10%\rbar 50%\rbar 100%", *(f"line {i}" for i in range(30)),
        "Traceback: boom"]) + "\n")
    start = len("old attempt\n")
    tail = failure_tail(log, start, lines=40)
    assert tail[:3] == ["starting", "bar 100%", "line 0"] and tail[-1] == "Traceback: boom"
    assert not any('"inputs"' in t or t in ("{", "}") or "old attempt" in t for t in tail)
    assert len(failure_tail(log, start)) == 20


@pytest.fixture
def toy_run(monkeypatch, tmp_path):
    monkeypatch.setattr(pp, "pipeline_function", lambda name, settings=None: fanout_pipeline)
    monkeypatch.setattr(ws, "PRELOAD", ("kfp.dsl.executor_main",))  # the toy tasks import nothing more

    def run(capfd, **arguments):
        try:
            return pp.run_local(tmp_path / "runs", arguments, name="toy-fanout"), None
        except PipelineFailed as e:
            return None, e
        finally:
            out, err = capfd.readouterr()
            run.stdout, run.stderr = out, err

    return run


@pytest.mark.slow
def test_a_local_run_prints_a_line_per_task_and_logs_each(toy_run, capfd):
    run_dir, failed = toy_run(capfd, n=2)
    assert failed is None and toy_run.stdout == ""  # kfp.local's banner and task logs are gone
    lines = toy_run.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    # its output sizes the loop, so the total is known from the first line on
    assert lines[0].startswith("✓ make-shards") and lines[0].endswith("[1/3]")
    assert sorted(line.split()[2] for line in lines[1:]) == ["0/2", "1/2"]
    assert [line.split()[-1] for line in lines[1:]] == ["[2/3]", "[3/3]"]
    logs = run_dir / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["make-shards.log", "work-0of2.log", "work-1of2.log"]
    assert "line 29 of shard 1/2" in (logs / "work-1of2.log").read_text()


@pytest.mark.slow
def test_a_failed_task_shows_its_tail_and_log_and_the_run_raises(toy_run, capfd):
    _, failed = toy_run(capfd, n=2, fail="1/2")
    assert isinstance(failed, PipelineFailed) and [f.task.name for f in failed.failed] == ["work 1/2"]
    log = failed.failed[0].task.log
    assert str(log) in str(failed) and log.name == "work-1of2.log"
    err = toy_run.stderr
    assert "↻ work 1/2" in err and "attempt 1 failed (exit 3), retrying" in err  # retried once (set_retry)
    block = err[err.index("✗ work 1/2"):]
    assert "(attempt 2)" in block.splitlines()[0] and "exit 3; last lines of the attempt:" in block
    assert "| shard 1/2 fails on purpose" in block and f"full log: {log}" in block
    assert "executor_input" not in block and '"outputFile"' not in block
    text = log.read_text()
    assert text.count("fails on purpose") == 2 and "===== attempt 2 =====" in text
    assert "✓ work 0/2" in err


@pytest.mark.slow
def test_quiet_prints_only_failures_and_verbose_streams_everything(toy_run, capfd):
    run_dir, _ = toy_run(capfd, n=1)
    capfd.readouterr()
    assert pp.run_local(run_dir.parent, {"n": 1}, name="toy-fanout", quiet=True)
    assert capfd.readouterr() == ("", "")
    pp.run_local(run_dir.parent, {"n": 1}, name="toy-fanout", verbose=True)
    out, err = capfd.readouterr()
    assert out == "" and "line 29 of shard 0/1" in err and "Executing task" in err


def test_where_to_look_names_reports_logs_and_the_mlflow_command(tmp_path, monkeypatch):
    from pipelines.local_output import where_to_look

    run = tmp_path / "runs" / "datadream-1"
    (run / "summarize").mkdir(parents=True)
    (run / "summarize" / "report").write_text("<html>")
    db = tmp_path / "runs" / "mlflow.db"
    db.write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = where_to_look([run], tmp_path / "logs", db)
    assert "report     runs/datadream-1/summarize/report" in text and "task logs  logs/" in text
    assert "mlflow ui --backend-store-uri sqlite:///runs/mlflow.db" in text
    assert "then open" not in text  # no runs yet: nothing to link to
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert "MLflow     http://mlflow:5000" in where_to_look([run], tmp_path / "logs", db)
    (run / "report.html").write_text("<html>")  # what run_local publishes: named once, not beside its source
    text = where_to_look([run], tmp_path / "logs", db)
    assert text.count("report     ") == 1 and "report     runs/datadream-1/report.html" in text


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def test_threads_follow_the_tasks_that_run_at_once(toy_spec, tmp_path):
    out = TaskOutput(tmp_path, sys.stderr, spec=toy_spec, arguments={"n": 1})
    run = tmp_path / "toy-fanout-1"
    shards = run / "make-shards"
    shards.mkdir(parents=True)
    out.task_for(["--executor_input", f'{{"outputs": {{"outputFile": "{shards}/executor_output.json"}}}}'])
    # the loop's size comes from make-shards' output: unknown until it is written, so one thread
    assert out.threads_for(run / "for-loop-2-iteration-0" / "work") == 1
    (shards / "executor_output.json").write_text('{"parameterValues": {"Output": ["0/1"]}}')
    assert out.threads_for(run / "make-shards") == _cores()  # not in a loop: alone
    assert out.threads_for(run / "for-loop-2-iteration-0" / "work") == _cores()  # a loop of one
    (shards / "executor_output.json").write_text('{"parameterValues": {"Output": ["0/3", "1/3", "2/3"]}}')
    # kfp.local runs two iterations at a time
    assert out.threads_for(run / "for-loop-2-iteration-2" / "work") == max(1, _cores() // 2)


def test_only_kfps_own_lightweight_command_starts_warm():
    command = work.component_spec.implementation.container.command
    ours = [c.replace("python3", sys.executable) if i == 2 else c for i, c in enumerate(command)]
    assert ws.lightweight_task([*ours, "--executor_input", "{}", "--function_to_execute", "work"])
    assert not ws.lightweight_task([*command, "--executor_input", "{}"])  # another interpreter: python3 on PATH
    assert not ws.lightweight_task([ours[0], ours[1], ours[2] + "rm -rf /tmp/x\n", ours[3]])
    assert not ws.lightweight_task(["python3", "-c", "print(1)", "x"])
    # no helper process (e.g. the interpreter cannot start): the task starts cold, as kfp.local starts it
    starter = ws.WarmStarter(preload=())
    starter._start = lambda env: (_ for _ in ()).throw(OSError("no processes left"))
    assert starter.run([*ours, "--executor_input", "{}"], dict(os.environ), Path("unused.log")) is None
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "2"}
    assert ws._same_environment(base, {"PATH": "/bin", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert not ws._same_environment(base, {**base, "HF_HOME": "/elsewhere"})


@pytest.mark.slow
def test_tasks_are_forked_from_the_warm_helper_as_they_would_start_cold(toy_run, capfd, tmp_path):
    def processes(run_dir):
        found = {}
        for log in sorted((run_dir / "logs").glob("work-*.log")):
            text = log.read_text()
            m = re.search(r"process (\d+) parent (\d+) threads (\d+)", text)
            assert m and "line 29 of shard" in text and "exit hooks ran for shard" in text, text[-500:]
            found[log.name] = (int(m.group(2)), int(m.group(3)))
        return found

    with ws.WarmStarter(tmp_path / "helper.log", preload=("json",)) as warm:
        run_dir = pp.run_local(tmp_path / "warm", {"n": 1}, name="toy-fanout", warm=warm)
        assert processes(run_dir) == {"work-0of1.log": (warm.pid, _cores())}  # alone: every core
        run_dir = pp.run_local(tmp_path / "warm", {"n": 3}, name="toy-fanout", warm=warm)
        threads = max(1, _cores() // 2)  # two at a time
        assert set(processes(run_dir).values()) == {(warm.pid, threads)}
        capfd.readouterr()
        with pytest.raises(PipelineFailed):  # a failing task's exit status is the task's
            pp.run_local(tmp_path / "warm", {"n": 2, "fail": "0/2"}, name="toy-fanout", warm=warm)
        err = capfd.readouterr().err
        assert "attempt 1 failed (exit 3)" in err and "| shard 0/2 fails on purpose" in err
    cold = pp.run_local(tmp_path / "cold", {"n": 1}, name="toy-fanout", warm=False)
    ((parent, threads),) = processes(cold).values()
    assert parent != warm.pid and threads == _cores()


def test_where_to_look_links_the_newest_runs_experiment_in_the_model_training_view(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipelines.local_output import where_to_look

    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    older, newer = client.create_experiment("datadream"), client.create_experiment("datadream-tune")
    client.create_run(newer, start_time=1_000)
    client.create_run(older, start_time=2_000)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = where_to_look([], tmp_path / "logs", db)
    assert f"then open  http://127.0.0.1:5000/#/experiments/{older}?workflowType=machine_learning" in text


INTERRUPTED_RUN = """
import sys
import pipelines.pipeline as pp
import pipelines.warm_start as ws
from kfp_toy_pipeline import fanout_pipeline

pp.pipeline_function = lambda name, settings=None: fanout_pipeline
warm = ws.WarmStarter(preload=("json",)) if sys.argv[2] == "warm" else False
pp.run_local(sys.argv[1], {"n": 2, "sleep": 600.0}, name="toy-fanout", warm=warm)
"""


@pytest.mark.slow
@pytest.mark.parametrize("start", ["warm", "cold"])
def test_ctrl_c_stops_a_local_run_and_its_tasks_at_once(tmp_path, start):
    import signal
    import subprocess
    import time

    script = tmp_path / "run.py"
    script.write_text(INTERRUPTED_RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ws.Path(__file__).parent), *sys.path])}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "runs"), start], env=env,
                            stderr=subprocess.PIPE, text=True)
    pids, deadline = {}, time.monotonic() + 120
    while len(pids) < 2 and time.monotonic() < deadline:  # both iterations are sleeping
        for log in (tmp_path / "runs").glob("*/logs/work-*.log"):
            m = re.search(r"process (\d+) parent", log.read_text())
            if m and "line 29 of shard" in log.read_text():
                pids[log.name] = int(m.group(1))
        time.sleep(0.2)
    if len(pids) < 2:
        proc.kill()
        raise AssertionError(f"the tasks did not start: {proc.communicate()[1][-2000:]}")
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)  # to this process alone, as `kill -INT` would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t < 20
    assert "interrupted: the running steps are stopped" in err
    for pid in pids.values():  # the task processes end with the run
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"task process {pid} outlived the interrupted run")
