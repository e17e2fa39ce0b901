"""`ray start --head` locally, then `ray job submit --working-dir . -- immunize-cli harden ... --cluster auto`."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_nodes import start_head, stop

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_ray_job_submit_runs_harden_on_a_started_cluster(tmp_path):
    from raystack.tinyworld.folder import write_concept_folder

    write_concept_folder(tmp_path / "target", ["circle"], ["red", "blue"], ["sunset"], 2, 1, None, False)
    # The session's own Ray (conftest) already holds Ray's default ports: a second node started with defaults
    # never gets a job agent ("No available agent"), so every port is given here.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    head, _, dash, _ = start_head(env, random.Random(os.getpid()), num_cpus=3)
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
        stop(head)
