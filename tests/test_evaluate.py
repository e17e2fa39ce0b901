"""attack -> evaluate -> report, end to end, and the report opened in a real headless browser."""

import json
import re

import pytest
from typer.testing import CliRunner

from cli.main import app
from browser_check import check_images, find_chromium

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_attacks(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    runner = CliRunner()
    assert runner.invoke(app, ["world", "generate", "--out", str(root / "zig"), "--style", "sunset", "--n", "1",
                               "--seed", "11"]).exit_code == 0
    for name, lr in (("weak", "1e-5"), ("strong", "3e-3")):
        res = runner.invoke(app, ["attack", "--method", "lora", "--data", str(root / "zig"), "--out", str(root / name),
                                  "--steps", "6", "--checkpoint-every", "3", "--lr", lr])
        assert res.exit_code == 0, res.output
    return root


def test_evaluate_writes_report_with_grids_and_curves(two_attacks, tmp_path):
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["evaluate", "--run", f"weak={two_attacks / 'weak'}",
                                   "--run", f"strong={two_attacks / 'strong'}", "--baseline", "strong",
                                   "--target", "sunset", "--samples", "8", "--curve-samples", "4", "--steps", "8",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["runs"]) == {"weak", "strong"}
    for r in report["runs"].values():
        assert 0.0 <= r["target_accuracy"] <= 1.0
        assert [c["step"] for c in r["curve"]] == [3, 6]
    gap = report["gaps"]["weak"]["classifier"]
    assert gap["SGR"] == pytest.approx(
        1 - report["runs"]["weak"]["similarity_to_reference"]["classifier"]
        / report["runs"]["strong"]["similarity_to_reference"]["classifier"])
    # one attacked model (the original), two lora runs of it: each keeps its own cell
    assert report["crossed"] == {"none": {"lora": report["runs"]["weak"]["target_accuracy"],
                                          "lora (strong)": report["runs"]["strong"]["target_accuracy"]}}
    images = report["images"]
    assert {"reference.png", "weak-r0_target0_1.png", "strong-r1_target0_1.png", "curves.png"} <= set(images)
    html = (out / "report.html").read_text()
    assert all(src in html for src in images.values())
    # the summary on top: both runs attack the unhardened model; --baseline names one, none is hardened
    assert report["summary"].startswith("sunset: no run of a hardened model to compare with the baseline strong "
                                        "(lora, 6 steps): ")
    assert report["summary"].endswith("Red team not run. Brackets: 95% intervals.")
    assert html.index("id='summary'") < html.index("id='settings'") and "<title>Evaluation report</title>" in html
    from raystack.atomic import sha256_file
    from raystack.models.pipeline_io import default_model_path
    from raystack.redteam.sweep import wilson_interval

    unet = sha256_file(next((default_model_path() / "unet").glob("*.safetensors")))
    for r in report["runs"].values():  # every accuracy with its image count and 95% interval; the judge's verdicts
        assert r["n"]["target"] == 8 and len(r["verdicts"]["targets"]["sunset"]) == 8
        assert r["target_accuracy"] == pytest.approx(sum(r["verdicts"]["targets"]["sunset"]) / 8)
        assert r["ci95"]["target_accuracy"] == pytest.approx(list(wilson_interval(r["target_accuracy"], 8)))
        assert all(c["n"] == 4 and c["ci95"] for c in r["curve"])
        assert r["release"]["unet_sha256"] == unet and r["release"]["from"] == "computed"
    assert unet in html


def test_several_targets_are_scored_one_by_one(tmp_path, tiny_model_path):
    """A multi-concept hardening is judged per concept: the original model draws the trained styles dotted and
    striped (≥ 60% each) and not the held-out sunset; the mean and the worst (max) follow from the three."""
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["evaluate", "--run", f"original={tiny_model_path}", "--target", "dotted",
                                   "--target", "striped", "--target", "sunset", "--samples", "12", "--steps", "15",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output + res.stderr
    report = json.loads((out / "report.json").read_text())
    assert list(report["targets"]) == ["dotted", "striped", "sunset"] and report["target"] == "dotted + striped + sunset"
    r = report["runs"]["original"]
    per = r["target_accuracy_by_concept"]
    assert per["dotted"] >= 0.6 and per["striped"] >= 0.6 and per["sunset"] <= 0.2, per
    assert r["target_accuracy"] == pytest.approx(sum(per.values()) / 3)
    assert r["target_accuracy_max"] == max(per.values())
    assert not any(k in ("style:dotted", "style:striped") for k in r["other_accuracy"])  # targets are not "others"
    assert "Target accuracy per protected concept" in (out / "report.html").read_text()


def test_report_images_load_in_headless_chromium(two_attacks, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["evaluate", "--run", f"a={two_attacks / 'weak'}", "--target", "sunset",
                                   "--samples", "4", "--curve-samples", "2", "--steps", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    seen = check_images(out / "report.html", chromium)
    assert seen["total"] >= 4 and seen["bad"] == []
    # what a reader sees first: the title, the summary line with its intervals, every percentage's interval
    assert seen["title"] == "Evaluation report: target sunset"
    assert seen["summary"].startswith("Summary. sunset: no run of a hardened model to compare with the baseline a "
                                      "(lora, 6 steps): ")
    assert "Red team not run." in seen["summary"]
    assert seen["summary_intervals"] and all(re.fullmatch(r"\[\d+\.\d–\d+\.\d%\]", c)
                                             for c in seen["summary_intervals"])
    assert seen["intervals"] >= 4 and seen["hidden_intervals"] == 0
    others = json.loads((out / "report.json").read_text())["runs"]["a"]["other_accuracy"]
    assert len(seen["marks"]) == 4 + 4 * len(others) and set(seen["marks"]) <= {"✓", "✗"}  # 4 per concept
    (out / "images" / "curves.png").write_bytes(b"not a png")  # and the check can fail
    assert check_images(out / "report.html", chromium)["bad"] == ["images/curves.png"]


def test_evaluate_bad_input(tmp_path, two_attacks):
    runner = CliRunner()
    cases = [
        (["--run", "x"], "expected NAME=FOLDER"),
        (["--run", f"a={tmp_path / 'none'}"], "no such folder"),
        (["--run", f"a={tmp_path}"], "neither an attack output"),
        (["--run", f"a={two_attacks / 'weak'}", "--baseline", "b"], "not one of the --run names"),
        (["--run", f"a={two_attacks / 'weak'}", "--target", "blob"], "not a tiny-world concept"),
        (["--run", f"a={two_attacks / 'weak'}", "--target", "dotted", "--target", "dotted"], "dotted given twice"),
        (["--run", f"a={two_attacks / 'weak'}", "--target", "dotted", "--target", "striped", "--reference",
          str(two_attacks / "zig")], "--reference: one set of reference images fits one --target"),
    ]
    for args, msg in cases:
        full = ["evaluate", *args, "--out", str(tmp_path / "r")]
        if "--target" not in args:
            full += ["--target", "sunset"]
        res = runner.invoke(app, full)
        assert res.exit_code == 2 and msg in res.stderr and res.stderr.count("\n") == 1, (args, res.stderr)
        assert not (tmp_path / "r").exists()


def test_a_run_attacked_under_a_mask_reports_that_hardening(tmp_path, tiny_model_path):
    """The demo attacks the original model under the released mask: the report says FreezeAsGuard, not none."""
    import json as _json

    from raystack.evaluation import attacked_hardening
    from raystack.freeze_mask import save_freeze_mask

    save_freeze_mask(tmp_path / "loose" / "freeze_mask.safetensors", {"a": True, "b": False, "c": False, "d": False},
                     {"method": "freezeasguard", "rho": 0.25})
    info = {"base_model": str(tiny_model_path), "spec": {"freeze_mask": str(tmp_path / "loose" / "freeze_mask.safetensors")}}
    assert attacked_hardening(info) == {"method": "freezeasguard", "frozen_ratio": 0.25}
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "immunize_info.json").write_text(_json.dumps({"hardening": {"method": "random-freeze"}}))
    save_freeze_mask(tmp_path / "release" / "freeze_mask.safetensors", {"a": True}, {"method": "random-freeze"})
    info["spec"]["freeze_mask"] = str(tmp_path / "release" / "freeze_mask.safetensors")
    assert attacked_hardening(info) == {"method": "random-freeze"}
    assert attacked_hardening({"base_model": str(tiny_model_path), "spec": {"freeze_mask": None}}) is None


def test_the_tiny_world_classifier_refuses_other_models(tmp_path, tiny_model_path):
    """Scored by the 32-px classifier, a model of another resolution would show 0% everywhere: refused."""
    import json
    import shutil

    from typer.testing import CliRunner

    from cli.main import app

    from pathlib import Path

    big = tmp_path / "big"
    shutil.copytree(tiny_model_path, big)
    cfg = json.loads((big / "unet" / "config.json").read_text())
    cfg["sample_size"] *= 4
    (big / "unet" / "config.json").write_text(json.dumps(cfg))
    size = cfg["sample_size"] * 2
    for argv in (["evaluate", "--run", f"x={big}", "--target", "sunset", "--out", str(tmp_path / "r")],
                 ["redteam", "--space", str(Path(__file__).resolve().parents[1] / "attack_spaces" / "tiny_4.yaml"),
                  "--model", f"x={big}", "--data", str(tmp_path), "--target", "sunset", "--out", str(tmp_path / "t")]):
        res = CliRunner().invoke(app, argv)
        assert res.exit_code == 2 and f"makes {size}-px images" in res.stderr, res.stderr
        assert not (tmp_path / "r").exists() and not (tmp_path / "t").exists()
