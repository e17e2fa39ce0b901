"""`ray start --head` locally, then `ray job submit --working-dir . -- immunize-cli harden ... --cluster auto`."""

import json
import os
import random
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


PORT_NAMES = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
              "ray-client-server-port")
WORKER_PORTS = 200


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_block(rng: random.Random) -> int:
    """First of len(PORT_NAMES) + WORKER_PORTS free ports in a row, below Linux's ephemeral range (so no other
    process is handed one by the kernel meanwhile) and above the session Ray's worker ports (10002-19999)."""
    n = len(PORT_NAMES) + WORKER_PORTS
    while True:
        base = rng.randrange(20000, 32000 - n)
        if all(_bindable(p) for p in range(base, base + n)):
            return base


def _start_head(env: dict, rng: random.Random, attempts: int = 3):
    """`ray start --head` on its own ports; (process, dashboard port) once the dashboard answers. A head that
    exits (a port taken between the check and the bind) is started again on other ports."""
    for _ in range(attempts):
        base = _port_block(rng)
        ports = [f"--{name}={base + i}" for i, name in enumerate(PORT_NAMES)]
        low = base + len(PORT_NAMES)
        ports += [f"--min-worker-port={low}", f"--max-worker-port={low + WORKER_PORTS - 1}"]
        temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=3",
                                 "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--include-dashboard=true",
                                 *ports], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        dash = base + 1
        deadline = time.time() + 120
        while time.time() < deadline and head.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", dash), timeout=1).close()
                return head, dash
            except OSError:
                time.sleep(1)
        _stop(head)
    pytest.fail(f"ray start --head did not bring up a dashboard in {attempts} attempts")


def _stop(head) -> None:
    if head.poll() is None:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def test_ray_job_submit_runs_harden_on_a_started_cluster(tmp_path):
    from raystack.tinyworld.folder import write_concept_folder

    write_concept_folder(tmp_path / "target", ["circle"], ["red", "blue"], ["sunset"], 2, 1, None, False)
    # The session's own Ray (conftest) already holds Ray's default ports: a second node started with defaults
    # never gets a job agent ("No available agent"), so every port is given here.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    head, dash = _start_head(env, random.Random(os.getpid()))
    try:
        out = tmp_path / "hardened"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
               "--", "immunize-cli", "harden", "--method", "random-freeze", "--rho", "0.25",
               "--target", str(tmp_path / "target"), "--out", str(out), "--workers", "1", "--cluster", "auto"]
        for _ in range(12):  # the job agent may come up after the dashboard port does ("try again later")
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in res.stderr and "Connection refused" not in res.stderr:
                break
            time.sleep(5)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["method"] == "random-freeze" and abs(manifest["frozen_ratio"] - 0.25) <= 0.02
    finally:
        _stop(head)
