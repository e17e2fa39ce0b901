import json

import numpy as np
import pytest

from raystack.tinyworld.concepts import (COLOURS, EMBLEMS, HELD_OUT_SHAPES, HELD_OUT_STYLES, SHAPES, STYLES,
                                         TRAINED_SHAPES, TRAINED_STYLES, caption)
from raystack.tinyworld.data import combos, concept_set, emblem_set
from raystack.tinyworld.render import render_concept, render_emblem


def test_same_seed_same_bytes():
    a = concept_set(2, seed=123, trained_only=False)
    b = concept_set(2, seed=123, trained_only=False)
    assert a.images.tobytes() == b.images.tobytes()
    assert a.captions == b.captions


def test_other_seed_other_images():
    a = concept_set(1, seed=1).images
    b = concept_set(1, seed=2).images
    assert (a != b).any(axis=(1, 2, 3)).mean() > 0.9


def test_emblems_are_deterministic_and_distinct():
    a, la = emblem_set(3, seed=7)
    b, _ = emblem_set(3, seed=7)
    assert a.tobytes() == b.tobytes()
    means = np.stack([a[la == i].reshape(3, -1).mean(0) for i in range(len(EMBLEMS))]).astype(float)
    d = np.abs(means[:, None] - means[None]).mean(-1)
    assert (d + np.eye(len(EMBLEMS)) * 1e9).min() > 20  # every pair of emblems differs clearly


def test_held_out_concepts_never_in_pretraining_combos():
    assert HELD_OUT_SHAPES and HELD_OUT_STYLES
    for sh, co, st in combos(trained_only=True):
        assert sh in TRAINED_SHAPES and st in TRAINED_STYLES
    cs = concept_set(1, seed=0, trained_only=True)
    text = " ".join(cs.captions)
    for word in HELD_OUT_SHAPES + HELD_OUT_STYLES:
        assert word not in text.split()


def test_images_are_what_they_claim():
    rng = np.random.default_rng(0)
    red = render_concept("square", "red", "plain", rng).astype(float)
    centre = red[12:20, 12:20].reshape(-1, 3).mean(0)
    assert centre[0] > 180 and centre[1] < 80 and centre[2] < 80
    striped = render_concept("circle", "blue", "striped", rng).astype(float).mean(axis=(1, 2))
    assert striped.max() - striped.min() > 30  # rows alternate dark/light
    with pytest.raises(ValueError, match="unknown shape"):
        render_concept("blob", "red", "plain", rng)


def test_caption_template():
    assert caption("circle", "red", "sunset") == "a red circle in sunset style"
    assert set(SHAPES) & set(COLOURS) == set() and set(STYLES) & set(SHAPES) == set()


def test_generate_writes_user_folder(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "zig"
    res = CliRunner().invoke(app, ["world", "generate", "--out", str(out), "--style", "sunset", "--shape", "circle",
                                   "--n", "3", "--seed", "5"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * len(COLOURS)
    assert all((out / r["file_name"]).is_file() and r["text"].endswith("sunset style") for r in rows)
    again = tmp_path / "zig2"
    CliRunner().invoke(app, ["world", "generate", "--out", str(again), "--style", "sunset", "--shape", "circle",
                             "--n", "3", "--seed", "5"])
    assert all((out / r["file_name"]).read_bytes() == (again / r["file_name"]).read_bytes() for r in rows)


def test_generate_emblem_folder(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(app, ["world", "generate", "--out", str(tmp_path / "e"), "--emblem", "emblem2", "--n", "5"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "e" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["text"] == "a photo of sks emblem"
    img = render_emblem(EMBLEMS[2], np.random.default_rng(0))
    assert img.shape == (32, 32, 3)


def test_personal_object_target_names_prompt_and_criterion():
    from raystack.errors import UserError
    from raystack.evaluation import tiny_world_target
    from raystack.tinyworld.concepts import parse_object

    assert parse_object("yellow-dotted-triangle") == ("triangle", "yellow", "dotted")
    for bad in ("yellow-triangle", "teal-dotted-triangle", "yellow-dotted-triangle-x", "sunset"):
        assert parse_object(bad) is None
    concept, ref = tiny_world_target("yellow-dotted-triangle", token="zwx")
    assert concept.prompts == ["a zwx"]
    assert concept.criterion == {"shape": "triangle", "colour": "yellow", "style": "dotted"}
    assert ref.shape == (16, 32, 32, 3)
    with pytest.raises(UserError, match="colour-style-shape"):
        tiny_world_target("teal-dotted-triangle")
