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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3 (moto's server) on a loopback port, reached as AWS or MinIO would be: through AWS_ENDPOINT_URL
    and the standard credential variables. Yields the environment a command needs to reach it."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    server = Path(sys.executable).parent / "moto_server"  # this environment's moto (a shim on PATH may be another)
    if not server.exists():
        server = shutil.which("moto_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "server.log"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"moto_server did not start: {log.read_text()[-2000:]}")
    yield env
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """This process set up to reach the local S3, and a fresh bucket in it: (environment, bucket name)."""
    import uuid

    import boto3

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    return s3_server, bucket
