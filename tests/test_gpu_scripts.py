"""The GPU machine's scripts (issue 41, items 6 and 7), on the CPU: scripts/gpu_check.sh --dry-run runs every step
of the GPU check at tiny size, writes its tables (and nothing large) under $OUT, and exits non-zero when a step
fails, naming it; scripts/gpu_bundle.sh's bundle, where one was built here, is what the GPU machine can install."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "gpu_check.sh"
BUNDLE = ROOT / ".gpu-bundle"


def _check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RAY_ADDRESS", "IMMUNIZE_RAY_SESSION", "GPU_CHECK_FAIL_STEP", "GPU_CHECK_WORK")}
    e.update({"OUT": str(tmp_path / "out"), "PY": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work"),
              "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env})
    return subprocess.run(["bash", str(CHECK), *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=3600)


def _failed_steps(stdout: str) -> str:
    """The output of every step that did not exit 0 (the run's tail shows only the summary)."""
    import re

    parts = re.split(r"(?m)^(?==== [\w-]+ \(limit)", stdout)
    return "".join(p[-3000:] for p in parts if p.startswith("===") and not re.search(r"(?m)^=== [\w-]+: exit 0", p))


def _out_files(tmp_path: Path) -> dict[str, int]:
    return {str(p.relative_to(tmp_path / "out")): p.stat().st_size
            for p in (tmp_path / "out").rglob("*") if p.is_file()}


@pytest.mark.e2e
def test_dry_run_runs_every_step_and_writes_small_tables(tmp_path):
    res = _check(tmp_path, "--dry-run")
    assert res.returncode == 0, _failed_steps(res.stdout) + res.stdout[-4000:] + res.stderr[-2000:]
    files = _out_files(tmp_path)
    assert {"summary.md", "summary.json", "gpu_check.log", "scale_dry.md", "scale_dry.json"} <= set(files), files
    assert len(files) <= 8 and sum(files.values()) < 5 * 2**20, files  # what the device tool brings back
    assert not (tmp_path / "work").exists(), "the work folder (pipelines, releases) is removed"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"install": "skipped", **{s: "ok" for s in (
        "env", "world", "plan", "imma-kill", "imma-resume", "freezeasguard", "attack", "evaluate", "zero3-gc",
        "erase", "scale")}}, status
    assert summary["failed"] == []
    jobs = {j["job"]: j for j in summary["jobs"]}
    assert set(jobs) == {"imma", "freezeasguard", "zero3-gc", "erase"}
    for j in jobs.values():  # the plan beside a measured peak, for every harden job
        assert j["plan_peak"] > 0 and j["measured"]["measured"] > 0, j
        assert j["verdict"].startswith(("plan covers", "plan UNDER")), j
    assert jobs["imma"]["manifest"]["resumed_from"], "the killed run was resumed, not started over"
    assert "--zero-stage 3" in jobs["zero3-gc"]["flags"] and "--gradient-checkpointing" in jobs["zero3-gc"]["flags"]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md.startswith("# GPU check: PASSED") and "| imma-resume | ok |" in md and "| job | flags | plan: peak" in md


def test_a_failing_step_fails_the_check_and_is_named(tmp_path):
    # plan gets a bad flag (a real command failing); attack fails on its own: the IMMA release it needs is missing
    res = _check(tmp_path, "--dry-run", "--only", "env,plan,attack", GPU_CHECK_FAIL_STEP="plan")
    assert res.returncode != 0, res.stdout[-3000:]
    assert "No such option" in res.stdout or "no such option" in res.stdout.lower(), res.stdout[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status["env"] == "ok" and status["plan"].startswith("FAILED") and status["attack"].startswith("FAILED")
    assert "freezeasguard" not in status  # --only
    assert summary["failed"] == ["plan", "attack"]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md.startswith("# GPU check: FAILED (plan, attack)") and "| plan | FAILED (exit 2) |" in md
    assert "gpu_check.log" in _out_files(tmp_path)


def test_bad_invocations_are_refused(tmp_path):
    assert _check(tmp_path, "--dry-run", "--only", "nosuchstep").returncode == 2
    assert _check(tmp_path, "--frobnicate").returncode == 2
    inside = _check(tmp_path, "--dry-run", GPU_CHECK_WORK=str(tmp_path / "out" / "work"))
    assert inside.returncode == 2 and "must not be inside OUT" in inside.stderr
    for script in ("gpu_check.sh", "gpu_bundle.sh"):
        res = subprocess.run(["bash", str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and script in res.stdout


@pytest.mark.skipif(not BUNDLE.is_dir(), reason="no .gpu-bundle here (scripts/gpu_bundle.sh builds it)")
def test_built_bundle_fits_and_its_ray_wheel_is_consistent():
    wheels = sorted(BUNDLE.glob("*.whl"))
    names = {w.name.split("-")[0].lower() for w in wheels}
    assert {"ray", "deepspeed", "diffusers", "optuna", "pydantic", "pydantic_core"} <= names, names
    assert not names & {"torch", "transformers", "peft", "safetensors", "typer", "rich", "pyarrow"}, names
    assert all(("cp312" in w.name or "none-any" in w.name or "abi3" in w.name) for w in wheels), wheels
    assert sum(w.stat().st_size for w in wheels) <= 52 * 2**20  # beside the ~12 MiB working tree: under 64 MiB
    ray = next(w for w in wheels if w.name.startswith("ray-"))
    with zipfile.ZipFile(ray) as z:
        members = set(z.namelist())
        assert not any(m.startswith(("ray/jars/", "ray/dashboard/client/")) for m in members)
        record = next(m for m in members if m.count("/") == 1 and m.endswith(".dist-info/RECORD"))
        rows = [r.split(",") for r in z.read(record).decode().splitlines() if r]
        assert {r[0] for r in rows} == {m for m in members if not m.endswith("/")}
        for name, digest, size in rows:
            if name == record or not name.startswith(("ray/_raylet", "ray/core/src/ray/gcs/gcs_server")):
                continue
            data = z.read(name)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert int(size) == len(data)
    assert "--no-index --no-deps" in (BUNDLE / "INSTALL.txt").read_text()
