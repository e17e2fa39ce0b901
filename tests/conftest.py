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


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One small local Ray for the whole test session (logical CPUs may exceed the 2 cores)."""
    import tempfile

    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX paths must stay short
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR", _temp_dir=tmp,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
                                       "PYTHONWARNINGS": "ignore"}})
    yield
    ray.shutdown()
