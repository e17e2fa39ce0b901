"""SD-1.5-, SD-2.1- and SDXL-shaped pipelines (published architectures and configurations, random weights, reduced
width and image size: raystack/models/shapes.py): every attack and hardening method runs on them (textual
inversion on SDXL is refused with its reason), the outputs load with plain diffusers, and v-prediction trains on
the v target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raystack.models.shapes import ARCHITECTURES, build_pipeline_folder

ARCHS = sorted(ARCHITECTURES)


def plain_pipeline(arch: str, path):
    """The release loaded by plain diffusers, with the pipeline class its architecture publishes."""
    import diffusers

    cls = getattr(diffusers, ARCHITECTURES[arch].get("pipeline", "StableDiffusionPipeline"))
    extra = {"add_watermarker": False} if arch == "sdxl" else {"safety_checker": None}
    return cls.from_pretrained(str(path), **extra)


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return {a: build_pipeline_folder(a, root / a) for a in ARCHS}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from raystack.tinyworld.folder import write_concept_folder

    d = tmp_path_factory.mktemp("shape-data")
    write_concept_folder(d / "t", ["circle", "square"], ["red"], ["sunset"], 1, 1, None, True)
    write_concept_folder(d / "l", ["cross"], ["blue"], ["striped", "dotted"], 1, 2, None, True)
    return d


@pytest.mark.parametrize("arch", ARCHS)
def test_shaped_pipeline_loads_with_plain_diffusers_and_samples(arch, shaped):
    from raystack.diffusion import resolution_of
    from raystack.models.pipeline_io import load_pipeline
    from raystack.sampling import generate

    plain = plain_pipeline(arch, shaped[arch])
    assert plain.scheduler.config.prediction_type == ARCHITECTURES[arch]["prediction_type"]
    assert plain.unet.config.use_linear_projection == ARCHITECTURES[arch]["unet"]["use_linear_projection"]
    pipe = load_pipeline(shaped[arch])
    assert resolution_of(pipe) == 64
    img = generate(pipe, ["a red circle in plain style"] * 2, steps=2)
    assert img.shape == (2, 64, 64, 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_loss_target_follows_the_prediction_type(arch, shaped):
    """An oracle UNet that predicts the right target exactly (v for SD-2.1, ε for SD-1.5) has zero loss; the
    oracle of the other type does not: v-prediction models train on the v target."""
    from raystack.diffusion import diffusion_loss, train_noise_scheduler
    from raystack.models.pipeline_io import load_pipeline

    pipe = load_pipeline(shaped[arch])
    sched = train_noise_scheduler(pipe)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ac = sched.alphas_cumprod

    class Oracle(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind, self.w = kind, torch.nn.Parameter(torch.zeros(1))

        def forward(self, xt, t, cond):
            a, s = ac[t].sqrt().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
            eps = (xt - a * x0) / s
            out = a * eps - s * x0 if self.kind == "v" else eps
            return type("Out", (), {"sample": out + self.w})()

    cond = torch.zeros(3, 4, 64)
    losses = {k: float(diffusion_loss(Oracle(k), sched, x0, cond, torch.Generator().manual_seed(1),
                                      timesteps=(100, 900)).detach()) for k in ("v", "eps")}
    right = "v" if ARCHITECTURES[arch]["prediction_type"] == "v_prediction" else "eps"
    wrong = "eps" if right == "v" else "v"
    assert losses[right] < 1e-6 < 1e-2 < losses[wrong], losses


@pytest.mark.e2e
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "dreambooth", "dreambooth-lora", "textual-inversion", "full"])
def test_every_attack_runs_and_its_output_loads(arch, method, shaped, data, tmp_path):
    from raystack.attacks.loading import load_attacked_pipeline
    from raystack.attacks.recipe import run_attack
    from raystack.attacks.spec import AttackSpec
    from raystack.sampling import generate

    extra = {"initializer_token": "circle", "token": "zxq", "prompt": "a zxq"} if method == "textual-inversion" else {}
    if method.startswith("dreambooth"):
        extra = {"prompt": "a photo of zxq circle"}
    spec = AttackSpec(method=method, model=str(shaped[arch]), data=data / "t", out=tmp_path / "a", steps=2,
                      checkpoint_every=1, batch_size=2, **extra)
    if arch == "sdxl" and method == "textual-inversion":
        from raystack.errors import UserError

        with pytest.raises(UserError, match="textual-inversion: not built for SDXL"):
            run_attack(spec)
        assert not (tmp_path / "a").exists()
        return
    info = run_attack(spec)
    assert np.isfinite(info["final_loss"])
    pipe, _ = load_attacked_pipeline(tmp_path / "a")
    assert generate(pipe, ["a red circle in sunset style"], steps=2).shape == (1, 64, 64, 3)


@pytest.mark.e2e
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method, extra", [
    ("imma", {"against": "lora"}), ("imma", {"against": "full"}), ("imma", {"against": "textual-inversion"}),
    ("imma", {"against": "lora", "precision": "bf16"}), ("freezeasguard", {"rho": 0.3}),
    ("freezeasguard", {"rho": 0.3, "precision": "bf16"}),
    ("random-freeze", {"rho": 0.3}), ("imma+freeze", {"rho": 0.3}),
    ("uce", {"concept": "sunset", "anchor": "plain"}), ("ablation", {"concept": "sunset", "anchor": "plain"}),
    ("esd-x", {"concept": "sunset", "anchor": "plain"}),
])
def test_every_hardening_method_runs_and_its_release_loads(arch, method, extra, shaped, data, tmp_path):
    """Through `run_harden`'s in-process path (a Tune trial's: the worker's code and the driver's output
    assembly, no Ray Train group), so the release is written and checked as `harden` writes it."""
    from raystack.hardening.driver import run_harden
    from raystack.hardening.spec import HardenSpec

    spec = HardenSpec(method=method, model=str(shaped[arch]), target=[data / "t"], legal=data / "l",
                      out=tmp_path / "h", steps=2, erase_steps=2, checkpoint_every=1, batch_size=2, user_steps=1,
                      finetune_steps=2, workers=1, **extra)
    if arch == "sdxl" and extra.get("against") == "textual-inversion":
        from raystack.errors import UserError
        from raystack.hardening.driver import validate_inputs

        with pytest.raises(UserError, match="textual-inversion: not built for SDXL"):
            validate_inputs(spec)
        return
    manifest = run_harden(spec, in_this_process=True)
    assert manifest["method"] == method
    pipe = plain_pipeline(arch, tmp_path / "h")
    img = pipe("a red circle in plain style", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_sdxl_conditioning_unpacks(shaped):
    """SDXL's packed conditioning: the token states of both encoders, then the pooled projection as one more row;
    the UNet sees the same prediction as when called with diffusers' added conditioning directly."""
    from raystack.diffusion import encode_prompts, unet_predict
    from raystack.models.pipeline_io import load_pipeline

    pipe = load_pipeline(shaped["sdxl"])
    with torch.no_grad():
        cond = encode_prompts(pipe, ["a red circle in sunset style"])
        ids = [tok(["a red circle in sunset style"], padding="max_length", max_length=tok.model_max_length,
                   truncation=True, return_tensors="pt").input_ids for tok in (pipe.tokenizer, pipe.tokenizer_2)]
        out1 = pipe.text_encoder(ids[0], output_hidden_states=True)
        out2 = pipe.text_encoder_2(ids[1], output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        assert torch.equal(cond[:, :-1], hidden)
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([400])
        direct = pipe.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs={
            "text_embeds": out2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}).sample
        assert torch.allclose(unet_predict(pipe.unet, x, t, cond), direct, atol=1e-6)
        other = unet_predict(pipe.unet, x, t, encode_prompts(pipe, ["a blue cross in plain style"]))
        assert not torch.allclose(other, direct, atol=1e-4)  # the prompt matters, so the check above can fail


def test_sdxl_textual_inversion_is_refused_before_the_job(shaped, data, tmp_path):
    from raystack.errors import UserError
    from raystack.hardening.driver import validate_inputs
    from raystack.hardening.spec import HardenSpec

    spec = HardenSpec(method="imma", against="textual-inversion", model=str(shaped["sdxl"]), target=[data / "t"],
                      out=tmp_path / "h")
    with pytest.raises(UserError, match="textual-inversion: not built for SDXL"):
        validate_inputs(spec)
