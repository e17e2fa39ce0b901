import subprocess
import sys

from typer.testing import CliRunner

from cli.main import app

HEAVY = ("torch", "ray", "diffusers", "deepspeed", "transformers", "peft", "numpy")


def test_help_lists_commands_and_imports_nothing_heavy():
    code = ("import sys; from typer.testing import CliRunner; from cli.main import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "print(r.output); print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    for cmd in ("attack", "world"):
        assert cmd in out


def _help(*cmd) -> str:
    res = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


def _params(cmd: str) -> dict:
    import typer

    return {p.name: p for p in typer.main.get_command(app).commands[cmd].params}


def test_harden_help_groups_flags_by_section_and_shows_defaults():
    out = _help("harden")
    for panel in ("Model, data and output", "Where and how it runs", "IMMA", "Robust hardening", "FreezeAsGuard",
                  "Concept erasure"):
        assert f"╭─ {panel}" in out, panel
    assert out.index("╭─ FreezeAsGuard") < out.index("--rho") < out.index("╭─ Concept erasure")
    from raystack.hardening.spec import HardenSpec

    assert f"[default: {HardenSpec.rho}]" in out and f"[default: {HardenSpec.outer_lr}]" in out
    switch = _params("harden")["gradient_checkpointing"]  # a boolean is a pair of switches
    assert switch.opts == ["--gradient-checkpointing"] and switch.secondary_opts == ["--no-gradient-checkpointing"]


def test_a_boolean_is_a_switch_not_a_value(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["harden", "--gradient-checkpointing", "true", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2
    # the switch parses: the run then stops at the first check that fails (--steps 0), before anything runs
    res = runner.invoke(app, ["harden", "--no-gradient-checkpointing", "--steps", "0", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--steps 0" in res.output and not (tmp_path / "o").exists()


def test_erase_help_offers_erasure_flags_only():
    out = _help("erase")
    assert "uce, esd-x or ablation" in out and "--concept" in out and "--anchor" in out
    params = _params("erase")
    for name in ("rho", "outer_lr", "attacker_space", "against", "erase"):
        assert name not in params, name
    assert "concept" in params and "erase_steps" in params
    assert "imma | freezeasguard" not in out


def test_attack_help_shows_every_methods_defaults():
    from raystack.attacks.spec import METHOD_DEFAULTS, METHODS, SD_METHOD_DEFAULTS

    out = _help("attack")
    for method in METHODS:
        assert f"tiny world {method} steps {METHOD_DEFAULTS[method]['steps']}," in out, method
        assert f"SD-1.x/2.x/XL {method} steps {SD_METHOD_DEFAULTS[method]['steps']}," in out, method
    assert "METHOD_DEFAULTS" not in out


def test_world_help_lists_world_commands():
    out = CliRunner().invoke(app, ["world", "--help"]).output
    for cmd in ("generate", "pretrain", "sample", "score", "quality"):
        assert cmd in out


def test_score_reads_a_folder(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["world", "generate", "--out", str(tmp_path / "d"), "--shape", "cross", "--colour",
                               "green", "--style", "dotted", "--n", "3"]).exit_code == 0
    res = runner.invoke(app, ["world", "score", "--images", str(tmp_path / "d"), "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    import json

    preds = json.loads((tmp_path / "p.json").read_text())
    assert [(p["shape"], p["colour"], p["style"]) for p in preds] == [("cross", "green", "dotted")] * 3


def test_world_bad_input_is_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["world", "score", "--images", str(tmp_path / "missing")])
    assert res.exit_code == 2 and res.stderr.strip().count("\n") == 0 and "no such folder" in res.stderr
    (tmp_path / "m").mkdir()
    res = runner.invoke(app, ["world", "sample", "--prompt", "x", "--out", str(tmp_path / "x.png"),
                              "--model", str(tmp_path / "m")])
    assert res.exit_code == 2 and "no model_index.json" in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_harden_and_attack_flags_are_their_spec_fields_with_the_field_docstrings_as_help():
    """Configuration written once: every spec field is a flag (and nothing else is, but --config), its help is
    the docstring under the field; a YAML --config takes the same keys."""
    import dataclasses

    import typer

    from raystack.attacks.spec import AttackSpec
    from raystack.hardening.spec import HardenSpec
    from raystack.specs import field_default, field_docs, shown_default

    commands = typer.main.get_command(app).commands
    for name, cls in (("harden", HardenSpec), ("attack", AttackSpec)):
        params = {p.name: p for p in commands[name].params}
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(params) == fields | {"config"}, (name, set(params) ^ (fields | {"config"}))
        docs = field_docs(cls)
        dataclass_fields = {f.name: f for f in dataclasses.fields(cls)}
        for f in fields:
            assert params[f].opts[0] == "--" + f.replace("_", "-")
            assert params[f].help == " ".join(docs[f].split()) + shown_default(field_default(dataclass_fields[f])), f
    assert commands["harden"].params[[p.name for p in commands["harden"].params].index("use_gpu")].secondary_opts \
        == ["--cpu"]


def test_attack_takes_a_config_and_flags_win(tmp_path):
    from raystack.tinyworld.folder import write_concept_folder

    write_concept_folder(tmp_path / "d", ["circle"], ["red"], ["sunset"], 1, 0, None, False)
    (tmp_path / "a.yaml").write_text(f"method: lora\ndata: {tmp_path / 'd'}\nsteps: 1\nlr: .nan\n")
    res = CliRunner().invoke(app, ["attack", "--config", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "lr nan: must be a finite number" in res.stderr  # the file's keys are checked
    res = CliRunner().invoke(app, ["attack", "--config", str(tmp_path / "a.yaml"), "--lr", "0.01", "--out",
                                   str(tmp_path / "o")])
    assert res.exit_code == 0, res.stderr
    info = __import__("json").loads((tmp_path / "o" / "attack.json").read_text())
    assert info["method"] == "lora" and info["steps"] == 1 and info["spec"]["lr"] == 0.01
