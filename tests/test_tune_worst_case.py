"""`tune` scored by a small worst case: attacks drawn from an attack space, the strongest counts, and a utility
guard that skips attacking a setting that already ruined the model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raystack.errors import UserError
from raystack.redteam.space import draw_attacks, load_attack_space
from raystack.specs import build_spec
from raystack.tuning.space import TuneSpace
from raystack.search import passes_guard
from raystack.tuning.sweep import trial_mitigation

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "immunize-cli")


def test_draws_are_seeded_within_the_space_and_its_budget():
    space = load_attack_space(ROOT / "attack_spaces" / "default.yaml")
    a, b, c = draw_attacks(space, 6, 0), draw_attacks(space, 6, 0), draw_attacks(space, 6, 1)
    assert a == b and a != c
    for d in a + c:
        assert d["method"] in space.search["method"]["choice"] and d["steps"] <= space.budget
        assert 1e-4 <= d["lr"] <= 1e-2 and d["checkpoint_every"] == 100


def test_worst_case_mitigation_and_the_utility_guard():
    assert trial_mitigation([0.1, 0.6, 0.2], "worst") == 0.6
    assert trial_mitigation([0.1, 0.6, 0.2], "mean") == pytest.approx(0.3)
    assert not passes_guard(0.3, 0.8, 0.5) and passes_guard(0.5, 0.8, 0.5) and passes_guard(0.0, 0.8, 0.0)


@pytest.mark.parametrize("change, message", [
    ({"mitigation": "median"}, "expected mean or worst"),
    ({"attacker_draws": 2}, "needs attacker_space"),
    ({"attacker_space": "nowhere.yaml", "attacker_draws": 1}, "no such file"),
    ({"utility_guard": 1.5}, "within [0, 1]"),
])
def test_worst_case_settings_are_checked(change, message):
    base = yaml.safe_load((ROOT / "tune_spaces" / "tiny_rho_4.yaml").read_text())
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        build_spec(TuneSpace, {**base, **change}, source="t")


@pytest.mark.e2e
@pytest.mark.ray
def test_a_trial_is_scored_by_its_strongest_attack(tmp_path):
    space = yaml.safe_load((ROOT / "tune_spaces" / "tiny_rho_4.yaml").read_text())
    space.update({"name": "worst-1", "search": {"rho": {"grid": [0.3]}}, "mitigation": "worst",
                  "attacker_space": str(ROOT / "attack_spaces" / "tiny_4.yaml"), "attacker_draws": 2,
                  "utility_guard": 0.05})
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    res = subprocess.run([CLI, "tune", "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    (trial,) = json.loads((tmp_path / "o" / "results.json").read_text())["trials"]
    assert trial["status"] == "done" and not trial["ruined"]
    assert len(trial["attack_accuracies"]) == 3  # the space's attack and the two drawn ones
    assert trial["mitigation"] == max(trial["attack_accuracies"])
