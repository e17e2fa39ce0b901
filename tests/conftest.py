"""Shared test setup: one torch thread, offline hubs, quiet libraries, the shipped tiny world."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("IMMUNIZE_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _threads():
    from cli.common import quiet_libraries
    from raystack.runtime import configure_threads

    quiet_libraries()
    configure_threads(1)


@pytest.fixture(scope="session")
def tiny_model_path():
    from raystack.models.pipeline_io import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_path):
    from raystack.models.pipeline_io import load_pipeline

    return load_pipeline(tiny_model_path)


@pytest.fixture(scope="session")
def judge():
    from raystack.tinyworld.classifier import Judge

    return Judge()
