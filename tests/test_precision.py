"""--precision bf16: the attacks' and the hardening methods' forward passes run in bfloat16 on CPU (torch
autocast), weights and optimizer state stay fp32, losses and results stay finite."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from raystack.tinyworld.folder import write_concept_folder

    d = tmp_path_factory.mktemp("precision")
    write_concept_folder(d / "t", ["circle"], ["red"], ["sunset"], 2, 1, None, False)
    write_concept_folder(d / "l", ["square"], ["blue"], ["striped"], 2, 2, None, False)
    return d


def _watch_dtypes(unet) -> list:
    """dtypes of the first cross-attention query projection's outputs, as the forward passes produce them."""
    seen: list = []
    layer = next(m for n, m in unet.named_modules() if n.endswith("attn2.to_q"))
    layer.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("method", ["lora", "full"])
def test_attack_in_bf16(method, folders, tmp_path):
    from raystack.attacks.recipe import run_attack
    from raystack.attacks.spec import AttackSpec
    from raystack.models.pipeline_io import load_pipeline

    pipe = load_pipeline(None)
    seen = _watch_dtypes(pipe.unet)
    info = run_attack(AttackSpec(method=method, data=folders / "t", out=tmp_path / "a", steps=2, precision="bf16"),
                      pipe=pipe)
    assert seen and set(seen) == {torch.bfloat16}
    assert math.isfinite(info["final_loss"])


@pytest.mark.parametrize("method", ["imma", "freezeasguard"])
def test_hardening_in_bf16(method, folders, tmp_path):
    from raystack.hardening.spec import HardenSpec
    from raystack.hardening.worker import run_method
    from raystack.models.pipeline_io import load_pipeline

    pipe = load_pipeline(None)
    seen = _watch_dtypes(pipe.unet)
    spec = HardenSpec(method=method, target=[folders / "t"], legal=folders / "l", out=tmp_path / "o", steps=2,
                      batch_size=2, user_steps=1, finetune_steps=1, precision="bf16")
    run = run_method(spec, pipe, local=True)
    assert torch.bfloat16 in seen
    assert all(math.isfinite(v) for v in run.losses.values() if isinstance(v, float))
    assert all(torch.isfinite(v).all() for v in run.changed.values())


def test_fp16_and_unknown_precisions_are_refused(folders, tmp_path):
    for argv, expect in (
        (["attack", "--method", "lora", "--data", str(folders / "t"), "--precision", "fp16"], "loss scaling"),
        (["harden", "--target", str(folders / "t"), "--precision", "fp16"], "loss scaling"),
        (["attack", "--method", "lora", "--data", str(folders / "t"), "--precision", "int8"], "--precision int8"),
    ):
        res = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and expect in res.stderr and not (tmp_path / "o").exists(), res.stderr


@pytest.mark.e2e
@pytest.mark.ray
def test_bf16_harden_through_ray_and_deepspeed(folders, tmp_path, ray_session):
    from raystack.hardening.driver import run_harden
    from raystack.hardening.spec import HardenSpec

    manifest = run_harden(HardenSpec(method="imma", target=[folders / "t"], out=tmp_path / "o", steps=2,
                                     batch_size=2, workers=1, precision="bf16"))
    assert manifest["spec"]["precision"] == "bf16" and manifest["changed_tensors"]
    assert all(math.isfinite(v) for v in manifest["final_losses"].values() if isinstance(v, float))


def test_gradient_checkpointing_trains_the_same_weights(folders, tmp_path):
    """--gradient-checkpointing recomputes activations in the backward pass: it is on in the UNet, and an attack
    and an IMMA run (the worker's pipeline load, through the in-process harden path) end where they end
    without it."""
    from raystack.attacks.recipe import run_attack
    from raystack.attacks.spec import AttackSpec
    from raystack.hardening.driver import run_harden
    from raystack.hardening.spec import HardenSpec
    from raystack.models.pipeline_io import load_pipeline
    from safetensors.torch import load_file

    losses, pipes = {}, {}
    for on in (False, True):
        pipes[on] = load_pipeline(None)
        losses[on] = run_attack(AttackSpec(method="full", data=folders / "t", out=tmp_path / f"a{on}", steps=3,
                                           gradient_checkpointing=on), pipe=pipes[on])["final_loss"]
    assert pipes[True].unet.is_gradient_checkpointing and not pipes[False].unet.is_gradient_checkpointing
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    weights = {}
    for on in (False, True):
        run_harden(HardenSpec(method="imma", target=[folders / "t"], out=tmp_path / f"h{on}", steps=2, batch_size=2,
                              workers=1, gradient_checkpointing=on), in_this_process=True)
        weights[on] = load_file(str(tmp_path / f"h{on}" / "unet" / "diffusion_pytorch_model.safetensors"))
    worst = max(float((weights[True][k] - weights[False][k]).abs().max()) for k in weights[False])
    assert worst <= 1e-5
