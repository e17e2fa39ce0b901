"""Judges for any model (raystack/judges.py): concept files read strictly, the tiny world's classifier giving the
numbers it gave before, CLIP zero-shot with a tiny CLIP, `--judge` on redteam and tune (bad input: one line, exit 2,
nothing written), attacker defaults by model family, and a 2-trial red team on an SD-1.5-shaped pipeline judged by
CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from raystack.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"name": "star", "prompts": ["a red circle in sunset style"], "labels": ["a red circle in sunset style"],
        "alternatives": ["a red circle in plain style"],
        "others": [{"name": "stripes", "prompts": ["a blue square in striped style"],
                    "labels": ["a blue square in striped style"]}]}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIP that knows the tiny world, trained for 2 steps (`world clip` trains the real one)."""
    from raystack.tinyworld.clip import TinyClipSpec, train_tiny_clip

    d = tmp_path_factory.mktemp("judge-clip") / "clip"
    train_tiny_clip(TinyClipSpec(out=d, steps=2, batch=16, per_combo=1, width=32, layers=1), say=lambda _: None)
    return d


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from raystack.models.shapes import build_pipeline_folder

    return build_pipeline_folder("sd15", tmp_path_factory.mktemp("judge-sd15") / "m")


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _images(n: int = 12, seed: int = 0) -> np.ndarray:
    """Tiny-world images: sunset and striped ones, and noise."""
    from raystack.tinyworld.render import render_concept

    rng = np.random.default_rng(seed)
    imgs = [render_concept("circle", "red", "sunset", rng) for _ in range(n // 3)]
    imgs += [render_concept("square", "blue", "striped", rng) for _ in range(n // 3)]
    imgs += list(rng.integers(0, 256, (n - 2 * (n // 3), 32, 32, 3), dtype=np.uint8))
    return np.stack(imgs)


# concept files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((ROOT / "concepts").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_concept_files_load(path):
    from raystack.judges import load_concept_file

    c = load_concept_file(path)
    assert c["prompts"] and c["labels"] and c["others"] and c["path"] == str(path.resolve())
    assert all(o["prompts"] and o["labels"] for o in c["others"])


@pytest.mark.parametrize("change, message", [
    ({"prompts": None}, "prompts: missing"),
    ({"labels": None}, "labels: missing"),
    ({"labels": []}, "labels: empty"),
    ({"prompts": "a red circle"}, "prompts: expected a list"),
    ({"others": None}, "others: missing"),
    ({"others": [{"name": "x", "prompts": ["a"]}]}, r"others\[0\].labels: missing"),
    ({"others": [{"name": "x", "labels": ["a"]}]}, r"others\[0\].prompts: missing"),
    ({"others": [{"name": "x", "prompts": ["a"], "labels": ["a red circle in sunset style"]}]}, "also in labels"),
    ({"promts": ["a"]}, "unknown key 'promts'"),
    ({"name": "../x"}, "must be a plain name"),
    ({"labels": ["a", ""]}, r"labels\[1\]: expected a non-empty text"),
    ({"others": [GOOD["others"][0], GOOD["others"][0]]}, "used twice"),
])
def test_concept_files_are_checked_strictly_naming_the_file_and_key(tmp_path, change, message):
    from raystack.judges import load_concept_file

    f = _write(tmp_path / "c.yaml", {k: v for k, v in {**GOOD, **change}.items() if v is not None})
    with pytest.raises(UserError, match=message) as e:
        load_concept_file(f)
    assert str(f) in str(e.value) and len(str(e.value).splitlines()) == 1


def test_judge_specs_are_checked(tmp_path, tiny_clip):
    from raystack.judges import judge_spec, spec_target

    assert judge_spec(None, None, "sunset") == {"kind": "tiny", "target": "sunset"}
    concepts = _write(tmp_path / "c.yaml", GOOD)
    spec = judge_spec(f"clip:{tiny_clip}", concepts, None)
    assert spec["kind"] == "clip" and spec_target(spec) == "star"
    assert spec["concepts"]["path"] == str(concepts.resolve())
    assert judge_spec(f"clip:{tiny_clip}", spec["concepts"], "star") == spec  # a trial's copy: no file read
    for args, message in [(("tiny", concepts, "sunset"), "read by the CLIP judge"),
                          (("tiny", None, None), "--target: the tiny-world concept"),
                          (("tiny", None, "mauve"), "not a tiny-world concept"),
                          ((f"clip:{tiny_clip}", None, None), "needs --concepts"),
                          ((f"clip:{tiny_clip}", concepts, "sunset"), "names its target 'star'"),
                          (("dino:x", concepts, None), "expected tiny"),
                          ((f"clip:{tmp_path}", concepts, None), "no config.json")]:
        with pytest.raises(UserError, match=message):
            judge_spec(*args)


# the judges ----------------------------------------------------------------------------------------------
def test_the_tiny_judge_gives_the_numbers_of_the_existing_code_path(tiny_pipe, judge):
    """TinyWorldJudge (and the red team's and tune's scoring through it) is the classifier path, sample for sample."""
    from raystack.evaluation import other_concepts_accuracy, sampled_accuracy, tiny_world_others, tiny_world_target
    from raystack.judges import TinyWorldJudge, as_concept_judge
    from raystack.redteam.space import AttackSpace
    from raystack.redteam.sweep import _scores
    from raystack.tinyworld.classifier import concept_accuracy

    tj = TinyWorldJudge("sunset", classifier=judge)
    concept, _ = tiny_world_target("sunset")
    assert tj.target.prompts == concept.prompts and [c.name for c in tj.others] == [c.name for c in
                                                                                    tiny_world_others("sunset")]
    imgs = _images()
    for c in [concept, *tj.others]:
        assert tj.accuracy(imgs, c) == concept_accuracy(judge(imgs), **c.criterion)
        assert tj.hits(imgs, c).mean() == tj.accuracy(imgs, c)
    assert tj.target_accuracy(imgs) > 0  # the sunset circles
    assert as_concept_judge(judge, "sunset").accuracy(imgs, concept) == tj.target_accuracy(imgs)

    assert tj.sampled_target_accuracy(tiny_pipe, 3, seed=0, steps=2) == sampled_accuracy(
        tiny_pipe, concept.prompts, concept.criterion, 3, judge, seed=0, steps=2)
    assert tj.sampled_others_accuracy(tiny_pipe, 1, seed=1, steps=2) == other_concepts_accuracy(
        tiny_pipe, "sunset", 1, judge, 1, 2)
    space = AttackSpace(name="s", budget=400, search={"lr": {"choice": [1e-3]}}, eval_steps=2)
    assert _scores(tiny_pipe, space, "sunset", judge, 0, 3, 1) == _scores(tiny_pipe, space, "sunset", tj, 0, 3, 1)
    # tune's mitigation and utility, as they were computed before the judge interface
    from raystack.tuning import sweep as tune_sweep
    from raystack.tuning.space import load_space

    tspace = load_space(ROOT / "tune_spaces" / "tiny_rho_4.yaml", ["eval_samples=2", "eval_steps=2"])
    assert tune_sweep._score(tiny_pipe, tune_sweep._judge(tspace), tspace, 0) == sampled_accuracy(
        tiny_pipe, concept.prompts, concept.criterion, 2, judge, seed=0, steps=2)
    assert tune_sweep._utility(tiny_pipe, tune_sweep._judge(tspace), tspace) == other_concepts_accuracy(
        tiny_pipe, "sunset", 2, judge, 1, 2)


def test_the_clip_judge_assigns_every_image_to_one_label(tiny_clip, tmp_path):
    from raystack.evaluation import Concept
    from raystack.judges import ClipJudge, judge_spec, load_judge
    from raystack.metrics import ClipZeroShot

    spec = judge_spec(f"clip:{tiny_clip}", ROOT / "concepts" / "tiny_sunset.yaml", "sunset")
    j = load_judge(spec)
    assert load_judge(json.loads(json.dumps(spec))) is j  # loaded once per process
    imgs = _images()
    alternatives = Concept("alt", [], {"labels": spec["concepts"]["alternatives"]})
    shares = [j.target_accuracy(imgs), *(j.accuracy(imgs, c) for c in j.others)]
    if spec["concepts"]["alternatives"]:
        shares.append(j.accuracy(imgs, alternatives))
    assert all(0.0 <= s <= 1.0 for s in shares) and sum(shares) == pytest.approx(1.0)
    assert j.others_accuracy({c.name: imgs for c in j.others}) == pytest.approx(np.mean(shares[1:1 + len(j.others)]))
    # evaluate --target PROMPT --versus PROMPT: the same numbers as ClipZeroShot gave
    t, v = "a red circle in sunset style", ["a blue square in striped style", "a red circle in plain style"]
    z = ClipZeroShot(tiny_clip, [t, *v])
    jp = ClipJudge.from_prompts(tiny_clip, [t], v)
    for label in (t, *v):
        assert jp.accuracy(imgs, Concept(label, [label], {"label": label})) == z.accuracy(imgs, label)


# bad input: one line, exit 2, nothing written ------------------------------------------------------------
def _one_line_exit_2(res, out: Path, *needles):
    assert res.exit_code == 2, res.output + res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and all(n in res.stderr for n in needles), res.stderr
    assert not out.exists()


def test_redteam_judge_bad_input(tmp_path, tiny_clip, sd15):
    from raystack.tinyworld.folder import write_concept_folder

    write_concept_folder(tmp_path / "d", ["circle"], ["red"], ["sunset"], 1, 0, None, False)
    out = tmp_path / "rt"
    base = ["redteam", "--space", str(ROOT / "attack_spaces" / "tiny_4.yaml"), "--data", str(tmp_path / "d"),
            "--out", str(out)]
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--model", f"m={sd15}", "--target", "sunset"])  # --judge tiny is the default
    _one_line_exit_2(res, out, "--model m", "64-px images", "--judge clip:DIR")
    res = runner.invoke(app, [*base, "--model", f"m={sd15}", "--judge", "tiny", "--target", "sunset"])
    _one_line_exit_2(res, out, "--model m", "64-px images")
    no_prompts = _write(tmp_path / "no_prompts.yaml", {k: v for k, v in GOOD.items() if k != "prompts"})
    res = runner.invoke(app, [*base, "--model", f"m={sd15}", "--judge", f"clip:{tiny_clip}", "--concepts",
                              str(no_prompts)])
    _one_line_exit_2(res, out, "no_prompts.yaml", "prompts: missing")
    good = _write(tmp_path / "good.yaml", GOOD)
    for folder, why in ((sd15 / "text_encoder", "not a CLIP model with its vision and text towers"),
                        (tmp_path / "d", "no config.json")):
        res = runner.invoke(app, [*base, "--model", f"m={sd15}", "--judge", f"clip:{folder}", "--concepts", str(good)])
        _one_line_exit_2(res, out, "--judge", why)
    import shutil

    no_tokenizer = shutil.copytree(tiny_clip, tmp_path / "no_tokenizer")
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    res = runner.invoke(app, [*base, "--model", "m=tiny", "--judge", f"clip:{no_tokenizer}", "--concepts", str(good)])
    _one_line_exit_2(res, out, "--judge", "no tokenizer")
    res = runner.invoke(app, [*base, "--model", "m=tiny", "--judge", f"clip:{tiny_clip}"])
    _one_line_exit_2(res, out, "needs --concepts")
    res = runner.invoke(app, [*base, "--model", "m=tiny", "--judge", "clip"])
    _one_line_exit_2(res, out, "expected tiny")


def test_tune_judge_bad_input(tmp_path, tiny_clip, sd15):
    out = tmp_path / "sweep"
    base = ["tune", "--space", str(ROOT / "tune_spaces" / "tiny_rho_4.yaml"), "--out", str(out)]
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--set", f"harden.model={sd15}"])
    _one_line_exit_2(res, out, "harden.model", "64-px images")
    no_labels = _write(tmp_path / "no_labels.yaml", {k: v for k, v in GOOD.items() if k != "labels"})
    res = runner.invoke(app, [*base, "--judge", f"clip:{tiny_clip}", "--concepts", str(no_labels)])
    _one_line_exit_2(res, out, "no_labels.yaml", "labels: missing")
    res = runner.invoke(app, [*base, "--judge", f"clip:{sd15 / 'text_encoder'}", "--concepts",
                              str(_write(tmp_path / "good.yaml", GOOD))])
    _one_line_exit_2(res, out, "judge", "not a CLIP model")


def test_evaluate_takes_a_concept_file(tmp_path, tiny_clip, sd15):
    """evaluate --clip DIR --concepts FILE: the concept file's target and other concepts, by the same judge."""
    runner = CliRunner()
    base = ["evaluate", "--run", f"m={sd15}", "--target", "sunset", "--samples", "2", "--steps", "2", "--no-curves",
            "--device", "cpu"]
    concepts = str(ROOT / "concepts" / "tiny_sunset.yaml")
    res = runner.invoke(app, [*base, "--concepts", concepts, "--out", str(tmp_path / "r0")])
    _one_line_exit_2(res, tmp_path / "r0", "--concepts", "needs a local CLIP folder")
    res = runner.invoke(app, [*base[:3], "--target", "dotted", *base[5:], "--clip", str(tiny_clip), "--concepts",
                              concepts, "--out", str(tmp_path / "r1")])
    _one_line_exit_2(res, tmp_path / "r1", "the concept file's name 'sunset'")
    res = runner.invoke(app, [*base, "--clip", str(tiny_clip), "--concepts", concepts, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output + res.stderr
    run = json.loads((tmp_path / "r" / "report.json").read_text())["runs"]["m"]
    assert set(run["other_accuracy"]) == {"style-plain", "style-striped", "style-checkered", "style-dotted"}
    assert 0.0 <= run["target_accuracy"] <= 1.0


def test_tune_space_takes_a_clip_judge(tmp_path, tiny_clip):
    from raystack.judges import TINY
    from raystack.tuning.space import TuneSpace, load_space

    space = load_space(ROOT / "tune_spaces" / "tiny_rho_4.yaml")
    assert space.judge == TINY and space.target_concept == "sunset"
    assert space.judge_spec() == {"kind": "tiny", "target": "sunset"}
    concepts = _write(tmp_path / "c.yaml", GOOD)
    space = load_space(ROOT / "tune_spaces" / "tiny_rho_4.yaml",
                       extra={"judge": f"clip:{tiny_clip}", "concepts": str(concepts), "target_concept": None})
    assert space.target_concept == "star" and space.concepts["path"] == str(concepts.resolve())
    assert space.judge == f"clip:{tiny_clip.resolve()}"  # absolute: trials run in their own folders
    spec = space.judge_spec()
    assert spec["kind"] == "clip" and spec["concepts"]["labels"] == GOOD["labels"]
    again = TuneSpace(**{k: getattr(space, k) for k in space.__dataclass_fields__})  # as a trial rebuilds it
    assert again.judge_spec() == spec
    with pytest.raises(UserError, match="target_concept sunset: the concept file names its target 'star'"):
        load_space(ROOT / "tune_spaces" / "tiny_rho_4.yaml", extra={"judge": f"clip:{tiny_clip}",
                                                                     "concepts": str(concepts)})


# attacker defaults by model family -------------------------------------------------------------------------
def _configs_only(folder: Path, cls: str = "StableDiffusionPipeline", width: int = 320) -> Path:
    """A pipeline folder's configs at a given UNet width (the family is read from them; no weights)."""
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    (folder / "unet" / "config.json").write_text(json.dumps({"block_out_channels": [width, 2 * width, 4 * width]}))
    return folder


def test_attack_defaults_follow_the_model_family(tmp_path, sd15):
    from raystack.attacks.spec import METHOD_DEFAULTS, AttackSpec
    from raystack.models.pipeline_io import default_model_path, model_family

    sd, xl = _configs_only(tmp_path / "sd"), _configs_only(tmp_path / "xl", "StableDiffusionXLPipeline")
    assert [model_family(m) for m in (None, "tiny", default_model_path(), sd15, sd, xl, tmp_path / "nope")] == \
        ["tiny", "tiny", "tiny", "tiny", "sd", "sdxl", "tiny"]
    # the tiny world's defaults, unchanged (bench numbers depend on them), for the tiny world and reduced widths
    for model in (None, sd15):
        lora = AttackSpec(method="lora", data=".", model=model and str(model))
        assert (lora.steps, lora.lr, lora.rank, lora.snr_gamma, lora.noise_offset, lora.batch_size,
                lora.checkpoint_every) == (400, 3e-3, 8, 5.0, 0.1, 4, 50)
        full = AttackSpec(method="full", data=".", model=model and str(model))
        assert (full.steps, full.lr, full.checkpoint_every) == (200, 1e-4, 100)
        assert AttackSpec(method="dreambooth", data=".").prior_preservation is False
    assert METHOD_DEFAULTS["lora"] == {"steps": 400, "lr": 3e-3, "rank": 8, "snr_gamma": 5.0, "noise_offset": 0.1}
    # real SD (and SDXL): what the tools ship
    for model in (sd, xl):
        got = {m: AttackSpec(method=m, data=".", model=str(model), class_prompt="a photo of dog")
               for m in ("lora", "dreambooth", "dreambooth-lora", "textual-inversion", "full")}
        assert (got["lora"].lr, got["lora"].rank, got["lora"].snr_gamma, got["lora"].noise_offset) == (1e-4, 4, 0, 0)
        assert (got["dreambooth"].lr, got["dreambooth"].steps, got["dreambooth"].batch_size) == (5e-6, 800, 1)
        assert got["dreambooth"].prior_preservation and got["dreambooth"].num_class_images == 200
        assert got["textual-inversion"].lr == 5e-4 and got["textual-inversion"].steps == 3000
        assert got["full"].lr == 1e-5 and got["dreambooth-lora"].lr == 1e-4
        assert AttackSpec(method="lora", data=".", model=str(model), lr=3e-4, steps=10).lr == 3e-4  # given wins
    # DreamBooth's class prompt: the instance prompt without the token, as the diffusers example writes it
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a photo of sks dog"}) + "\n")
    assert AttackSpec(method="dreambooth", data=data, model=str(sd)).class_prompt == "a photo of dog"
    assert AttackSpec(method="dreambooth", data=data, model=str(sd), prompt="sks, a toy").class_prompt == "a toy"
    assert not AttackSpec(method="dreambooth", data=data, model=str(sd), prior_preservation=False).prior_preservation
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a photo of a dog"}) + "\n")
    with pytest.raises(UserError, match="--class-prompt, or --no-prior-preservation"):
        AttackSpec(method="dreambooth", data=data, model=str(sd))


def test_the_sd_attack_space_states_its_budget_and_cost():
    from raystack.redteam.space import load_attack_space

    text = (ROOT / "attack_spaces" / "sd.yaml").read_text()
    assert "Budget:" in text and "ESTIMATE" in text and "not measured" in text
    space = load_attack_space(ROOT / "attack_spaces" / "sd.yaml")
    assert space.search["lr"] == {"loguniform": [1e-6, 1e-3]}
    assert min(space.search["rank"]["choice"]) == 4 and max(space.search["rank"]["choice"]) == 128
    assert {"textual-inversion", "dreambooth"} <= set(space.search["method"]["choice"])
    from raystack.judges import load_concept_file
    from raystack.redteam.sweep import concept_word

    prompts = load_concept_file(ROOT / "concepts" / "van_gogh.yaml")["prompts"]
    space.fixed["token"] = "Gogh"  # as the header's command sets it: a word of every target prompt
    assert concept_word(space, "van-gogh", ROOT, prompts=prompts) == "Gogh"


# end to end ------------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.ray
def test_two_trial_red_team_on_an_sd15_shaped_model_judged_by_clip(tmp_path, tiny_clip, sd15, ray_session):
    from raystack.tinyworld.folder import write_concept_folder

    write_concept_folder(tmp_path / "atk", ["circle", "square"], ["red"], ["sunset"], 1, 3, None, False)
    space = _write(tmp_path / "space.yaml", {
        "name": "sd-2", "budget": 2, "search": {"lr": {"choice": [1e-4, 1e-3]}},
        "fixed": {"method": "lora", "steps": 2, "checkpoint_every": 1, "batch_size": 2}, "samples": 2,
        "eval_samples": 2, "other_samples": 1, "eval_steps": 2, "rescore_top": 1, "rescore_limit": 1,
        "rescore_factor": 1, "algorithm": "random", "scheduler": "fifo"})
    out = tmp_path / "rt"
    res = CliRunner().invoke(app, ["redteam", "--space", str(space), "--model", f"sd={sd15}", "--data",
                                   str(tmp_path / "atk"), "--judge", f"clip:{tiny_clip}", "--concepts",
                                   str(ROOT / "concepts" / "tiny_sunset.yaml"), "--out", str(out)])
    assert res.exit_code == 0, res.output + res.stderr
    report = json.loads((out / "redteam.json").read_text())
    assert report["concept"] == "sunset" and report["judge"]["kind"] == "clip"
    assert report["judge"]["clip"] == str(tiny_clip.resolve())
    m = report["models"]["sd"]
    assert 0 <= m["unattacked"]["target"] <= 1 and 0 <= m["unattacked"]["others"] <= 1
    assert len(m["trials"]) == 2 and all(t["status"] == "done" for t in m["trials"])
    assert all(0 <= t["target"] <= 1 and 0 <= t["others"] <= 1 for t in m["trials"])


def test_a_space_without_steps_is_checked_against_the_budget_per_model(tmp_path):
    """On an SD model an attack the space gives no steps takes the SD default (thousands): beyond the budget,
    which the model-free check of the space cannot see."""
    from raystack.redteam.space import AttackSpace, check_budget_for_model

    space = AttackSpace(name="s", budget=1600, search={"lr": {"loguniform": [1e-4, 1e-3]}}, fixed={"method": "lora"})
    check_budget_for_model(space, None, "--model tiny")  # 400 steps on the tiny world
    with pytest.raises(UserError, match="--model sd: a lora attack takes 15000 steps"):
        check_budget_for_model(space, str(_configs_only(tmp_path / "sd")), "--model sd")
    space.fixed["steps"] = 1000
    check_budget_for_model(space, str(tmp_path / "sd"), "--model sd")
