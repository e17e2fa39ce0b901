"""Reliability III: a red team (or tune) whose trials crashed is a failure, never protection.

- masks are loaded against their model before any trial (a mismatched or pickled mask: one line, exit 2);
- failed trials are counted per model in the table, redteam.json and the report, and a model without a
  completed trial makes the command exit 1 naming it (never "none passed the guard");
- bad input around the red team (`--resume` records, tampered results, ':' in a model path) is one line.

Only the last test starts Ray (e2e)."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from raystack.models.pipeline_io import default_model_path
from raystack.tinyworld.folder import write_concept_folder

ROOT = Path(__file__).resolve().parents[1]
SPACE = str(ROOT / "attack_spaces" / "tiny_4.yaml")


def tree_hash(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def unet_names(model: Path) -> list[str]:
    from raystack.redteam.sweep import unet_parameter_names

    return unet_parameter_names(model, "test")


# --- the aggregation: counts, the exit decision, the table and the report --------------------------------------

def _trial(name, status, target=None, others=None, guarded=False, error=None):
    return {"trial": name, "attack": {"method": "lora", "lr": 0.001}, "status": status, "target": target,
            "others": others, "guarded": guarded, "curve": [], "error": error, "attack_dir": f"attacks/x/{name}"}


def _model(trials, worst=None, counts=True):
    from raystack.tuning.sweep import trial_counts

    m = {"model": "/m", "mask": None, "unattacked": {"target": 0.1, "others": 0.9}, "reference_attacks": [],
         "worst_case": worst, "worst_case_sweep": worst, "worst_case_unguarded": None, "rejected_by_guard": [],
         "budget_curve": [], "budget_curve_unguarded": [], "trials": trials}
    if counts:
        m["trial_counts"] = trial_counts(trials)
    return m


CRASH = "RayTaskError(UserError): --freeze-mask: every attention projection is frozen; LoRA has nothing to adapt"


def _report():
    worst = {"target": 0.5, "ci95": [0.3, 0.7], "others": 0.8, "attack": {"method": "lora", "lr": 0.001},
             "trial": "t1", "attack_dir": "attacks/x/t1", "source": "sweep"}
    return {"space": "s", "budget": 40, "guard": 0.8, "seed": 0, "concept": "sunset", "models": {
        "all_failed": _model([_trial("t1", "error", error=CRASH), _trial("t2", "error", error=CRASH)]),
        "some_failed": _model([_trial("t1", "done", 0.5, 0.8, True), _trial("t2", "error", error=CRASH),
                               _trial("t3", "stopped", 0.2)], worst),
        "fine": _model([_trial("t1", "done", 0.1, 0.9, False)], counts=False),  # an older run: counted from trials
    }}


def test_failed_trials_are_counted_and_a_model_without_a_completed_trial_fails_the_run():
    from raystack.redteam.sweep import failure_message, incomplete_models, model_trial_counts

    report = _report()
    assert model_trial_counts(report["models"]["all_failed"]) == {"done": 0, "stopped": 0, "failed": 2}
    assert model_trial_counts(report["models"]["some_failed"]) == {"done": 1, "stopped": 1, "failed": 1}
    assert model_trial_counts(report["models"]["fine"]) == {"done": 1, "stopped": 0, "failed": 0}
    assert incomplete_models(report) == ["all_failed"]
    msg = failure_message(report)
    assert "all_failed (2 failed" in msg and "some_failed" not in msg and "fine" not in msg
    assert "every attention projection is frozen" in msg and "guard" not in msg
    del report["models"]["all_failed"]
    assert failure_message(report) is None  # some failed, some completed: reported, not fatal


def test_the_table_shows_failed_counts_and_never_reads_a_crash_as_protection():
    from rich.console import Console

    from cli.redteam import worst_case_table

    console = Console(width=250, record=True)
    console.print(worst_case_table(_report()))
    text = console.export_text()
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 5}
    assert "2 FAILED" in rows["all_failed"] and "no completed trial" in rows["all_failed"]
    assert "1 FAILED" in rows["some_failed"] and "50.0%" in rows["some_failed"]  # the worst case of the completed
    assert "FAILED" not in rows["fine"]
    assert "passed the guard" not in text


def test_the_report_shows_failed_counts_prominently(tmp_path):
    from raystack.report import _redteam_section

    page = _redteam_section(_report(), lambda name, data: name, {})
    assert "FAILED: no trial completed (2 failed" in page
    assert "none passed the guard" not in page.split("fine")[0]  # not for the crashed model
    warning = page[page.index("class='failed'"):page.index("<table>")]  # above the table
    assert "all_failed: 2 of 2 trials FAILED" in warning and "some_failed: 1 of 3 trials FAILED" in warning
    assert "1 / 1 / 1 FAILED / 1" in page  # done / stopped / failed / passed the guard
    assert "fine" not in warning


def test_redteam_cli_exits_1_naming_the_model_without_a_completed_trial(tmp_path, monkeypatch):
    """The whole command with the sweep replaced by its result (no Ray): table, redteam.json, exit code."""
    import raystack.raysession
    import raystack.redteam.sweep as sweep

    def fake_run(space, targets, data, concept, out, *a, **k):
        report = _report()
        report["incomplete"] = sweep.incomplete_models(report)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "redteam.json").write_text(json.dumps(report))
        return report

    monkeypatch.setattr(sweep, "run_redteam", fake_run)
    monkeypatch.setattr(raystack.raysession, "init_ray", lambda *a: "none (test)")
    write_concept_folder(tmp_path / "atk", ["circle"], None, ["sunset"], 1, 0, None, False)
    out = tmp_path / "rt"
    res = CliRunner().invoke(app, ["redteam", "--space", SPACE, "--model", "a=tiny", "--data", str(tmp_path / "atk"),
                                   "--target", "sunset", "--out", str(out)], env={"COLUMNS": "250"})
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output + res.stderr
    assert "no trial completed for all_failed" in lines[0] and "Traceback" not in res.output
    assert "all_failed: 2 of 2 trials FAILED" in res.stdout and "some_failed: 1 of 3 trials FAILED" in res.stdout
    assert json.loads((out / "redteam.json").read_text())["incomplete"] == ["all_failed"]


def test_tune_counts_failed_trials_and_fails_without_a_completed_one(tmp_path):
    from raystack.errors import RunFailed
    from raystack.tuning.space import load_space
    from raystack.tuning.sweep import RESULTS, sweep_results

    space = load_space(ROOT / "tune_spaces" / "tiny_rho_4.yaml")
    row = lambda t, status, obj=None: {"trial": t, "setting": {"rho": 0.1}, "status": status,  # noqa: E731
                                       "error": CRASH if status == "error" else None, "mitigation": obj,
                                       "utility": obj, "objective": obj}
    results, done = sweep_results(space, [row("a", "error"), row("b", "done", 0.5), row("c", "stopped", 0.2)],
                                  tmp_path)
    assert results["trial_counts"] == {"done": 1, "stopped": 1, "failed": 1} and results["best"]["trial"] == "b"
    assert [r["trial"] for r in done] == ["b"]
    with pytest.raises(RunFailed, match=r"no trial of sweep tiny-rho-4 completed \(2 failed, 0 stopped") as e:
        sweep_results(space, [row("a", "error"), row("b", "error")], tmp_path)
    assert e.value.exit_code == 1 and "every attention projection" in str(e.value)
    written = json.loads((tmp_path / RESULTS).read_text())  # the failed trials are recorded, no best declared
    assert written["best"] is None and written["trial_counts"]["failed"] == 2 and written["trials"][0]["error"]


def test_tune_cli_exits_1_and_shows_the_failed_trials(tmp_path, monkeypatch):
    import raystack.raysession
    import raystack.tuning.sweep as sweep

    def fake_sweep(space, out, *a, **k):
        rows = [{"trial": "trial_8af01_00000", "setting": {"rho": 0.1}, "status": "error", "error": CRASH,
                 "mitigation": None, "utility": None, "objective": None}]
        return sweep.sweep_results(space, rows, out)

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    monkeypatch.setattr(raystack.raysession, "init_ray", lambda *a: "none (test)")
    res = CliRunner().invoke(app, ["tune", "--space", str(ROOT / "tune_spaces" / "tiny_rho_4.yaml"), "--out",
                                   str(tmp_path / "sweep")], env={"COLUMNS": "200"})
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "no trial of sweep" in lines[0], res.output + res.stderr
    assert "FAILED" in res.stdout and "8af01_00000" in res.stdout and "Traceback" not in res.output
    assert not (tmp_path / "sweep" / "best.yaml").exists()


def test_capacity_hints_name_the_commands_own_flags(monkeypatch, tmp_path):
    import raystack.raysession as rs
    from raystack.errors import UserError

    monkeypatch.setattr(rs, "local_cpus", lambda: 2)
    monkeypatch.setattr(rs, "will_embed", lambda cluster: True)  # as from a shell, even if this test session runs Ray
    with pytest.raises(UserError) as e:
        rs.check_local_capacity(8, False, "--max-concurrent")
    assert "use --max-concurrent 2 or less" in str(e.value) and "--workers" not in str(e.value)
    with pytest.raises(UserError, match="use --workers 2 or less"):  # harden's own flag, as before
        rs.check_local_capacity(8, False)
    res = CliRunner().invoke(app, ["tune", "--space", str(ROOT / "tune_spaces" / "tiny_rho_4.yaml"),
                                   "--max-concurrent", "64", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--workers" not in res.stderr and "use --max-concurrent" in res.stderr


# --- bad input: one line, exit 2, nothing changed ---------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from raystack.freeze_mask import save_freeze_mask

    r = tmp_path_factory.mktemp("rtfail")
    write_concept_folder(r / "atk", ["circle"], None, ["sunset"], 1, 0, None, False)
    shutil.copytree(default_model_path(), r / "model")
    names = unet_names(r / "model")
    save_freeze_mask(r / "mismatched.safetensors", {n: True for n in names[1:]} | {"not.a.parameter": True})
    save_freeze_mask(r / "fewer.safetensors", {n: True for n in names[:-1]})
    (r / "mask.pt").write_bytes(b"\x80\x04\x95 pickled: never opened")
    save_freeze_mask(r / "ok.safetensors", {n: i % 2 == 0 for i, n in enumerate(names)})
    (r / "rt_list").mkdir()
    (r / "rt_list" / "redteam_run.json").write_text("[1, 2, 3]")
    base = {"space": "s", "budget": 10, "guard": 0.5, "concept": "sunset",
            "models": {"m": {"unattacked": {"target": 0.0, "others": 0.9}, "worst_case_unguarded": None,
                             "worst_case": None, "trials": [], "rejected_by_guard": []}}}
    tampered = {
        "target_750": ("models", "m", "unattacked", "target", 7.5),
        "target_minus_300": ("models", "m", "unattacked", "others", -3),
        "guard_2": ("guard", 2.0),
        "budget_negative": ("budget", -10),
        "count_negative": ("models", "m", "trial_counts", {"done": 1, "stopped": 0, "failed": -1}),
        "count_fraction": ("models", "m", "trial_counts", {"done": 1.5, "stopped": 0, "failed": 0}),
        "trial_target": ("models", "m", "trials", [{"status": "done", "target": 1.2, "others": 0.5}]),
        "curve_steps": ("models", "m", "budget_curve", [{"steps": -5, "best_target": 0.5}]),
    }
    for name, (*path, value) in tampered.items():
        rep = json.loads(json.dumps(base))
        node = rep
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        (r / f"rt_{name}").mkdir()
        (r / f"rt_{name}" / "redteam.json").write_text(json.dumps(rep))
    (r / "rt_base").mkdir()  # the untampered file: accepted (the cases below differ from it in one value)
    (r / "rt_base" / "redteam.json").write_text(json.dumps(base))
    worst = {"target": 7.5, "others": 0.6, "ci95": [0.3, 0.7], "attack": {"method": "full"}, "attack_dir": "a"}
    (r / "rt_worst_750").mkdir()
    (r / "rt_worst_750" / "redteam.json").write_text(json.dumps({**base, "models": {"m": {
        **base["models"]["m"], "worst_case": worst}}}))
    (r / "rt_ci").mkdir()
    (r / "rt_ci" / "redteam.json").write_text(json.dumps({**base, "models": {"m": {
        **base["models"]["m"], "worst_case": {**worst, "target": 0.5, "ci95": [-3, 0.7]}}}}))
    return r


def bad_cases(r: Path):
    rt = ["redteam", "--space", SPACE, "--data", str(r / "atk"), "--target", "sunset"]
    m = str(r / "model")
    cases = [
        ("mask keys do not match the model", rt + ["--model", f"a={m}:{r / 'mismatched.safetensors'}"],
         "--model a mask"),
        ("mask lacks a parameter", rt + ["--model", f"a={m}:{r / 'fewer.safetensors'}"], "1 missing"),
        ("pickled .pt mask", rt + ["--model", f"a={m}:{r / 'mask.pt'}"], ".safetensors only"),
        ("pickled .pt mask that does not exist", rt + ["--model", f"a={m}:{r / 'gone.pt'}"], "no freeze mask"),
        ("resume: run record is a list", rt + ["--model", f"a={m}", "--out", str(r / "rt_list"), "--resume"],
         "not a red-team run record"),
    ]
    for name in ("target_750", "target_minus_300", "guard_2", "budget_negative", "count_negative",
                 "count_fraction", "trial_target", "curve_steps", "worst_750", "ci"):
        cases.append((f"evaluate: tampered redteam.json {name}", ["evaluate", "--redteam", str(r / f"rt_{name}"),
                                                                 "--target", "sunset"], "not a red-team result"))
    return cases


def test_bad_red_team_input_is_one_line_and_changes_nothing(world, tmp_path):
    from raystack.redteam.results import load_redteam

    report, runs = load_redteam(world / "rt_base", "sunset")  # what the tampered files are made from loads
    assert report["guard"] == 0.5 and runs == {}
    runner = CliRunner()
    failures = []
    for name, argv, expect in bad_cases(world):
        out = tmp_path / name.replace(" ", "_").replace(":", "").replace("/", "_")
        if "--out" not in argv:
            argv = argv + ["--out", str(out)]
        before_world, before_tmp = tree_hash(world), tree_hash(tmp_path)
        res = runner.invoke(app, argv)
        lines = res.stderr.strip().splitlines()
        ok = (res.exit_code == 2 and len(lines) == 1 and expect in lines[0] and "Traceback" not in res.output
              and tree_hash(world) == before_world and tree_hash(tmp_path) == before_tmp)
        if not ok:
            failures.append((name, res.exit_code, res.stderr[-300:]))
    assert not failures, failures


def test_resume_into_a_uri_creates_nothing(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["redteam", "--space", SPACE, "--model", f"a={world / 'model'}", "--data",
                                   str(world / "atk"), "--target", "sunset", "--out", "s3://bucket/x", "--resume"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []  # no ./s3:/bucket left behind
    res = CliRunner().invoke(app, ["redteam", "--space", SPACE, "--model", f"a={world / 'model'}", "--data",
                                   str(world / "atk"), "--target", "sunset", "--out", "absent/run", "--resume"])
    assert res.exit_code == 2 and "no red-team run" in res.stderr  # refused before the lock makes absent/
    assert list(tmp_path.iterdir()) == []


def test_a_model_folder_with_a_colon_is_a_folder(world, tmp_path):
    from raystack.redteam.sweep import parse_models, split_model_spec

    colon = tmp_path / "run:2024-01-01"
    shutil.copytree(world / "model", colon)
    (t,) = parse_models([f"a={colon}"])  # no mask meant: the whole text is the folder
    assert Path(t.model) == colon.resolve() and t.mask is None
    shutil.copy(world / "ok.safetensors", colon / "freeze_mask.safetensors")
    masked = parse_models([f"b={colon}:mask", f"c={colon}:{world / 'ok.safetensors'}"])
    assert [(x.name, x.mask is not None, Path(x.model) == colon.resolve()) for x in masked] == [
        ("b.compliant", True, True), ("b.noncompliant", False, True), ("c.compliant", True, True),
        ("c.noncompliant", False, True)]
    assert split_model_spec("/x/y:mask") == ("/x/y", "mask")
    assert split_model_spec("/nowhere/a:b") == ("/nowhere/a:b", "")  # no folder, no mask-like tail: one path
    assert split_model_spec(f"{world / 'model'}:somefile") == (str(world / "model"), "somefile")


def test_a_colon_model_folder_is_accepted_by_the_cli(world, tmp_path, monkeypatch):
    """Up to the sweep (replaced here): the ':' path is taken whole, with no mask."""
    import raystack.raysession
    import raystack.redteam.sweep as sweep

    colon = tmp_path / "in" / "model:v2"
    shutil.copytree(world / "model", colon)
    seen = {}

    def fake_run(space, targets, *a, **k):
        seen["targets"] = [(t.name, t.model, t.mask) for t in targets]
        raise SystemExit(0)

    monkeypatch.setattr(sweep, "run_redteam", fake_run)
    monkeypatch.setattr(raystack.raysession, "init_ray", lambda *a: "none (test)")
    res = CliRunner().invoke(app, ["redteam", "--space", SPACE, "--model", f"a={colon}", "--data",
                                   str(world / "atk"), "--target", "sunset", "--out", str(tmp_path / "rt")])
    assert res.exit_code == 0, res.stderr
    assert seen["targets"] == [("a", str(colon.resolve()), None)]


# --- end to end: trials that crash inside Ray --------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.ray
def test_a_red_team_whose_compliant_trials_crash_exits_1_and_says_failed(tmp_path, ray_session):
    """A release whose mask freezes every attention projection: the mask matches the model (it passes the
    up-front check), but a compliant LoRA has nothing to adapt and every compliant trial raises inside Ray.
    The non-compliant attacker's trial completes. The red team reports the crash, never protection."""
    from raystack.attacks.methods import LORA_ALL_ATTENTION
    from raystack.freeze_mask import save_freeze_mask

    names = unet_names(default_model_path())
    save_freeze_mask(tmp_path / "attn.safetensors",
                     {n: any(n.endswith(f".{a}.weight") for a in LORA_ALL_ATTENTION) for n in names})
    write_concept_folder(tmp_path / "atk", ["circle"], None, ["sunset"], 1, 1, None, False)
    (tmp_path / "space.yaml").write_text(
        "name: crash\nbudget: 4\nsearch: {lr: {choice: [0.001]}}\n"
        "fixed: {method: lora, steps: 4, checkpoint_every: 4, batch_size: 1}\n"
        "samples: 1\neval_samples: 1\nother_samples: 1\neval_steps: 2\nrescore_top: 1\nrescore_factor: 1\n"
        "algorithm: random\nscheduler: fifo\n")
    out = tmp_path / "rt"
    res = CliRunner().invoke(app, ["redteam", "--space", str(tmp_path / "space.yaml"), "--model",
                                   f"rel=tiny:{tmp_path / 'attn.safetensors'}", "--data", str(tmp_path / "atk"),
                                   "--target", "sunset", "--out", str(out)], env={"COLUMNS": "250"})
    assert res.exit_code == 1, res.output + res.stderr
    (last,) = res.stderr.strip().splitlines()  # one line: Tune's own tracebacks of the failed trial held back
    assert "no trial completed for rel.compliant (1 failed" in last and "rel.noncompliant" not in last
    assert "nothing to adapt" in last and "Traceback" not in res.stderr
    assert "rel.compliant: 1 of 1 trials FAILED" in res.stdout and "passed the guard" not in res.stdout
    report = json.loads((out / "redteam.json").read_text())
    assert report["incomplete"] == ["rel.compliant"]
    crashed, fine = report["models"]["rel.compliant"], report["models"]["rel.noncompliant"]
    assert crashed["trial_counts"] == {"done": 0, "stopped": 0, "failed": 1} and crashed["worst_case"] is None
    assert "nothing to adapt" in crashed["trials"][0]["error"]
    assert "nothing to adapt" in (out / crashed["trials"][0]["error_file"]).read_text()  # the full traceback
    assert fine["trial_counts"] == {"done": 1, "stopped": 0, "failed": 0}

    rep = CliRunner().invoke(app, ["evaluate", "--redteam", str(out), "--target", "sunset", "--samples", "1",
                                   "--curve-samples", "1", "--steps", "2", "--no-curves", "--out",
                                   str(tmp_path / "rep")])
    assert rep.exit_code == 0, rep.output + rep.stderr
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "FAILED: no trial completed (1 failed" in page and "rel.compliant: 1 of 1 trials FAILED" in page
    row = page[page.index("rel.compliant"):].split("</tr>")[0]
    assert "none passed the guard" not in row
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["redteam"]["incomplete"] == ["rel.compliant"]
