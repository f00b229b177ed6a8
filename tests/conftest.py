"""Shared fixtures: no network, tiny models built once per session, one demo dataset and few-shot set."""

from __future__ import annotations

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
