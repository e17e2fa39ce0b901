"""evaluate on any model: CLIP zero-shot concept accuracy (--clip DIR --versus PROMPT), with a tiny random CLIP
built here (offline, safetensors), on an SD-1.5-shaped pipeline the tiny world's classifier must refuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from raystack.models.pipeline_io import default_model_path

    d = tmp_path_factory.mktemp("clip")
    tok = CLIPTokenizer.from_pretrained(str(default_model_path() / "tokenizer"))
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": tok.model_max_length,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=16))
    model.save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from raystack.models.shapes import build_pipeline_folder

    return build_pipeline_folder("sd15", tmp_path_factory.mktemp("sd15") / "m")


def test_zero_shot_assigns_every_image_to_exactly_one_label(tiny_clip):
    from raystack.metrics import ClipZeroShot

    judge = ClipZeroShot(tiny_clip, ["a red circle", "a blue square", "a green cross"])
    imgs = np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    accs = [judge.accuracy(imgs, label) for label in judge.labels]
    assert sum(accs) == pytest.approx(1.0)
    pred = judge.predict(imgs)
    assert np.array_equal(pred, judge.predict(imgs)) and set(pred.tolist()) <= {0, 1, 2}
    sims = judge.images(imgs) @ judge.text.T  # the label taken is the most similar one
    assert np.array_equal(pred, sims.argmax(1))


def test_evaluate_scores_any_model_by_clip_and_refuses_the_tiny_world_judge(tiny_clip, sd15, tmp_path):
    base = ["evaluate", "--run", f"m={sd15}", "--target", "a red circle in sunset style", "--samples", "2",
            "--steps", "2", "--no-curves"]
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "r0")])
    assert res.exit_code == 2 and "--clip DIR --versus" in res.stderr and not (tmp_path / "r0").exists(), res.stderr
    res = CliRunner().invoke(app, [*base, "--versus", "a blue square", "--out", str(tmp_path / "r1")])
    assert res.exit_code == 2 and "needs a local CLIP folder" in res.stderr, res.stderr
    res = CliRunner().invoke(app, [*base, "--versus", "a blue square in plain style", "--versus",
                                   "a green cross in striped style", "--clip", str(tiny_clip), "--device", "cpu",
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    run = report["runs"]["m"]
    assert 0.0 <= run["target_accuracy"] <= 1.0
    assert set(run["other_accuracy"]) == {"a blue square in plain style", "a green cross in striped style"}
    assert report["embedders"] == []  # no --reference: no similarity to score against
    assert (tmp_path / "r" / "report.html").is_file()


def test_evaluate_device_is_checked(tmp_path):
    res = CliRunner().invoke(app, ["evaluate", "--run", f"m={tmp_path}", "--target", "sunset", "--device", "tpu",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--device tpu: expected auto, cpu or cuda" in res.stderr, res.stderr


def test_tiny_world_clip_trains_and_is_read_by_the_zero_shot_judge(tmp_path):
    """raystack/tinyworld/clip.py: a short training writes a folder ClipZeroShot loads; the same seed gives the
    same weights; its zero-shot style accuracies come through the product's judge (bench/clip_agreement.py trains
    it fully and checks it against the classifier)."""
    from safetensors.torch import load_file

    from raystack.tinyworld.clip import TinyClipSpec, style_accuracy, train_tiny_clip

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        train_tiny_clip(TinyClipSpec(out=d, steps=3, batch=16, per_combo=1, width=32, layers=1), say=lambda _: None)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    acc = style_accuracy(a, n_per_combo=1)
    assert set(acc) == {"plain", "striped", "checkered", "dotted", "sunset"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())


def test_ranking_agreement_counts_pairs():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "clip_agreement", Path(__file__).resolve().parents[1] / "bench" / "clip_agreement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    same = mod.agreement({"a": 0.1, "b": 0.5, "c": 0.9}, {"a": 0.2, "b": 0.3, "c": 0.4})
    assert same["kendall_tau_b"] == 1.0 and same["pairs_ordered_differently"] == 0
    rev = mod.agreement({"a": 0.1, "b": 0.5, "c": 0.9}, {"a": 0.4, "b": 0.3, "c": 0.2})
    assert rev["kendall_tau_b"] == -1.0 and rev["share_alike"] == 0.0
    tie = mod.agreement({"a": 0.1, "b": 0.1, "c": 0.9}, {"a": 0.2, "b": 0.3, "c": 0.4})
    assert tie["pairs_ordered_alike"] == 2 and 0 < tie["kendall_tau_b"] < 1


def test_world_clip_command_writes_a_judge_and_refuses_bad_outputs(tmp_path):
    """`immunize-cli world clip`: a CLIP folder evaluate --clip can read; an existing --out is refused without
    --overwrite, and the shipped tiny world can never be the output."""
    from raystack.models.pipeline_io import default_model_path

    runner = CliRunner()
    out = tmp_path / "clip"
    res = runner.invoke(app, ["world", "clip", "--out", str(out), "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "tiny_clip.json").is_file()
    again = runner.invoke(app, ["world", "clip", "--out", str(out), "--steps", "2"])
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert runner.invoke(app, ["world", "clip", "--out", str(out), "--steps", "2", "--overwrite"]).exit_code == 0
    shipped = runner.invoke(app, ["world", "clip", "--out", str(default_model_path().parent / "x")])
    assert shipped.exit_code == 2 and len(shipped.stderr.strip().splitlines()) == 1
