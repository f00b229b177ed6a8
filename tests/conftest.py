"""Shared fixtures: no network, tiny models built once per session, one demo dataset and few-shot set."""

from __future__ import annotations

import logging
import os
import tempfile

# Before any Hugging Face import: nothing in the suite may reach a hub, and progress bars stay quiet.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TQDM_DISABLE"] = "1"
os.environ.setdefault("DATADREAM_CACHE", tempfile.mkdtemp(prefix="datadream-test-cache-"))

import pytest

from datadream.config import Config, load_config

# Real servers on loopback (moto S3, Postgres databases, mlflow server) and the autouse fixtures that
# give every test fake AWS credentials and its own MLflow store, so no test can reach a real one.
pytest_plugins = ["servers"]


@pytest.fixture(autouse=True)
def root_logging_filters_restored():
    """`datadream -q` filters the root logger and its handlers for the rest of its process, and every
    command points a handler at the stderr of its moment (a test's captured stream, closed after it);
    the suite runs many commands in one process, so each test starts with the filters as they were
    before it and without the handlers earlier commands added."""
    root = logging.getLogger()
    before = list(root.filters)
    handlers_before = {h: list(h.filters) for h in root.handlers}
    yield
    for f in [f for f in root.filters if f not in before]:
        root.removeFilter(f)
    for h in root.handlers:
        for f in [f for f in h.filters if f not in handlers_before.get(h, [])]:
            h.removeFilter(f)
    # logging.basicConfig's handler (pytest's own capture handlers are subclasses, and are its to remove)
    for h in [h for h in root.handlers if type(h) is logging.StreamHandler and h not in handlers_before]:
        root.removeHandler(h)


@pytest.fixture(scope="session")
def tiny():
    """Factory: the tiny preset plus overrides, e.g. tiny("adapt.mode=dataset")."""

    def make(*overrides: str) -> Config:
        return load_config("tiny", overrides=list(overrides))

    return make


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    from datadream.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "dataset", seed=0)


@pytest.fixture(scope="session")
def fewshot_set(tmp_path_factory, demo_dataset, tiny):
    from datadream.stages import fewshot

    return fewshot.run(tiny(), demo_dataset, tmp_path_factory.mktemp("fewshot") / "fs")
