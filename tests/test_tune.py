"""`tune` end to end: a 4-trial ρ sweep on the tiny world, killed after two trials and resumed, then
`harden --config best.yaml` reruns the best."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "immunize-cli")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}


def _finished_trials(out: Path) -> dict[str, str]:
    """result.json of every trial that made its final report, by trial folder."""
    rows = {}
    for f in (out / "tune" / "tiny-rho-4").glob("*/result.json"):
        text = f.read_text()
        if '"done_all": true' in text:
            rows[f.parent.name] = text
    return rows


def test_four_trial_rho_sweep_survives_a_crash_then_best_yaml_reproduces(tmp_path):
    out = tmp_path / "sweep"
    cmd = [CLI, "tune", "--space", str(ROOT / "tune_spaces" / "tiny_rho_4.yaml"), "--out", str(out), "--num-cpus", "4"]
    # a crash mid-sweep: the driver and its embedded Ray are killed once two trials have finished
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    t0 = time.time()
    while len(_finished_trials(out)) < 2 and first.poll() is None and time.time() - t0 < 1200:
        time.sleep(1)
    assert first.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = _finished_trials(out)
    assert len(before) == 2 and not (out / "results.json").exists()

    res = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    after = _finished_trials(out)
    assert len(after) == 4
    assert {k: after[k] for k in before} == before  # finished trials were kept, not run again
    results = json.loads((out / "results.json").read_text())
    trials = results["trials"]
    assert sorted(t["setting"]["rho"] for t in trials) == [0.1, 0.3, 0.5, 0.7]
    for t in trials:
        assert t["status"] == "done"
        assert 0.0 <= t["mitigation"] <= 1.0 and 0.0 <= t["utility"] <= 1.0
        assert t["objective"] == pytest.approx(t["utility"] - t["mitigation"])
        assert abs(t["frozen_ratio"] - t["setting"]["rho"]) <= 0.02
        assert f"rho={t['setting']['rho']}" in res.stdout  # the terminal table lists every trial
    assert results["best"]["objective"] == max(t["objective"] for t in trials)
    assert results["pareto"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["rho"] == results["best"]["setting"]["rho"] and best["method"] == "freezeasguard"
    rerun = tmp_path / "best"
    res = subprocess.run([CLI, "harden", "--config", str(out / "best.yaml"), "--out", str(rerun)], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    # same attack and score as the trials: the rerun's mitigation lies within the spread seen across trials
    from raystack.tuning.space import load_space
    from raystack.tuning.sweep import attacked_mitigation

    space = load_space(ROOT / "tune_spaces" / "tiny_rho_4.yaml")
    assert (rerun / "freeze_mask.safetensors").exists()
    mitigation = attacked_mitigation(space, rerun, out / "data" / "attacker", tmp_path / "attack")
    spread = max(t["mitigation"] for t in trials) - min(t["mitigation"] for t in trials)
    assert abs(mitigation - results["best"]["mitigation"]) <= max(spread, 0.15)
