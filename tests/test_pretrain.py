"""The pretraining recipe runs end to end from nothing, saves a loadable pipeline, and resumes."""

import json

import pytest
from typer.testing import CliRunner

from cli.main import app

pytestmark = pytest.mark.e2e


def test_pretrain_from_scratch_then_resume(tmp_path):
    runner = CliRunner()
    base = ["world", "pretrain", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
            "--vae-steps", "2", "--unet-steps", "4", "--images-per-combo", "1"]
    res = runner.invoke(app, base + ["--stage", "vae"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, base + ["--stage", "unet", "--stop-after", "2"])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "out" / "tiny-sd" / "immunize_info.json").read_text())
    assert info["unet_step"] == 2 and info["held_out"] == {"shapes": ["diamond"], "styles": ["sunset"]}
    res = runner.invoke(app, base + ["--stage", "unet"])
    assert res.exit_code == 0, res.output
    assert "resumed at step 2" in res.output
    info = json.loads((tmp_path / "out" / "tiny-sd" / "immunize_info.json").read_text())
    assert info["unet_step"] == 4
    lines = [json.loads(x) for x in (tmp_path / "work" / "unet_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0]  # logged every 25 steps: only step 0 here, once

    from raystack.models.pipeline_io import load_pipeline

    pipe = load_pipeline(tmp_path / "out" / "tiny-sd")
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.tokenizer.tokenize("sunset") == ["sunset</w>"]


def test_bad_stage_and_schedule(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["world", "pretrain", "--out", str(tmp_path), "--stage", "everything"])
    assert res.exit_code == 2 and "--stage everything" in res.stderr
    res = runner.invoke(app, ["world", "pretrain", "--out", str(tmp_path), "--schedule", "cosine"])
    assert res.exit_code == 2 and "--schedule cosine" in res.stderr
