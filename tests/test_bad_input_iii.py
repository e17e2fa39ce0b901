"""Reliability III: inputs that used to give a silent wrong answer, delete a user's folder, or leave a local
folder named after a URI.

The same contract as test_bad_input_ii.py: exit 2, exactly one stderr line naming the flag or file, no
traceback, and every tree (the inputs, the working folder, the test's own folder) byte-identical afterwards.
The commands run in a scratch working folder, so a URI turned into a relative path (`s3:/bucket/x`) would show
up there. No case starts Ray: the table runs in the fast subset. The mask-check, verify and red-team rows are
in test_mask_check_loader.py, test_verify_strict.py and test_redteam_failures.py."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from raystack.models.pipeline_io import default_model_path
from raystack.outputs import OUTPUT_MARKER
from raystack.tinyworld.folder import write_concept_folder
from test_bad_input_ii import tree_hash

ROOT = Path(__file__).resolve().parents[1]
TINY_ATTACK_SPACE = str(ROOT / "attack_spaces" / "tiny_4.yaml")
LONG = "n" * 300


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    r = tmp_path_factory.mktemp("bad3")
    write_concept_folder(r / "data" / "good", ["circle"], ["red"], ["sunset"], 2, 1, None, False)
    shutil.copytree(default_model_path(), r / "model")
    # a user's own folders that hold a file of the same name as one of ours
    write_concept_folder(r / "users" / "dataset", ["square"], ["blue"], ["plain"], 2, 2, None, False)
    (r / "users" / "dataset" / OUTPUT_MARKER).unlink(missing_ok=True)  # as a user's own image folder has no marker
    shutil.copytree(default_model_path(), r / "users" / "model_copy")
    (r / "users" / "notes").mkdir()
    (r / "users" / "notes" / "manifest.json").write_text(json.dumps({"files": {}}))
    (r / "users" / "notes" / "report.json").write_text("{}")
    (r / "users" / "results.json").write_text("my numbers")
    (r / "users" / "grid.png").write_bytes(b"my picture")
    (r / "users" / "out.run").mkdir()
    (r / "users" / "out.run" / "notes.txt").write_text("the only copy")
    (r / "users" / "file_not_folder").write_text("a file")
    # a text encoder where a CLIP (both towers) is expected
    shutil.copytree(default_model_path() / "text_encoder", r / "text_encoder")
    # attack spaces the robust hardening reads
    (r / "bad_space.yaml").write_text("name: s\nbudget: 10\nsearch: {steps: {choice: [5, 20]\n")
    (r / "huge_space.yaml").write_text(Path(TINY_ATTACK_SPACE).read_text().replace("samples: 4", "samples: 1000000000"))
    (r / "cwd").mkdir()
    return r


def cases(r: Path):
    """(name, argv, text the one stderr line must hold). `OUT` is replaced by a fresh output path."""
    good, m = str(r / "data" / "good"), str(r / "model")
    t = ["--target", good]
    h = ["harden", "--method", "imma"] + t
    fag = ["harden", "--method", "freezeasguard", "--legal", good] + t
    ev = ["evaluate", "--run", f"x={m}", "--target", "sunset"]
    a = ["attack", "--method", "lora", "--data", good]
    users = r / "users"
    rt = ["redteam", "--space", TINY_ATTACK_SPACE, "--model", f"a={m}", "--data", good, "--target", "sunset"]
    return [
        # 4. --overwrite replaces only what this tool wrote (its marker), never a user's folder or file
        ("world clip: overwrite a user's image folder", ["world", "clip", "--out", str(users / "dataset"),
                                                         "--overwrite"], "holds files this tool did not write"),
        ("world generate: overwrite a user's image folder", ["world", "generate", "--out", str(users / "dataset"),
                                                             "--overwrite"], "holds files this tool did not write"),
        ("harden: overwrite a user's image folder", h + ["--out", str(users / "dataset"), "--overwrite"],
         "holds files this tool did not write"),
        ("attack: overwrite a user's model folder", a + ["--out", str(users / "model_copy"), "--overwrite"],
         "holds files this tool did not write"),
        ("evaluate: overwrite a folder with a manifest and report", ev + ["--out", str(users / "notes"),
                                                                          "--overwrite"],
         "holds files this tool did not write"),
        ("erase: overwrite a user's model folder", ["erase", "--method", "uce", "--concept", "sunset", "--anchor",
                                                    "plain"] + t + ["--legal", good, "--out", str(users / "model_copy"),
                                                                    "--overwrite"],
         "holds files this tool did not write"),
        ("harden: overwrite a file", h + ["--out", str(users / "file_not_folder"), "--overwrite"],
         "is a file, not a folder this tool wrote"),
        ("harden: a user's folder where the run folder goes", h + ["--out", str(users / "out"), "--overwrite"],
         "run folder"),
        ("tune: into a user's folder", ["tune", "--space", str(ROOT / "tune_spaces" / "tiny_rho_4.yaml"), "--out",
                                        str(users / "notes")], "holds files this tool did not write"),
        ("world quality: --json replaces a file", ["world", "quality", "--json", str(users / "results.json")],
         "--json"),
        ("world quality: --grid replaces a file", ["world", "quality", "--grid", str(users / "grid.png")],
         "--grid"),
        ("world score: --json replaces a file", ["world", "score", "--images", good, "--json",
                                                 str(users / "results.json")], "already exists"),
        ("world sample: --out replaces a file", ["world", "sample", "--prompt", "a red circle", "--out",
                                                 str(users / "grid.png")], "already exists"),
        ("mask export: --out replaces a file", ["mask", "export", m, "--format", "names", "--out",
                                                str(users / "results.json")], "--out"),
        ("mask check: --json replaces a file", ["mask", "check", "--release", m, "--derivative", m, "--json",
                                                str(users / "results.json")], "--json"),
        # 6. URIs where a flag takes a local path, unknown schemes and malformed URIs are refused before anything is
        # made (harden/erase --out to a real store: tests/test_object_storage.py)
        ("evaluate: s3 out", ev + ["--out", "s3://bucket/report"], "a URI"),
        ("world clip: s3 out", ["world", "clip", "--out", "s3://bucket/clip"], "a URI"),
        ("erase: a malformed URI out", ["erase", "--method", "uce", "--concept", "sunset", "--anchor", "plain"] + t
         + ["--legal", good, "--out", "s3:/bucket/erased"], "neither a local path nor a URI"),
        ("harden: an unknown scheme out", h + ["--out", "ftp://bucket/hardened"], "unknown storage scheme ftp://"),
        ("attack: s3 out", a + ["--out", "s3://bucket/attack"], "a URI"),
        ("redteam --resume: s3 out", rt + ["--out", "s3://bucket/rt", "--resume"], "cannot be resumed yet"),
        ("redteam: s3 model with a local mask", ["redteam", "--space", TINY_ATTACK_SPACE, "--model",
                                                 f"a=s3://bucket/model:{m}/mask.safetensors", "--data", good,
                                                 "--target", "sunset"],
         "takes its own mask only"),
        ("redteam: a malformed URI out", rt + ["--out", "s3:/bucket/rt"], "neither a local path nor a URI"),
        ("tune --resume: s3 out", ["tune", "--space", str(ROOT / "tune_spaces" / "tiny_rho_4.yaml"), "--out",
                                   "s3://b/t", "--resume"], "cannot be resumed yet"),
        ("tune: a malformed URI out", ["tune", "--space", str(ROOT / "tune_spaces" / "tiny_rho_4.yaml"), "--out",
                                       "s3:/b/t"], "neither a local path nor a URI"),
        ("world generate: s3 out", ["world", "generate", "--out", "s3://bucket/data"], "a URI"),
        ("attack: s3 data", ["attack", "--method", "lora", "--data", "s3://bucket/data"], "a URI"),
        ("mask check: s3 json", ["mask", "check", "--release", m, "--derivative", m, "--json", "s3://b/x.json"],
         "a URI"),
        # 7. accepted and ignored: now refused
        ("harden: hold-erasure with FreezeAsGuard", fag + ["--imma-objective", "hold-erasure", "--concept", "sunset"],
         "--imma-objective hold-erasure: --method freezeasguard runs no IMMA step"),
        ("harden: hold-erasure with random-freeze", ["harden", "--method", "random-freeze"] + t
         + ["--imma-objective", "hold-erasure", "--concept", "sunset"], "runs no IMMA step"),
        ("harden: --concept without erasure", h + ["--concept", "sunset"], "--concept sunset: used only by"),
        ("harden: --anchor without erasure", h + ["--anchor", "plain"], "--anchor plain: used only by"),
        ("plan: attacker pool of a billion", ["plan", "--method", "imma", "--attacker-space", TINY_ATTACK_SPACE,
                                              "--attacker-pool", "1000000000"], "--attacker-pool 1000000000: at most"),
        ("harden: attackers per step of a billion", fag + ["--attacker-space", TINY_ATTACK_SPACE,
                                                           "--attackers-per-step", "1000000000"],
         "--attackers-per-step 1000000000: at most"),
        ("tune: a billion trials", ["tune", "--space", str(ROOT / "tune_spaces" / "tiny_rho_4.yaml"), "--samples",
                                    "1000000000"], "--samples 1000000000: must be a positive integer, at most"),
        ("evaluate: a billion samples", ev + ["--samples", "1000000000"], "--samples"),
        ("world generate: a billion images", ["world", "generate", "--n", "1000000000"], "--n"),
        ("redteam: a billion trials in the space", ["redteam", "--space", str(r / "huge_space.yaml"), "--model",
                                                    f"a={m}", "--data", good, "--target", "sunset"],
         "samples 1000000000: at most"),
        # 8. what used to be "internal error"
        ("plan: --model /etc", ["plan", "--method", "imma", "--model", "/etc"], "--model /etc: not a diffusers"),
        ("evaluate: --clip is a text encoder", ev + ["--clip", str(r / "text_encoder")],
         "not a CLIP model with its vision and text towers"),
        ("harden: 300-byte --out name", h + ["--out", str(r / LONG)], "300 bytes long"),
        ("world score: 300-byte --json name", ["world", "score", "--images", good, "--json", str(r / LONG)],
         "--json"),
        ("attack: 300-byte --out name", a + ["--out", str(r / LONG)], "at most 200"),
        ("evaluate: a 300-byte --run folder", ["evaluate", "--run", f"x={r / LONG}", "--target", "sunset"],
         "--run x"),
        ("redteam: a 300-byte --model folder", ["redteam", "--space", TINY_ATTACK_SPACE, "--model", f"a={r / LONG}",
                                                "--data", good, "--target", "sunset"], "--model a"),
        # 9. wrong or unclear lines
        ("erase: --anchor is the concept", ["erase", "--method", "ablation", "--concept", "sunset", "--anchor",
                                            "sunset"] + t + ["--legal", good], "--anchor sunset: the same as"),
        ("erase: --concept of commas", ["erase", "--method", "ablation", "--concept", ","] + t + ["--legal", good],
         "--concept ,: names no word"),
        ("harden: attacker space errors name --attacker-space", h + ["--attacker-space", str(r / "bad_space.yaml")],
         "--attacker-space"),
        ("harden: a folder as the signing key", h + ["--sign-key", str(r / "users" / "notes")],
         "is a folder; give the key file"),
        ("harden: a long --out value is cut", h + ["--out", str(r / "data" / "good" / ("x" * 150) / ("y" * 150))],
         "..."),
    ]


def test_bad_input_iii_table(world, tmp_path, monkeypatch):
    monkeypatch.chdir(world / "cwd")
    runner = CliRunner()
    table = cases(world)
    assert len(table) >= 38
    assets = tree_hash(default_model_path().parent)
    failures = []
    for name, argv, expect in table:
        if "--out" not in argv and argv[0] in ("harden", "attack", "evaluate", "erase", "redteam", "tune") \
                or argv[:2] == ["world", "generate"] and "--out" not in argv:
            argv = argv + ["--out", str(tmp_path / name.replace(" ", "_").replace(":", "").replace("/", "_"))]
        before_world, before_tmp = tree_hash(world), tree_hash(tmp_path)
        res = runner.invoke(app, argv)
        unchanged = tree_hash(world) == before_world and tree_hash(tmp_path) == before_tmp
        lines = res.stderr.strip().splitlines()
        ok = (res.exit_code == 2 and len(lines) == 1 and expect in lines[0] and len(lines[0]) <= 420
              and "Traceback" not in res.output + res.stderr and unchanged and "internal error" not in lines[0])
        if name.endswith("is cut"):
            ok = ok and "x" * 100 not in lines[0] and "y" * 100 not in lines[0]
        if not ok:
            failures.append((name, res.exit_code, unchanged, res.stderr[-300:]))
    assert not failures, failures
    assert tree_hash(default_model_path().parent) == assets
    assert not list((world / "cwd").iterdir())  # no `s3:` folder


def test_overwrite_replaces_a_folder_this_tool_wrote(tmp_path):
    """The marker names the command; `--overwrite` replaces a marked folder, and an empty one."""
    runner = CliRunner()
    out = tmp_path / "data"
    argv = ["world", "generate", "--out", str(out), "--shape", "circle", "--colour", "red", "--style", "sunset",
            "--n", "1"]
    assert runner.invoke(app, argv).exit_code == 0
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker["tool"] == "immunize-cli" and "immunize-cli world generate --out" in marker["command"] and str(out) in marker["command"]
    assert runner.invoke(app, argv).exit_code == 2  # exists, no --overwrite
    res = runner.invoke(app, argv + ["--overwrite", "--seed", "5"])
    assert res.exit_code == 0, res.stderr
    assert "--seed 5" in json.loads((out / OUTPUT_MARKER).read_text())["command"]
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, argv[:3] + [str(tmp_path / "empty")] + argv[4:] + ["--overwrite"])
    assert res.exit_code == 0 and (tmp_path / "empty" / OUTPUT_MARKER).is_file()


def test_file_outputs_are_replaced_with_overwrite(tmp_path):
    runner = CliRunner()
    d = tmp_path / "d"
    write_concept_folder(d, ["circle"], ["red"], ["sunset"], 1, 1, None, False)
    j = tmp_path / "p.json"
    j.write_text("old")
    assert runner.invoke(app, ["world", "score", "--images", str(d), "--json", str(j)]).exit_code == 2
    assert j.read_text() == "old"
    res = runner.invoke(app, ["world", "score", "--images", str(d), "--json", str(j), "--overwrite"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(j.read_text())[0]["file"].endswith(".png")


def test_a_release_marker_is_not_part_of_its_manifest(tmp_path):
    """verify hashes every file of a release but the marker (it names a time and a command line)."""
    from raystack.hardening.driver import hash_tree

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"x")
    (tmp_path / OUTPUT_MARKER).write_text("{}")
    assert list(hash_tree(tmp_path)) == ["unet/w.safetensors"]


def test_outputs_of_earlier_versions_stay_replaceable_and_a_linked_marker_does_not_count(tmp_path):
    """Folders written before the marker are recognised by what only this tool writes (a manifest naming its
    version, an attack.json with its keys, harden's run folder holding only Ray Train's `harden/`); a user's
    folder with a look-alike file, or a marker that is a link, is not ours."""
    from raystack.errors import UserError
    from raystack.outputs import check_replaceable, is_tool_output, write_output_marker

    release = tmp_path / "release"
    release.mkdir()
    (release / "manifest.json").write_text(json.dumps({"files": {}, "versions": {"immunize-cli": "0.1"}}))
    attack = tmp_path / "attack"
    attack.mkdir()
    (attack / "attack.json").write_text(json.dumps({"method": "lora", "base_model": "/m", "spec": {}}))
    run = tmp_path / "rel.run"
    (run / "harden").mkdir(parents=True)
    for folder in (release, attack, run):
        assert is_tool_output(folder)
        check_replaceable(folder)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text(json.dumps({"files": {}}))
    (mine / "attack.json").write_text(json.dumps({"method": "lora"}))
    (run / "notes.txt").write_text("the only copy")
    outside = tmp_path / "outside.json"
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "x").write_text("mine")
    (tmp_path / "linked" / OUTPUT_MARKER).symlink_to(outside)
    for folder in (mine, run, tmp_path / "linked"):
        assert not is_tool_output(folder)
        with pytest.raises(UserError, match="did not write"):
            check_replaceable(folder)
    with pytest.raises(UserError, match="symbolic link"):
        write_output_marker(tmp_path / "linked")
    assert not outside.exists()


def test_a_long_value_in_an_error_line_keeps_its_end():
    """A long path is cut in the middle: the line keeps the file name that says which file is wrong."""
    from raystack.outputs import SHOWN_CHARS, shown

    long_path = "/tmp/" + "d" * 200 + "/no_prompts.yaml"
    cut = shown(long_path)
    assert len(cut) == SHOWN_CHARS and cut.startswith("/tmp/ddd") and cut.endswith("/no_prompts.yaml") and "..." in cut
    assert shown("short") == "short"
