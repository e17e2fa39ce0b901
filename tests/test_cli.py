import subprocess
import sys

from typer.testing import CliRunner

from cli.main import app

HEAVY = ("torch", "ray", "diffusers", "deepspeed", "transformers", "peft")


def test_help_lists_commands_and_imports_nothing_heavy():
    code = ("import sys; from typer.testing import CliRunner; from cli.main import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "print(r.output); print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    for cmd in ("attack", "world"):
        assert cmd in out


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
