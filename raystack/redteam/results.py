"""A finished red team read back: its redteam.json checked field by field (a hand-edited or foreign file is
refused), and the attack folders of its guarded worst cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError
from ..outputs import check_plain_name, shown

RESULTS = "redteam.json"


def check_redteam_report(report: dict) -> None:
    """Every field the report section reads, with its type and range (raises on a hand-edited or foreign file):
    rates (accuracies, the guard, intervals) within [0, 1], steps and counts non-negative integers."""
    def number(v, none_ok=False):
        if (v is None and none_ok) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            return
        raise ValueError(v)

    def rate(v, none_ok=False):
        number(v, none_ok)
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(v)

    def count(v, positive=False):
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if positive else 0):
            raise ValueError(v)

    def interval(ci):
        lo, hi = ci
        rate(lo)
        rate(hi)
        if lo > hi:
            raise ValueError(ci)

    for key in ("space", "concept"):
        if not isinstance(report[key], str):
            raise TypeError(key)
    count(report["budget"], positive=True)
    rate(report["guard"])
    if "seed" in report:
        count(report["seed"])
    if not isinstance(report["models"], dict):
        raise TypeError("models")
    if not isinstance(report.get("incomplete", []), list):
        raise TypeError("incomplete")
    for m in report["models"].values():
        rate(m["unattacked"]["target"], True)
        rate(m["unattacked"]["others"], True)
        for key in ("worst_case", "worst_case_sweep", "worst_case_unguarded"):
            w = m.get(key)
            if w is None:
                continue
            rate(w["target"])
            rate(w["others"], True)
            if not isinstance(w["attack"], dict) or not isinstance(w.get("attack_dir", ""), str):
                raise TypeError(key)
            if key == "worst_case":
                interval(w["ci95"])
            elif "ci95" in w:
                interval(w["ci95"])
        for key in ("rejected_by_guard", "trials", "budget_curve", "budget_curve_unguarded"):
            if not isinstance(m.get(key, []), list):
                raise TypeError(key)
        counts = m.get("trial_counts")
        if counts is not None:
            if not isinstance(counts, dict):
                raise TypeError("trial_counts")
            for v in counts.values():
                count(v)
        for t in m.get("trials", []):
            if not isinstance(t, dict) or not isinstance(t.get("status", ""), str):
                raise TypeError("trials")
            rate(t.get("target"), True)
            rate(t.get("others"), True)
            r = t.get("rescored")
            if r is not None:
                rate(r["target"])
                rate(r["others"], True)
        for c in m.get("budget_curve", []) + m.get("budget_curve_unguarded", []):
            count(c["steps"])
            rate(c["best_target"], True)
        for r in m.get("reference_attacks", []):
            rate(r["target"])
            rate(r["others"], True)
            count(r["steps"])
            if "ci95" in r:
                interval(r["ci95"])
            if not isinstance(r["attack"], dict):
                raise TypeError("reference_attacks")


def load_redteam(folder: Path, concept: str) -> tuple[dict, dict[str, Path]]:
    """A finished red-team run (`redteam --out`) of `concept`: its redteam.json, and the attack folders of the
    guarded worst cases as evaluate runs (`worst-<model>`), checked to lie inside the run folder."""

    folder = Path(folder)
    path = folder / RESULTS
    if not path.is_file():
        raise UserError(f"--redteam {shown(folder)}: no {RESULTS} (a finished `immunize-cli redteam --out`)")
    try:
        report = json.loads(path.read_text())
        check_redteam_report(report)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise UserError(f"--redteam {shown(path)}: not a red-team result") from None
    models = report["models"]
    if report["concept"] != concept:
        raise UserError(f"--target {shown(concept)}: the red team in --redteam attacked {shown(report['concept'])}")
    root = folder.resolve()
    runs: dict[str, Path] = {}
    for name, m in models.items():
        w = m.get("worst_case") if isinstance(m, dict) else None
        if not w or m.get("same_as") in models:  # the same attack as an earlier model's: shown once
            continue
        d = (root / str(w.get("attack_dir", ""))).resolve()
        if root not in d.parents or not (d / "attack.json").is_file():
            raise UserError(f"--redteam {shown(folder)}: the worst case of {shown(name)} has no attack output "
                            "inside the run folder")
        runs[check_plain_name(f"worst-{name}", "--redteam: the model name")] = d
    return report, runs
