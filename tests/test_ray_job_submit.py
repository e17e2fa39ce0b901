"""`ray start --head` locally, then `ray job submit --working-dir . -- immunize-cli harden ... --cluster auto`."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_harden_on_a_started_cluster(tmp_path):
    from raystack.tinyworld.folder import write_concept_folder

    write_concept_folder(tmp_path / "target", ["circle"], ["red", "blue"], ["sunset"], 2, 1, None, False)
    gcs, dash = _free_port(), _free_port()
    # The session's own Ray (conftest) already holds Ray's default agent/metrics ports: a second node
    # started with defaults never gets a job agent ("No available agent"), so every port is picked here.
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    low = _free_port()
    ports += [f"--min-worker-port={low}", f"--max-worker-port={low + 200}"]
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=3",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}",
                             "--include-dashboard=true", *ports], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", dash), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        out = tmp_path / "hardened"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
               "--", "immunize-cli", "harden", "--method", "random-freeze", "--rho", "0.25",
               "--target", str(tmp_path / "target"), "--out", str(out), "--workers", "1", "--cluster", "auto"]
        for _ in range(12):  # the job agent may come up after the dashboard port does ("try again later")
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in res.stderr:
                break
            time.sleep(5)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["method"] == "random-freeze" and abs(manifest["frozen_ratio"] - 0.25) <= 0.02
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
