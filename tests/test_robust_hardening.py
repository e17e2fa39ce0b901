"""Robust hardening (--attacker-space): IMMA's simulated attacker drawn from an attack space, a pool of
persistent attackers; seeded, resumable, dense attackers kept apart from the release."""

from __future__ import annotations

import pytest
import torch

SPACE = """name: inner
budget: 6
search:
  method: {choice: [lora, full]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
  steps: {choice: [2, 3]}
  rank: {choice: [2, 4]}
  optimizer: {choice: [adamw, adafactor]}
fixed: {cross_attention_only: true}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from raystack.tinyworld.folder import write_concept_folder

    d = tmp_path_factory.mktemp("robust")
    write_concept_folder(d / "t", ["circle"], ["red"], ["sunset"], 2, 1, None, False)
    write_concept_folder(d / "l", ["square"], ["blue"], ["striped", "plain"], 1, 2, None, False)
    (d / "space.yaml").write_text(SPACE)
    (d / "ti.yaml").write_text(SPACE.replace("[lora, full]", "[lora, textual-inversion]"))
    (d / "ti_only.yaml").write_text(SPACE.replace("[lora, full]", "[textual-inversion]"))
    return d


def _spec(world, **kw):
    from raystack.hardening.spec import HardenSpec

    base = dict(method="imma", target=[world / "t"], legal=world / "l", out=world / "o", batch_size=2,
                retain_weight=1.0, attacker_space=world / "space.yaml", attacker_pool=3, steps=6,
                checkpoint_every=2, seed=3)
    return HardenSpec(**{**base, **kw})


def test_pool_is_drawn_with_the_seed_and_turns_depend_on_seed_and_iteration_only(world):
    from raystack.hardening.attacker_pool import AttackerPool, describe, draw_pool

    a, b, c = draw_pool(_spec(world)), draw_pool(_spec(world)), draw_pool(_spec(world, seed=4))
    assert [describe(x) for x in a] == [describe(x) for x in b]
    assert [describe(x) for x in a] != [describe(x) for x in c]
    assert {x.method for x in a} <= {"lora", "full"} and all(x.cross_attention_only for x in a)
    p, q = AttackerPool(a, 0.0, 3), AttackerPool(b, 0.0, 3)
    assert [p.choose(i) for i in range(20)] == [q.choose(i) for i in range(20)]
    assert len({p.choose(i)[0] for i in range(20)}) == 3  # every member gets turns
    q.members[0].steps_taken = q.members[0].attack.steps  # a member at its horizon restarts on its next turn
    turn = next(i for i in range(50) if q.choose(i)[0] == 0)
    assert q.choose(turn) == (0, True)
    always = AttackerPool(a, 1.0, 3)
    always.members[1].steps_taken = 1
    assert always.choose(next(i for i in range(50) if always.choose(i)[0] == 1))[1]


def test_dense_attacker_is_kept_apart_from_the_release(world):
    """A full fine-tune member's steps never stay in θ: after its turn only S (attn2) moved, by the outer step,
    and its displacement is kept for its next turn."""
    from raystack.hardening.imma import IMMARecipe
    from raystack.hardening.method import LocalEngine
    from raystack.models.pipeline_io import load_pipeline

    r = IMMARecipe(_spec(world), load_pipeline(None))
    r.bind(LocalEngine(r))
    full = next(i for i, m in enumerate(r.pool.members) if m.attack.method == "full")
    before = {n: p.detach().clone() for n, p in r.pipe.unet.named_parameters()}
    r.pool.iteration = next(i for i in range(100) if r.pool.choose(i)[0] == full)
    stats = r.step()
    assert stats["attacker"] == full
    after = dict(r.pipe.unet.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and moved <= set(r.S)  # the attacker trained attn2 (cross_attention_only) too, yet only S moved
    delta = r.pool.members[full].phi
    assert sum(float(d.abs().sum()) for d in delta.values()) > 0


def _run(spec, resume=({}, {})):
    from raystack.hardening.worker import run_method
    from raystack.models.pipeline_io import load_pipeline

    checkpoints = []

    def keep(phase, engine, meta, carried):
        t = {f"state/{k}": v.clone() for k, v in phase.state().items()}
        t.update(engine.optimizer_state())
        checkpoints.append((t, meta))

    run = run_method(spec, load_pipeline(None), local=True, resume=resume, on_checkpoint=keep)
    return run, checkpoints


def test_resumed_run_equals_the_uninterrupted_one(world):
    spec = _spec(world, attacker_restart=0.3)
    run, checkpoints = _run(spec)
    assert [m["step"] for _, m in checkpoints] == [2, 4]
    again, _ = _run(spec, resume=checkpoints[0])
    assert again.resumed_from == {"phase": "imma", "step": 2}
    assert set(again.changed) == set(run.changed) and run.changed
    assert all(k.split(".")[-2] != "lora_A" for k in run.changed)
    worst = max(float((again.changed[k] - run.changed[k]).abs().max()) for k in run.changed)
    assert worst <= 1e-6
    other, _ = _run(_spec(world, attacker_restart=0.3, seed=4))
    assert max(float((other.changed[k] - run.changed[k]).abs().max()) for k in run.changed) > 1e-4


@pytest.mark.parametrize("kw, says", [
    (dict(attacker_space="nope.yaml"), "--attacker-space nope.yaml: no such file"),
    (dict(method="random-freeze"), "simulates no attacker"),
    (dict(method="freezeasguard", attackers_per_step=4), "--attackers-per-step 4: more than the --attacker-pool of 3"),
    (dict(inner_lr=1e-3), "leave --inner-lr"),
    (dict(attacker_pool=0), "--attacker-pool 0"),
    (dict(attacker_restart=1.5), "--attacker-restart 1.5"),
])
def test_bad_attacker_space_settings_are_refused(world, kw, says):
    from raystack.errors import UserError

    with pytest.raises(UserError, match=says.replace("+", r"\+")):
        _spec(world, **kw)


def test_the_pool_draws_the_methods_it_can_simulate_and_refuses_a_space_of_none(world):
    """Textual inversion leaves the UNet as it is and grows the tokenizer: the pool draws a space's other
    methods (the red team judges TI), and a space that offers nothing else is refused."""
    from raystack.errors import UserError
    from raystack.hardening.attacker_pool import draw_pool

    assert {a.method for a in draw_pool(_spec(world, attacker_space=world / "ti.yaml"))} == {"lora"}
    with pytest.raises(UserError, match="method textual-inversion cannot be simulated"):
        _spec(world, attacker_space=world / "ti_only.yaml")


def _fag(world, **kw):
    from raystack.hardening.freezeasguard import FreezeAsGuardRecipe
    from raystack.hardening.method import LocalEngine
    from raystack.models.pipeline_io import load_pipeline

    r = FreezeAsGuardRecipe(_spec(world, method="freezeasguard", finetune_steps=3, user_steps=2, **kw),
                            load_pipeline(None))
    r.bind(LocalEngine(r))
    return r


def test_freezeasguard_mask_step_with_two_drawn_users_is_the_average_of_their_single_gradients(world):
    """The mask step with two simulated users applies the mean of the two single-user mask gradients (each
    user's turn replayed from the same state and generator draws)."""
    r = _fag(world, attackers_per_step=2)
    r.prepare()
    start = {k: v.clone() for k, v in r.state().items()}
    w0 = r.mask_module.w.detach().clone()
    turns = r.pool.choose_many(0, 2)
    assert len({k for k, _ in turns}) == 2
    r.step()
    applied = (w0 - r.mask_module.w.detach()) / r.spec.mask_lr  # SGD: w − η1 · gradient

    replay = _fag(world, attackers_per_step=2)
    replay.load_state(start)
    m = replay.mask()
    grads = []
    for k, restart in turns:
        c, _ = replay.member_couplings(k, restart, m)
        w = replay.mask_module.w
        w.grad = None
        replay.mask_module(c, replay.spec.rho, replay.spec.temperature).backward()
        grads.append(w.grad.detach().clone())
    assert not torch.allclose(grads[0], grads[1])  # two different users, so the check below can fail
    assert torch.allclose(applied, (grads[0] + grads[1]) / 2, rtol=1e-4, atol=1e-9)


def test_freezeasguard_pool_resumes_exactly(world):
    spec = _spec(world, method="freezeasguard", finetune_steps=3, user_steps=2, attackers_per_step=2,
                 attacker_restart=0.3)
    run, checkpoints = _run(spec)
    again, _ = _run(spec, resume=checkpoints[0])
    assert again.mask == run.mask
    r = _fag(world, attackers_per_step=2, attacker_restart=0.3)
    r.prepare()
    for _ in range(4):
        r.step()
    logits = r.state()["mask/logits"]
    r2 = _fag(world, attackers_per_step=2, attacker_restart=0.3)
    r2.prepare()
    for _ in range(2):
        r2.step()
    saved = {k: v.clone() for k, v in r2.state().items()}
    r3 = _fag(world, attackers_per_step=2, attacker_restart=0.3)
    r3.load_state(saved)
    for _ in range(2):
        r3.step()
    assert float((r3.state()["mask/logits"] - logits).abs().max()) <= 1e-6
    assert float((logits - saved["mask/logits"]).abs().max()) > 1e-6  # the mask moved, so the check can fail


def test_tune_searches_the_hardening_attacker_space_as_absolute_paths():
    """The attacker distribution's width is a tune setting; trials run in their own folders, so the files are
    resolved when the space is read, and a trial's label names the space, not its path."""
    from pathlib import Path

    from raystack.tuning.space import load_space
    from raystack.tuning.sweep import setting_label

    root = Path(__file__).resolve().parents[1]
    space = load_space(root / "tune_spaces" / "imma_robust_worst_case.yaml")
    values = space.search["attacker_space"]["grid"]
    assert values[0] is None and all(Path(v).is_absolute() and Path(v).is_file() for v in values[1:])
    assert setting_label({"attacker_space": values[2], "outer_lr": 1e-3}) == "attacker_space=default, outer_lr=0.001"
    assert setting_label({"attacker_space": None}) == "attacker_space=none"


@pytest.mark.e2e
@pytest.mark.ray
def test_tune_sweeps_the_hardening_attacker_space(tmp_path):
    """Two trials through the real `tune`: IMMA against its one LoRA attacker, and against a pool drawn from an
    attack space; both harden, get attacked and scored, and the pool's trial records its space."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    space = yaml.safe_load((root / "tune_spaces" / "tiny_rho_4.yaml").read_text())
    space.update({"name": "robust-2", "harden": {"method": "imma", "steps": 2, "batch_size": 2, "workers": 1},
                  "search": {"attacker_space": {"grid": [None, str(root / "attack_spaces" / "tiny_4.yaml")]}},
                  "attacks": [{"method": "lora", "steps": 20, "checkpoint_every": 20, "batch_size": 2}]})
    space.pop("legal_finetune")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    cli = str(Path(sys.executable).parent / "immunize-cli")
    res = subprocess.run([cli, "tune", "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "o")],
                         cwd=root, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    trials = json.loads((tmp_path / "o" / "results.json").read_text())["trials"]
    assert sorted(str(t["setting"]["attacker_space"]) for t in trials) == sorted(
        ["None", str((root / "attack_spaces" / "tiny_4.yaml").resolve())])
    assert all(t["status"] == "done" and t["mitigation"] is not None for t in trials)
