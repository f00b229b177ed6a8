"""A tiny pipeline with typed, defaulted parameters: what tests compile to exercise `pipelines.client`."""

from kfp import dsl


@dsl.component(base_image="python:3.11")
def repeat(message: str, times: int, scale: float, loud: bool) -> str:
    text = message * times
    return text.upper() if loud else text


@dsl.pipeline(name="toy-pipeline", description="Repeats a message; for tests only.")
def toy_pipeline(message: str = "hi", times: int = 2, scale: float = 0.5, loud: bool = False,
                 tags: list = ["a"], options: dict = {"k": 1}):  # noqa: B006 -- KFP compiles defaults, never mutates
    repeat(message=message, times=times, scale=scale, loud=loud)


# A fan-out under a condition, for tests of what a local run prints (tests/test_local_output.py):
# runs as kfp.local SubprocessRunner tasks in this environment, hence no kfp install.
@dsl.component(base_image="python:3.11", install_kfp_package=False)
def make_shards(n: int) -> list:
    print(f"making {n} shards")
    return [f"{i}/{n}" for i in range(n)]


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def work(shard: str, fail: str, sleep: float) -> str:
    import atexit
    import os
    import sys
    import time

    print(f"process {os.getpid()} parent {os.getppid()} threads {os.environ.get('OMP_NUM_THREADS')}")
    atexit.register(print, f"exit hooks ran for shard {shard}")  # a program's atexit runs, warm or cold
    for i in range(30):
        print(f"line {i} of shard {shard}")
    sys.stdout.flush()
    time.sleep(sleep)
    if shard == fail:
        print(f"shard {shard} fails on purpose", file=sys.stderr)
        sys.exit(3)
    return shard


@dsl.pipeline(name="toy-fanout", description="A condition, then a ParallelFor over a task's output; for tests.")
def fanout_pipeline(n: int = 2, fail: str = "", branch: str = "a", sleep: float = 0.0):
    shards = make_shards(n=n)
    with dsl.If(branch == "a"), dsl.ParallelFor(shards.output) as shard:
        work(shard=shard, fail=fail, sleep=sleep).set_retry(num_retries=1, backoff_duration="0s")
