"""The IMMA research probes (research/imma/) still run against the product: each takes one step of everything
in a smoke run (IMMUNIZE_RESEARCH_SMOKE) and writes its row and table there, not into the committed results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "research" / "imma"

pytestmark = pytest.mark.e2e


def _run(tmp_path, *args):
    env = {**os.environ, "IMMUNIZE_RESEARCH_SMOKE": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_snapshot_probe_with_a_research_objective(tmp_path):
    """One IMMA step with the `erase` outer objective (through IMMARecipe.outer_objective), one snapshot."""
    committed = (HERE / "results" / "imma_snapshots.jsonl").read_bytes()
    _run(tmp_path, str(HERE / "imma_snapshots.py"), "smoke", "0", '{"outer_objective": "erase", "retain_target": "original", "eval_at": [0, 1]}')
    rows = _rows(tmp_path / "imma_snapshots.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and all(0 <= r["target_attacked"] <= 1 for r in rows)
    _run(tmp_path, str(HERE / "imma_snapshots.py"), "--table")
    assert "| smoke | 0 | 1 |" in (tmp_path / "imma_snapshots.md").read_text()
    assert (HERE / "results" / "imma_snapshots.jsonl").read_bytes() == committed


def test_relearn_probe(tmp_path):
    _run(tmp_path, str(HERE / "imma_relearn.py"), "0")
    assert [r["model"] for r in _rows(tmp_path / "imma_relearn.jsonl")] == ["original", "erased", "erased+imma"]
    _run(tmp_path, str(HERE / "imma_relearn.py"), "--table")
    assert "erased+imma" in (tmp_path / "imma_relearn.md").read_text()


def test_cli_probe(tmp_path):
    """Hardens through the real CLI (a Ray Train job) for one step, attacks and scores the release."""
    _run(tmp_path, str(HERE / "imma_probe.py"), "smoke", "3e-3")
    (row,) = _rows(tmp_path / "imma_probe.jsonl")
    assert row["name"] == "smoke" and (tmp_path / "imma-probe" / "smoke" / "manifest.json").is_file()
