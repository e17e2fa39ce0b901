"""The hardening-method interface: a new method is one class plus its registration, and the worker's loop
(`run_method`) prepares, steps, checkpoints, resumes and releases it like the shipped ones."""

import pytest
import torch

from raystack.hardening.method import HardeningPhase, PhaseResult
from raystack.hardening.methods import method_names, method_phases, register_method
from raystack.hardening.spec import HardenSpec
from raystack.hardening.worker import run_method
from raystack.tinyworld.folder import write_concept_folder


class ShiftConvIn(HardeningPhase):
    """A toy method: learn an offset of conv_in's bias towards 1 (its own engine parameter, its own state)."""

    name = "toy-shift"
    needs_target = False

    def __init__(self, spec, pipe, rank=0, world=1):
        super().__init__(spec, pipe, rank, world)
        self.delta = torch.nn.ParameterDict({"d": torch.nn.Parameter(torch.zeros(pipe.unet.conv_in.bias.shape))})
        self.generator = torch.Generator().manual_seed(spec.seed)

    def engine_module(self):
        return self.delta

    def engine_params(self):
        return list(self.delta.parameters())

    def make_optimizer(self):
        return torch.optim.SGD(self.engine_params(), lr=0.25)

    def step(self):
        noise = 0.01 * torch.randn(self.delta["d"].shape, generator=self.generator)
        loss = ((self.delta["d"] - 1.0 + noise) ** 2).sum()
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": float(loss.detach())}

    def state(self):
        return {"delta": self.delta["d"].detach().clone(), "rng/generator": self.generator.get_state()}

    def load_state(self, tensors):
        with torch.no_grad():
            self.delta["d"].copy_(tensors["delta"])
        self.generator.set_state(tensors["rng/generator"])

    def result(self):
        return PhaseResult(changed={"conv_in.bias": self.pipe.unet.conv_in.bias.detach() + self.delta["d"].detach()})


register_method("toy-shift", ShiftConvIn)


def test_a_new_method_is_one_class_plus_its_registration(tiny_pipe, tmp_path):
    assert "toy-shift" in method_names()
    spec = HardenSpec(method="toy-shift", out=tmp_path / "o", steps=6, checkpoint_every=2)
    checkpoints = []
    run = run_method(spec, tiny_pipe, local=True,
                     on_checkpoint=lambda phase, engine, meta, carried: checkpoints.append(
                         ({f"state/{k}": v for k, v in phase.state().items()}, meta)))
    shifted = run.changed["conv_in.bias"] - tiny_pipe.unet.conv_in.bias.detach()
    assert torch.all((shifted - 1.0).abs() < 0.05) and run.mask is None
    assert [m["step"] for _, m in checkpoints] == [2, 4]
    # resumed from the step-4 checkpoint it ends where the uninterrupted run ended
    again = run_method(spec, tiny_pipe, local=True, resume=checkpoints[1])
    assert again.resumed_from == {"phase": "toy-shift", "step": 4}
    assert torch.equal(again.changed["conv_in.bias"], run.changed["conv_in.bias"])


def test_shipped_methods_are_compositions_of_phases():
    names = {m: [p.name for p in method_phases(m)] for m in method_names()}
    assert names["imma+freeze"] == ["imma", "freezeasguard"]
    assert names["imma"] == ["imma"] and names["freezeasguard"] == ["freezeasguard"]
    assert names["random-freeze"] == ["random-freeze"]
    assert not method_phases("imma")[0].supports_zero3 and method_phases("freezeasguard")[0].needs_legal


def test_imma_then_freeze_in_one_process(tmp_path):
    """The two-phase method through the same loop the Ray worker runs: IMMA's tensors are carried into the
    FreezeAsGuard phase and released with its mask."""
    from raystack.models.pipeline_io import load_pipeline

    write_concept_folder(tmp_path / "t", ["circle"], ["red"], ["sunset"], 2, 1, None, False)
    write_concept_folder(tmp_path / "l", ["square"], ["blue"], ["striped"], 2, 2, None, False)
    pipe = load_pipeline(None)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    spec = HardenSpec(method="imma+freeze", target=[tmp_path / "t"], legal=tmp_path / "l", out=tmp_path / "o",
                      steps=2, batch_size=2, user_steps=1, finetune_steps=1, rho=0.3)
    seen = []
    run = run_method(spec, pipe, local=True, on_step=lambda phase, done, losses: seen.append((phase.name, done)))
    assert seen == [("imma", 1), ("imma", 2), ("freezeasguard", 1), ("freezeasguard", 2)]
    assert run.changed and all(".attn2." in k for k in run.changed)
    assert any(not torch.equal(before[k], v) for k, v in run.changed.items())
    assert set(run.mask) == set(before) and abs(sum(run.mask.values()) / len(before) - 0.3) < 0.02


def test_unknown_method_names_the_registered_ones(tmp_path):
    from raystack.errors import UserError

    with pytest.raises(UserError, match=r"expected one of .*imma, freezeasguard, random-freeze, imma\+freeze"):
        HardenSpec(method="nope", out=tmp_path / "o")
