"""`erase`: UCE, ESD-x and concept ablation as phases of the method interface, alone or before hardening."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from raystack.hardening.spec import HardenSpec
from raystack.hardening.worker import run_method


@pytest.fixture(scope="module")
def dotted(tmp_path_factory):
    """The trained style `dotted` (the model draws it) to erase, and three other styles to keep."""
    from raystack.tinyworld.folder import write_concept_folder

    d = tmp_path_factory.mktemp("erase")
    write_concept_folder(d / "t", None, None, ["dotted"], 2, 1, None, True)
    write_concept_folder(d / "l", None, None, ["striped", "checkered", "plain"], 1, 2, None, True)
    return d


def _spec(d, method, **kw):
    return HardenSpec(method=method, concept="dotted", anchor="plain", target=[d / "t"], legal=d / "l",
                      out=d / "o", batch_size=8, **kw)


def _scores(pipe, judge):
    from raystack.evaluation import other_concepts_accuracy, sampled_accuracy, tiny_world_target

    concept, _ = tiny_world_target("dotted")
    return (sampled_accuracy(pipe, concept.prompts, concept.criterion, 16, judge, seed=0, steps=15),
            other_concepts_accuracy(pipe, "dotted", 4, judge, steps=15))


@pytest.mark.parametrize("method, kw", [("uce", {}), ("ablation", {"erase_steps": 40}), ("esd-x", {"erase_steps": 30})])
def test_erasure_takes_the_style_out_and_keeps_the_others(method, kw, dotted, judge):
    """Measured: dotted 87.5% before; UCE 0.0% (others 1.00), ablation after 40 steps 6.2% (others 0.96), ESD-x
    (guided away from the anchor caption) after 30 steps 0.0% (others 0.96)."""
    from raystack.models.pipeline_io import load_pipeline

    pipe = load_pipeline(None)
    before_target, before_others = _scores(pipe, judge)
    assert before_target >= 0.6  # the model knows the style
    run = run_method(_spec(dotted, method, **kw), pipe, local=True)
    assert run.changed and all(".attn2." in k for k in run.changed)
    target, others = _scores(pipe, judge)
    assert target <= 0.25 and others >= 0.8 * before_others, (target, others, before_others)


def test_uce_maps_the_concept_where_the_anchor_was_and_keeps_preserved_captions(dotted):
    from raystack.diffusion import encode_text
    from raystack.hardening.erase import UCEPhase
    from raystack.models.pipeline_io import load_pipeline

    pipe = load_pipeline(None)
    phase = UCEPhase(_spec(dotted, "uce"), pipe)
    w0 = {n: m.weight.detach().clone() for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_k")}

    def emb(captions):
        with torch.no_grad():
            return encode_text(pipe.text_encoder, pipe.tokenizer, captions).reshape(-1, w0[next(iter(w0))].shape[1])

    c, a, p = emb(phase.captions), emb(phase.anchors), emb(phase.preserve)
    phase.step()
    mods = dict(pipe.unet.named_modules())
    for name, w in w0.items():
        new = mods[name].weight.detach()
        before = (c @ w.T - a @ w.T).norm() / (a @ w.T).norm()
        after = (c @ new.T - a @ w.T).norm() / (a @ w.T).norm()
        kept = (p @ new.T - p @ w.T).norm() / (p @ w.T).norm()
        assert after < 0.3 * before and kept < 0.1, (name, float(before), float(after), float(kept))


def test_uce_closed_form_on_a_hand_computed_case():
    """W = I (2×2), concept c = e1, anchor a = e2, ridge λ: W' = (W a cᵀ + λW)(c cᵀ + λI)⁻¹
    = [[λ/(1+λ), 0], [1/(1+λ), 1]] — W' c moves from c towards W a = e2 as λ → 0, and e2 (orthogonal to c) is
    kept. With e2 preserved at scale s, W' e2 = e2 stays exact, and a preserved p = c pulls W' c back to c."""
    from raystack.hardening.erase import uce_edit

    w, c, a = torch.eye(2, dtype=torch.float64), torch.tensor([[1.0, 0.0]], dtype=torch.float64), \
        torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    lam = 0.1
    expect = torch.tensor([[lam / (1 + lam), 0.0], [1 / (1 + lam), 1.0]], dtype=torch.float64)
    assert torch.allclose(uce_edit(w, c, a, ridge=lam), expect)
    assert torch.allclose(uce_edit(w, c, a, preserve=a, scale=5.0, ridge=lam), expect)  # e2 ⟂ c: no conflict
    # preserving c itself with weight s: W' c = (W a + s c + λ c) / (1 + s + λ), by hand
    s = 3.0
    got = uce_edit(w, c, a, preserve=c, scale=s, ridge=lam) @ c[0]
    assert torch.allclose(got, torch.tensor([(s + lam) / (1 + s + lam), 1 / (1 + s + lam)], dtype=torch.float64))


def test_several_concepts_are_drawn_in_balance():
    """A multi-concept hardening draws each --target folder (concept) equally often, however many images each
    has; one folder keeps the plain uniform draw (so single-concept runs are unchanged)."""
    from raystack.hardening.data import Shard

    g = torch.Generator().manual_seed(0)
    big_and_small = Shard(bank=[0] * 32, captions=[""] * 32, total=32, groups=[0] * 30 + [1] * 2)
    idx = big_and_small.draw(4000, g)
    share_small = float((idx >= 30).float().mean())
    assert 0.45 < share_small < 0.55, share_small
    assert set(idx[idx >= 30].tolist()) == {30, 31}
    one = Shard(bank=[0] * 32, captions=[""] * 32, total=32)
    assert torch.equal(one.draw(8, torch.Generator().manual_seed(1)),
                       torch.randint(0, 32, (8,), generator=torch.Generator().manual_seed(1)))


def test_trained_erasure_resumes_exactly(dotted):
    from raystack.models.pipeline_io import load_pipeline

    spec = _spec(dotted, "esd-x", erase_steps=4, checkpoint_every=2)
    checkpoints = []
    run = run_method(spec, load_pipeline(None), local=True,
                     on_checkpoint=lambda phase, engine, meta, carried: checkpoints.append(
                         ({**{f"state/{k}": v for k, v in phase.state().items()}, **engine.optimizer_state()}, meta)))
    assert [m["step"] for _, m in checkpoints] == [2]
    again = run_method(spec, load_pipeline(None), local=True, resume=checkpoints[0])
    assert again.resumed_from == {"phase": "esd-x", "step": 2}
    assert all(torch.allclose(run.changed[k], again.changed[k], atol=1e-6) for k in run.changed)


@pytest.mark.parametrize("neutral", ["anchor", "empty"])
def test_esd_goal_guides_away_from_the_neutral_prediction(neutral, tiny_pipe):
    """ε(x, n) − η (ε(x, c) − ε(x, n)), n the anchor caption (default) or the empty prompt (the paper's)."""
    from raystack.diffusion import FrozenTextCache, unet_predict
    from raystack.hardening.erase import ESDxPhase

    phase = object.__new__(ESDxPhase)  # the goal alone: the teacher, the text cache and the spec
    phase.teacher, phase.text = tiny_pipe.unet, FrozenTextCache(tiny_pipe)
    phase.spec = HardenSpec(method="esd-x", concept="dotted", anchor="plain", target=[Path(".")], esd_guidance=2.0,
                            esd_neutral=neutral)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    caps, anchors = ["a red circle in dotted style"] * 2, ["a red circle in plain style"] * 2
    with torch.no_grad():
        goal = phase.goal(x, t, caps, anchors)
        n = unet_predict(tiny_pipe.unet, x, t, phase.text(anchors if neutral == "anchor" else ["", ""]))
        c = unet_predict(tiny_pipe.unet, x, t, phase.text(caps))
    assert torch.allclose(goal, n - 2.0 * (c - n), atol=1e-6)


def test_hold_erasure_descends_the_anchor_goal_at_the_attackers_point(dotted):
    """--imma-objective hold-erasure: the outer step, taken with the simulated attacker's adapter on, lowers the
    gap between the concept caption's prediction and the input model's anchor-caption prediction; the goal comes
    from a frozen copy of the input (no adapter in it), and the retain term still targets data."""
    from raystack.hardening.imma import IMMARecipe
    from raystack.hardening.method import LocalEngine
    from raystack.models.pipeline_io import load_pipeline

    spec = _spec(dotted, "imma", against="lora", imma_objective="hold-erasure", retain_weight=1.0, outer_lr=1e-3)
    r = IMMARecipe(spec, load_pipeline(None))
    r.bind(LocalEngine(r))
    assert not any(".lora_" in n for n, _ in r.teacher.named_parameters())
    assert all("dotted" in c and "plain" in a and "dotted" not in a for c, a in zip(r.target.captions, r.target_anchors))
    with torch.no_grad():
        for p in r.ad.parameters():  # an adapted point: the attacker's LoRA away from zero
            p.normal_(0.0, 0.2)
    for p in r.ad.parameters():
        p.requires_grad_(False)
    state = r.generator.get_state()
    before = r.held_erasure_loss().detach()
    r.generator.set_state(state)
    assert torch.allclose(r.outer_value().detach(), -before)  # outer_value is what the outer step ascends
    r.generator.set_state(state)
    r.engine.backward(-r.outer_value())
    r.engine.step()
    r.generator.set_state(state)
    with torch.no_grad():
        after = r.held_erasure_loss()
    assert float(after) < float(before) - 1e-6, (float(before), float(after))
    with torch.no_grad():
        assert float(r.retain_loss()) > 1e-3  # --retain-target data: against the noise, not the teacher


def test_erase_bad_input(dotted, tmp_path):
    from raystack.tinyworld.folder import write_concept_folder

    write_concept_folder(tmp_path / "other", None, None, ["striped"], 1, 0, None, True)
    base = ["--target", str(dotted / "t"), "--legal", str(dotted / "l"), "--out", str(tmp_path / "o")]
    rows = [
        (["erase", "--method", "imma", "--concept", "dotted", *base], "erase runs one of"),
        (["erase", "--method", "uce", *base], "--concept"),
        (["harden", "--erase", "nope", "--concept", "dotted", *base], "--erase nope"),
        (["erase", "--method", "ablation", "--concept", "dotted", "--target", str(tmp_path / "other"),
          "--out", str(tmp_path / "o")], "does not name the concept"),
        (["erase", "--method", "esd-x", "--concept", "dotted", "--esd-guidance", "0", *base], "--esd-guidance 0"),
        (["erase", "--method", "esd-x", "--concept", "dotted", "--esd-neutral", "none", *base], "--esd-neutral none"),
        (["harden", "--erase", "uce", "--method", "ablation", "--concept", "dotted", *base], "two erasures"),
        (["erase", "--method", "uce", "--concept", "dotted", "--anchor", "", *base], "as many tokens"),
        (["harden", "--method", "imma", "--imma-objective", "hold-erasure", *base], "--imma-objective hold-erasure"),
        (["harden", "--method", "imma", "--imma-objective", "nope", "--concept", "dotted", *base],
         "--imma-objective nope"),
        (["harden", "--method", "imma", "--imma-objective", "hold-erasure", "--concept", "dotted", "--target",
          str(tmp_path / "other"), "--legal", str(dotted / "l"), "--out", str(tmp_path / "o")], "does not name the concept"),
        (["erase", "--method", "ablation", "--concept", "dotted", "--zero-stage", "3", *base],
         "--zero-stage 3: ablation reads the trained cross-attention weights whole"),
    ]
    for argv, expect in rows:
        res = CliRunner().invoke(app, argv)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and expect in lines[0], (argv[:3], res.stderr)
        assert not (tmp_path / "o").exists()


@pytest.mark.e2e
@pytest.mark.ray
def test_erase_then_harden_in_one_job(dotted, tmp_path, ray_session):
    """`erase` as a Ray Train job, and `harden --erase` running the erasure before IMMA in the same job (IMMA
    holding the erasure under its simulated attacker, `--imma-objective hold-erasure`)."""
    res = CliRunner().invoke(app, ["erase", "--method", "uce", "--concept", "dotted", "--anchor", "plain",
                                   "--target", str(dotted / "t"), "--legal", str(dotted / "l"), "--out",
                                   str(tmp_path / "erased")])
    assert res.exit_code == 0, res.output + res.stderr
    m = json.loads((tmp_path / "erased" / "manifest.json").read_text())
    assert m["erase"] == {"method": "uce", "concept": ["dotted"], "anchor": "plain", "steps": None}
    assert m["changed_tensors"] and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
                                        for k in m["changed_tensors"])
    res = CliRunner().invoke(app, ["harden", "--erase", "ablation", "--erase-steps", "2", "--method", "imma",
                                   "--steps", "2", "--concept", "dotted", "--anchor", "plain", "--batch-size", "2",
                                   "--imma-objective", "hold-erasure",
                                   "--target", str(dotted / "t"), "--legal", str(dotted / "l"), "--out",
                                   str(tmp_path / "both")])
    assert res.exit_code == 0, res.output + res.stderr
    m = json.loads((tmp_path / "both" / "manifest.json").read_text())
    assert m["erase"]["method"] == "ablation" and m["method"] == "imma"
    assert m["spec"]["imma_objective"] == "hold-erasure" and m["final_losses"]["outer_loss"] < 0  # −(held gap)
    info = json.loads((tmp_path / "both" / "immunize_info.json").read_text())["hardening"]
    assert info["erase"]["concept"] == ["dotted"]
