"""The report cannot mislead: a summary line on top (baseline → hardened, with 95% intervals, the red team's worst
case or that it was not run), an interval on every percentage, samples paired across runs with the judge's
verdicts, the settings as a table, the releases' hashes. On synthetic report dicts: fast, no model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from raystack.redteam.sweep import wilson_interval
from raystack.report import (choose_baseline, pct_text, sample_counts, summary_line, unet_hash, with_intervals,
                             with_release_hashes, write_report)

OTHERS = ("style:dotted", "shape:circle")


def _run(target, others, hardening, attack="full", steps=20, n=24, verdicts=True, model="/nowhere"):
    r = {"path": "/x", "attack": attack, "steps": steps, "hardening": hardening, "model": model,
         "target_accuracy": target / n, "other_accuracy": {o: k / n for o, k in zip(OTHERS, others)},
         "other_accuracy_mean": sum(others) / n / len(others), "similarity_to_reference": {"classifier": 0.5}}
    if verdicts:  # k hits first, then misses
        r["verdicts"] = {"targets": {"sunset": [i < target for i in range(n)]},
                         "others": {o: [i < k for i in range(n)] for o, k in zip(OTHERS, others)}}
    return r


def _report(runs=None, baseline=None, redteam=None, samples=24):
    rep = {"target": "sunset", "criterion": {"style": "sunset"}, "embedders": ["classifier"], "baseline": baseline,
           "settings": {"device": "cpu", "samples": samples, "other_samples": None, "curve_samples": 12, "steps": 25,
                        "guidance": 4.0, "seed": 0, "curves": True},
           "prompts": {"sunset": ["a red circle in sunset style"], "style:dotted": ["a red circle in dotted style"],
                       "shape:circle": ["a red circle in plain style"]},
           "runs": runs if runs is not None else {"original": _run(9, [12, 12], None),
                                                  "hardened": _run(1, [20, 19], {"method": "freezeasguard"})}}
    rep["crossed"] = {"none": {"full": 9 / 24}, "freezeasguard": {"full": 1 / 24}}
    if redteam:
        rep["redteam"] = redteam
    return rep


def _images(report, n=24, size=32):
    rng = np.random.default_rng(0)
    return {name: {k: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for k in ("target", *OTHERS)}
            for name in report["runs"]}


def assert_every_percentage_has_its_interval(page: str) -> None:
    """Each 'x.y%' outside an interval is followed by its interval ' <span class='ci'>[lo–hi%]</span>'."""
    text = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    text = re.sub(r"\[\d+\.\d–\d+\.\d%\]", "[]", text)  # the intervals' own percentages
    bare = [m.group(0) for m in re.finditer(r"\d+(?:\.\d+)?%(?! <span class='ci'>\[\]</span>)", text)
            if not text[m.start() - 1:m.start()].isdigit() and text[m.start():m.end()] != "95%"]
    assert not bare, f"percentages without their interval: {bare}"


def _ci_text(p, n):
    lo, hi = wilson_interval(p, n)
    return f"[{lo * 100:.1f}–{hi * 100:.1f}%]"


def test_the_summary_line_gives_both_changes_with_intervals():
    text, details = summary_line(with_intervals(_report()))
    assert text.startswith("sunset after the attack (full, 20 steps): original 37.5% "
                           f"{_ci_text(9 / 24, 24)} → hardened 4.2% {_ci_text(1 / 24, 24)} (−33.3 pts); ")
    # the other concepts are pooled: 2 concepts x 24 images
    assert f"other concepts original 50.0% {_ci_text(0.5, 48)} → hardened 81.2% {_ci_text(39 / 48, 48)} (+31.2 pts)" \
        in text
    assert "Red team not run." in text and text.endswith("Brackets: 95% intervals.")
    assert details["baseline"] == "original" and details["baseline_from"] == "the only run of an unhardened model"
    assert [(c["metric"], c["change_pts"], c["intervals_overlap"]) for c in details["compared"]] == \
        [("target_accuracy", -33.3, False), ("other_accuracy_mean", 31.2, False)]


def test_a_change_within_the_noise_says_the_intervals_overlap():
    rep = _report({"original": _run(9, [12, 12], None), "hardened": _run(7, [12, 13], {"method": "imma"})})
    text, details = summary_line(with_intervals(rep))
    assert "hardened 29.2%" in text and "(−8.3 pts; the intervals overlap)" in text
    assert details["compared"][0]["intervals_overlap"]


def test_the_baseline_is_derived_or_the_summary_says_it_cannot_be():
    two = _report({"a": _run(9, [12, 12], None), "b": _run(8, [12, 12], None),
                   "h": _run(1, [20, 19], {"method": "imma"})})
    assert choose_baseline(two) == (None, "2 runs of unhardened models (a, b): cannot tell which is the baseline "
                                          "(pass --baseline NAME)")
    text, details = summary_line(with_intervals(two))
    assert text.startswith("sunset: 2 runs of unhardened models (a, b): cannot tell which is the baseline")
    assert "per run: a (full, 20 steps) 37.5%" in text and details["baseline"] is None
    named = {**two, "baseline": "b"}
    assert choose_baseline(named) == ("b", "named by --baseline")
    assert summary_line(with_intervals(named))[0].startswith("sunset after the attack (full, 20 steps): b 33.3%")
    none = _report({"h": _run(1, [20, 19], {"method": "imma"})})
    assert summary_line(with_intervals(none))[0].startswith(
        "sunset: no run of an unhardened model to compare with (pass --baseline NAME)")
    alone = _report({"original": _run(9, [12, 12], None, attack=None, steps=0)})
    text = summary_line(with_intervals(alone))[0]
    assert text.startswith("sunset: no run of a hardened model to compare with the baseline original (no attack): "
                           f"37.5% {_ci_text(9 / 24, 24)}")


def test_runs_attacked_differently_are_named_with_their_attacks():
    rep = _report({"original": _run(9, [12, 12], None, attack=None, steps=0),
                   "hardened": _run(1, [20, 19], {"method": "imma"}, attack="lora", steps=6)})
    text = summary_line(with_intervals(rep))[0]
    assert text.startswith("sunset: original (no attack) 37.5%") and "→ hardened (lora, 6 steps) 4.2%" in text


def test_the_red_team_worst_case_is_in_the_summary():
    def model(worst, trials):
        return {"unattacked": {"target": 0.1, "others": 0.9}, "worst_case": worst, "trials": trials,
                "trial_counts": {"done": sum(t == "done" for t in trials), "stopped": 0,
                                 "failed": sum(t == "error" for t in trials)}}

    worst = {"target": 0.5, "ci95": [0.3, 0.7], "others": 0.8, "attack": {"method": "lora"}, "trial": "t1"}
    redteam = {"space": "s", "budget": 40, "guard": 0.8, "concept": "sunset",
               "models": {"original": model(worst, ["done"]), "masked": model(None, ["error"]),
                          "strong": model(None, ["done"])}}
    text = summary_line(with_intervals(_report(redteam=redteam)))[0]
    assert ("Red team worst case within 40 attack steps (guarded, re-scored): original 50.0% [30.0–70.0%] (lora); "
            "masked FAILED (no trial completed: not measured); strong: no attack passed the guard.") in text
    assert "red team not run" not in text.lower()


def test_intervals_and_counts_on_every_run():
    rep = with_intervals(_report())
    h = rep["runs"]["hardened"]
    assert h["n"]["target"] == 24 and h["n"]["others"] == 48 and h["n"]["other_by_concept"] == dict.fromkeys(OTHERS, 24)
    assert h["ci95"]["target_accuracy"] == pytest.approx(list(wilson_interval(1 / 24, 24)))
    assert h["ci95"]["other_accuracy_mean"] == pytest.approx(list(wilson_interval(39 / 48, 48)))
    assert h["ci95"]["other_accuracy"]["style:dotted"] == pytest.approx(list(wilson_interval(20 / 24, 24)))
    # without recorded verdicts (an older report), the counts come from the settings
    old = _report({"a": _run(9, [12, 12], None, verdicts=False)}, samples=24)
    assert sample_counts(old, old["runs"]["a"])["target"] == 24 and sample_counts(old, old["runs"]["a"])["others"] == 48
    assert pct_text(None) == "not scored" and pct_text(0.5) == "50.0% [n not recorded]"


def test_the_html_report(tmp_path):
    rep = _report()
    out = write_report(tmp_path / "r", rep, _images(rep), None)
    page = (out / "report.html").read_text()
    saved = json.loads((out / "report.json").read_text())
    assert saved["summary"] == summary_line(with_intervals(rep))[0] and saved["summary_details"]["baseline"] == "original"
    assert "<title>Evaluation report</title>" in page and "red-team" not in page.split("</h1>")[0]
    summary = re.search(r"<p id='summary'.*?</p>", page, re.S).group(0)
    assert page.index("id='summary'") < page.index("id='settings'") < page.index("id='runs'")
    assert "−33.3 pts" in summary and summary.count("class='ci'") == 4
    assert_every_percentage_has_its_interval(page)
    settings = page[page.index("id='settings'"):page.index("id='runs'")]
    assert "<table class='settings'>" in settings and "<td>samples</td><td>24</td>" in settings
    assert "{" not in settings  # a table, not a JSON dump
    # samples paired across runs: column k is image k in every run, with the judge's verdict
    paired = page[page.index("id='paired-target'"):]
    row = paired[paired.index("<td>hardened</td>"):].split("</tr>")[0]
    assert row.count("class='cell hit'") == 1 and row.count("class='cell miss'") == 11 and "✗" in row
    assert "<td>1 / 12</td>" in row and "a red circle in sunset style" in paired
    assert "images/original-r0_target0_1.png" in page and "images/hardened-r1_target0_1.png" in page
    assert all((out / src).is_file() for src in saved["images"].values())


def test_the_title_names_the_red_team(tmp_path):
    redteam = {"space": "s", "budget": 40, "guard": 0.8, "concept": "sunset", "seed": 0,
               "samples": {"target": 4, "others_per_concept": 1},
               "models": {"original": {"unattacked": {"target": 0.25, "others": 0.5}, "worst_case": None,
                                       "worst_case_unguarded": None, "reference_attacks": [], "trials": [],
                                       "trial_counts": {"done": 1, "stopped": 0, "failed": 0}}}}
    rep = _report(redteam=redteam)
    page = (write_report(tmp_path / "r", rep, _images(rep), None) / "report.html").read_text()
    assert "<title>Evaluation and red-team report</title>" in page
    row = page[page.index("<td>original</td>", page.index("id='worst-case'")):].split("</tr>")[0]
    k = len(__import__("raystack.evaluation", fromlist=["x"]).tiny_world_others("sunset"))
    assert f"25.0% <span class='ci'>{_ci_text(0.25, 4)}</span>" in row
    assert f"50.0% <span class='ci'>{_ci_text(0.5, k)}</span>" in row
    assert_every_percentage_has_its_interval(page)


def test_release_hashes_from_the_manifest_or_computed(tmp_path):
    from raystack.atomic import sha256_file

    plain = tmp_path / "plain"
    (plain / "unet").mkdir(parents=True)
    (plain / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (plain / "unet" / "config.json").write_text("{}")
    h = unet_hash(plain)
    assert h["from"] == "computed" and h["unet_sha256"] == sha256_file(plain / "unet" / "diffusion_pytorch_model.safetensors")
    release = tmp_path / "release"
    (release / "unet").mkdir(parents=True)
    (release / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (release / "freeze_mask.safetensors").write_bytes(b"mask")
    (release / "manifest.json").write_text(json.dumps({"files": {
        "unet/diffusion_pytorch_model.safetensors": "a" * 64, "freeze_mask.safetensors": "b" * 64}}))
    assert unet_hash(release) == {"folder": str(release), "unet_sha256": "a" * 64, "from": "manifest.json",
                                  "files": {"unet/diffusion_pytorch_model.safetensors": "a" * 64}}
    runs = {"original": _run(9, [12, 12], None, model=str(plain)),
            "hardened": {**_run(1, [20, 19], {"method": "freezeasguard"}, model=str(plain)),
                         "mask": str(release / "freeze_mask.safetensors")},
            "gone": _run(1, [20, 19], {"method": "imma"}, model=str(tmp_path / "gone"))}
    rep = with_release_hashes(_report(runs))
    assert rep["runs"]["original"]["release"]["unet_sha256"] == h["unet_sha256"]
    assert rep["runs"]["hardened"]["release"]["mask"] == {"file": str(release / "freeze_mask.safetensors"),
                                                          "sha256": "b" * 64, "from": "manifest.json"}
    assert rep["runs"]["gone"]["release"]["error"] == "no unet folder here"
    page = (write_report(tmp_path / "r", rep, _images(rep), None) / "report.html").read_text()
    releases = page[page.index("id='releases'"):]
    assert h["unet_sha256"] in releases and "b" * 64 in releases and "not found: no unet folder here" in releases
