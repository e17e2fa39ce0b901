"""Bad input, table-driven: exit code != 0, one clear line on stderr naming the flag or file,
no traceback, nothing written. (Issue: cluster operations, fault tolerance and bad input.)"""

import json
import shutil

import pytest
from typer.testing import CliRunner

from cli.main import app

TINY_SPACE = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tune_spaces" / "tiny_rho_4.yaml")
from raystack.freeze_mask import save_freeze_mask
from raystack.tinyworld.folder import write_concept_folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("bad")
    write_concept_folder(root / "good", ["circle"], ["red"], ["sunset"], 2, 1, None, False)
    png = (root / "good" / "img_00000.png").read_bytes()
    (root / "empty").mkdir()
    (root / "nocap").mkdir()
    (root / "nocap" / "a.png").write_bytes(png)
    (root / "trunc").mkdir()
    (root / "trunc" / "a.png").write_bytes(png[:50])
    (root / "trunc" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red circle"}) + "\n")
    shutil.copytree(tiny_model_path, root / "m_trunc")
    f = root / "m_trunc" / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    shutil.copytree(tiny_model_path, root / "m_pickle")
    (root / "m_pickle" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (root / "m_pickle" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    (root / "notpipe").mkdir()
    (root / "exists").mkdir()
    (root / "unknown_key.yaml").write_text("method: imma\nsteps: 3\nlearning_rate: 1\n")
    (root / "wrong_type.yaml").write_text("method: imma\nsteps: three\n")
    (root / "not_yaml.yaml").write_text("method: [imma\n")
    space = "name: s\nharden: {method: freezeasguard}\nsearch: {rho: {grid: [0.1, 0.3]}}\n"
    (root / "space_rho.yaml").write_text(space.replace("0.3]", "1.3]"))
    (root / "space_key.yaml").write_text(space + "trials: 4\n")
    (root / "space_algo.yaml").write_text(space + "algorithm: annealing\n")
    (root / "space_flag.yaml").write_text(space.replace("rho:", "rhoo:"))
    (root / "space_attack.yaml").write_text(space + "attacks: [{method: hypernet}]\n")
    save_freeze_mask(root / "badmask.safetensors", {"nope.weight": True})
    (root / "corruptmask.safetensors").write_bytes(b"garbage-garbage-garbage")
    (root / "mask.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle: must be refused, never unpickled
    return root


def cases(r):
    t = ["--target", str(r / "good")]
    h = ["harden", "--method", "imma"]
    return [
        # (name, argv, text that must be in the one stderr line)
        ("harden: missing model", h + t + ["--model", str(r / "nope")], "--model"),
        ("harden: not a pipeline", h + t + ["--model", str(r / "notpipe")], "no model_index.json"),
        ("harden: truncated safetensors", h + t + ["--model", str(r / "m_trunc")], "truncated or corrupt"),
        ("harden: pickle weights refused", h + t + ["--model", str(r / "m_pickle")], "pickle weights are refused"),
        ("harden: empty data folder", h + ["--target", str(r / "empty")], "no images"),
        ("harden: metadata without captions", h + ["--target", str(r / "nocap")], "without captions"),
        ("harden: truncated image", h + ["--target", str(r / "trunc")], "unreadable image"),
        ("harden: rho above 1", ["harden", "--method", "freezeasguard", "--rho", "1.5"] + t, "--rho 1.5"),
        ("harden: rho below 0", ["harden", "--method", "random-freeze", "--rho", "-0.1"], "--rho -0.1"),
        ("harden: zero steps", h + t + ["--steps", "0"], "--steps 0"),
        ("harden: unknown method", ["harden", "--method", "unlearn"] + t, "--method unlearn"),
        ("harden: unknown attack", h + t + ["--against", "hypernet"], "--against hypernet"),
        ("harden: unreachable cluster", h + t + ["--cluster", "127.0.0.1:1"], "--cluster 127.0.0.1:1"),
        ("harden: out exists", h + t + ["--out-exists"], "already exists"),
        ("harden: unwritable out", h + t + ["--out", "/proc/immunize/out"], "not writable"),
        ("harden: yaml unknown key", ["harden", "--config", str(r / "unknown_key.yaml")] + t, "unknown key 'learning_rate'"),
        ("harden: yaml wrong type", ["harden", "--config", str(r / "wrong_type.yaml")] + t, "steps: expected an integer"),
        ("harden: not yaml", ["harden", "--config", str(r / "not_yaml.yaml")] + t, "not valid YAML"),
        ("harden: zero stage 5", h + t + ["--zero-stage", "5"], "--zero-stage 5"),
        ("harden: unknown inner optimizer", h + t + ["--inner-optimizer", "adam"], "--inner-optimizer adam"),
        ("harden: unknown retain target", h + t + ["--retain-target", "teacher"], "--retain-target teacher"),
        ("harden: outer timesteps reversed", h + t + ["--outer-timesteps", "900-100"], "--outer-timesteps 900-100"),
        ("harden: outer timesteps past the schedule", h + t + ["--outer-timesteps", "500-2000"],
         "--outer-timesteps 500-2000: the model has 1000 timesteps"),
        ("attack: unknown method", ["attack", "--method", "hypernet", "--data", str(r / "good")], "--method hypernet"),
        ("attack: mask keys mismatch", ["attack", "--method", "full", "--data", str(r / "good"), "--freeze-mask",
                                        str(r / "badmask.safetensors")], "keys do not match"),
        ("attack: corrupt mask", ["attack", "--method", "full", "--data", str(r / "good"), "--freeze-mask",
                                  str(r / "corruptmask.safetensors")], "corrupt safetensors"),
        ("attack: pickle mask refused", ["attack", "--method", "full", "--data", str(r / "good"), "--freeze-mask",
                                         str(r / "mask.pt")], "read from .safetensors only"),
        ("attack: negative steps", ["attack", "--method", "lora", "--data", str(r / "good"), "--steps", "-3"],
         "--steps -3"),
        ("attack: snr gamma negative", ["attack", "--method", "lora", "--data", str(r / "good"), "--snr-gamma=-1"],
         "--snr-gamma -1"),
        ("attack: noise offset too big", ["attack", "--method", "lora", "--data", str(r / "good"),
                                          "--noise-offset", "2"], "--noise-offset 2"),
        ("attack: empty folder", ["attack", "--method", "lora", "--data", str(r / "empty")], "no images"),
        ("attack: pickle model", ["attack", "--method", "lora", "--data", str(r / "good"), "--model",
                                  str(r / "m_pickle")], "pickle weights are refused"),
        ("harden: max failures -2", h + t + ["--max-failures", "-2"], "--max-failures -2"),
        ("tune: missing space", ["tune", "--space", str(r / "nope.yaml")], "--space"),
        ("tune: rho outside [0, 1]", ["tune", "--space", str(r / "space_rho.yaml")], "search.rho: 1.3"),
        ("tune: unknown key", ["tune", "--space", str(r / "space_key.yaml")], "unknown key 'trials'"),
        ("tune: unknown algorithm", ["tune", "--space", str(r / "space_algo.yaml")], "algorithm annealing"),
        ("tune: unknown harden flag", ["tune", "--space", str(r / "space_flag.yaml")], "unknown key 'rhoo'"),
        ("tune: unknown attack", ["tune", "--space", str(r / "space_attack.yaml")], "unknown method 'hypernet'"),
        ("tune: bad override", ["tune", "--space", TINY_SPACE, "--set", "harden.seed"], "--set harden.seed"),
        ("tune: override of a non-mapping", ["tune", "--space", TINY_SPACE, "--set", "name.x=1"], "name is not"),
        ("tune: unknown key by override", ["tune", "--space", TINY_SPACE, "--set", "harden.rhoo=0.2"],
         "unknown key 'rhoo'"),
        ("tune: zero samples", ["tune", "--space", TINY_SPACE, "--samples", "0"], "--samples 0"),
        ("tune: unreachable cluster", ["tune", "--space", TINY_SPACE, "--cluster", "127.0.0.1:1"],
         "--cluster 127.0.0.1:1"),
        ("evaluate: missing run", ["evaluate", "--run", f"a={r / 'nope'}", "--target", "sunset"], "no such folder"),
        ("evaluate: unknown target", ["evaluate", "--run", f"a={r / 'm_trunc'}", "--target", "blob"], "blob"),
    ]


def test_bad_input_table(world, tmp_path):
    runner = CliRunner()
    table = cases(world)
    assert len(table) >= 20
    failures = []
    for name, argv, expect in table:
        out = tmp_path / name.replace(" ", "_").replace(":", "")
        if "--out-exists" in argv:
            argv = [a for a in argv if a != "--out-exists"] + ["--out", str(world / "exists")]
        elif "--out" not in argv:
            argv = argv + ["--out", str(out)]
        before = sorted(p.name for p in world.iterdir())
        res = runner.invoke(app, argv)
        lines = res.stderr.strip().splitlines()
        ok = (res.exit_code not in (0, None) and len(lines) == 1 and expect in lines[0]
              and "Traceback" not in res.output + res.stderr and not out.exists()
              and not (out.parent / f"{out.name}.run").exists()
              and sorted(p.name for p in world.iterdir()) == before)
        if not ok:
            failures.append((name, res.exit_code, res.stderr[-400:]))
    assert not failures, failures
