"""No lost work, no half-written model: SIGKILLed drivers resume to the same weights, a worker that dies is
restarted from the last checkpoint, and a run killed while saving leaves the previous --out intact."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from raystack.hardening.driver import run_dir_for, run_harden
from raystack.hardening.spec import HardenSpec
from raystack.tinyworld.folder import write_concept_folder

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
CLI = [str(Path(sys.executable).parent / "immunize-cli")]
ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault")
    write_concept_folder(root / "target", ["circle", "square"], ["red", "blue"], ["sunset"], 2, 1, None, False)
    return root


def _flags(data, out, *extra):
    return ["harden", "--method", "imma", "--against", "lora", "--target", str(data / "target"), "--out", str(out),
            "--workers", "1", "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--batch-size", "2",
            "--seed", "3", *extra]


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore", **extra}


def _unet(out: Path) -> dict:
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _checkpoints(out: Path) -> list[Path]:
    return sorted((run_dir_for(HardenSpec(method="random-freeze", out=out)) / "harden").glob("checkpoint_*"))


def _tree_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkilled_driver_resumes_to_the_same_weights(data, tmp_path):
    ref = tmp_path / "reference"
    res = subprocess.run(CLI + _flags(data, ref), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(CLI + _flags(data, out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not _checkpoints(out) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert _checkpoints(out), "no checkpoint within 10 minutes"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its embedded Ray and the workers: a lost machine
        proc.wait(timeout=60)
    assert not out.exists(), "a killed run must not leave a release behind"

    res = subprocess.run(CLI + _flags(data, out, "--resume"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _max_diff(_unet(ref), _unet(out)) <= 1e-6


def test_worker_killed_once_restarts_from_checkpoint_and_completes(data, tmp_path, ray_session):
    def spec(out, **kw):
        return HardenSpec(method="imma", against="lora", target=[data / "target"], out=out, workers=2, zero_stage=2,
                          steps=6, checkpoint_every=2, batch_size=2, seed=4, **kw)

    run_harden(spec(tmp_path / "uninterrupted"))
    marker = tmp_path / "fault-fired"
    manifest = run_harden(spec(tmp_path / "faulty", max_failures=1),
                          fault_injection={"rank": 1, "step": 5, "delay": 3, "marker": str(marker)})
    assert marker.exists(), "the fault was never injected"
    assert manifest["resumed_from"] == {"phase": "imma", "step": 4}
    # restarted from the step-4 checkpoint with Adam's state and every rank's RNG: the same as no failure
    assert _max_diff(_unet(tmp_path / "uninterrupted"), _unet(tmp_path / "faulty")) <= 1e-6


def test_worker_failure_without_retries_fails_cleanly(data, tmp_path, ray_session):
    out = tmp_path / "out"
    spec = HardenSpec(method="imma", against="lora", target=[data / "target"], out=out, workers=2, steps=4,
                      checkpoint_every=2, batch_size=2, max_failures=0)
    with pytest.raises(RuntimeError, match="Ray Train job failed"):
        run_harden(spec, fault_injection={"rank": 0, "step": 1, "marker": str(tmp_path / "fired")})
    assert not out.exists()


def test_kill_while_saving_keeps_previous_output(data, tmp_path):
    out = tmp_path / "release"
    res = subprocess.run(CLI + ["harden", "--method", "random-freeze", "--rho", "0.2", "--out", str(out),
                                "--workers", "1"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    before = _tree_hashes(out)
    marker = tmp_path / "saving"
    proc = subprocess.Popen(CLI + ["harden", "--method", "random-freeze", "--rho", "0.6", "--seed", "9", "--out",
                                   str(out), "--workers", "1", "--overwrite"], cwd=ROOT,
                            env=_env(IMMUNIZE_FAULT_SAVE_PAUSE="60", IMMUNIZE_FAULT_SAVE_MARKER=str(marker)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), "the run never reached its save"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert _tree_hashes(out) == before
    res = subprocess.run(CLI + ["verify", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_cut_checkpoint_list_is_dropped_and_only_a_cut_one(tmp_path):
    from raystack.hardening.driver import RAY_SNAPSHOT, drop_cut_snapshot

    (tmp_path / RAY_SNAPSHOT).write_text('{"checkpoints": [')  # a kill between Ray's truncate and its write
    assert drop_cut_snapshot(tmp_path) and not (tmp_path / RAY_SNAPSHOT).exists()
    (tmp_path / RAY_SNAPSHOT).write_text('{"checkpoints": []}')
    assert not drop_cut_snapshot(tmp_path) and (tmp_path / RAY_SNAPSHOT).exists()
    assert not drop_cut_snapshot(tmp_path / "missing")


@pytest.mark.e2e
def test_resume_after_a_kill_that_cut_rays_checkpoint_list(data, tmp_path):
    """Ray Train rewrites checkpoint_manager_snapshot.json in place; a kill in between leaves it empty. `--resume`
    then still ends with the uninterrupted run's weights (it starts over) instead of failing."""
    from raystack.hardening.driver import RAY_SNAPSHOT

    ref = tmp_path / "reference"
    res = subprocess.run(CLI + _flags(data, ref), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "cut"
    res = subprocess.run(CLI + _flags(data, out, "--keep-run"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    snap = run_dir_for(HardenSpec(method="random-freeze", out=out)) / "harden" / RAY_SNAPSHOT
    assert snap.is_file()
    snap.write_text("")  # as a SIGKILL between Ray's truncate and its write leaves it
    import shutil

    shutil.rmtree(out)
    res = subprocess.run(CLI + _flags(data, out, "--resume"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _max_diff(_unet(ref), _unet(out)) <= 1e-6


@pytest.mark.e2e
def test_resume_after_a_kill_between_the_final_checkpoint_and_the_release(data, tmp_path):
    """A kill after the workers' final report and before `--out` is written leaves a run whose last checkpoint is
    the result itself (no training state in it). `--resume` makes the release from it instead of failing."""
    import shutil

    out = tmp_path / "late"
    res = subprocess.run(CLI + _flags(data, out, "--keep-run"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    first = _unet(out)
    shutil.rmtree(out)  # as if the driver died before assembling it: the run folder holds the final checkpoint
    res = subprocess.run(CLI + _flags(data, out, "--resume"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _max_diff(first, _unet(out)) == 0.0
