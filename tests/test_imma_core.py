"""IMMA's loop body on a toy model: warm start (line 5), overlap copy (line 7), ascent."""

import pytest
import torch

from raystack.hardening.imma import imma_iteration


class TorchOuter:
    """An outer Adam on bare tensors for `imma_iteration` (the product binds a phase to its engine instead)."""

    def __init__(self, params, lr: float):
        self.params = list(params)
        self.opt = torch.optim.Adam(self.params, lr=lr)

    def backward(self, loss) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> None:
        self.opt.step()


class ToyAdapter:
    """φ apart from θ (like LoRA/TI): its value is carried between iterations."""

    def __init__(self, phi):
        self.phi = phi

    def parameters(self):
        return [self.phi]

    def warm_state(self):
        return {"phi": self.phi.detach().clone()}

    def load_warm_state(self, s):
        if s:
            with torch.no_grad():
                self.phi.copy_(s["phi"])

    def after_step(self):
        pass


class ToyOverlap(ToyAdapter):
    """φ is θ itself (like DreamBooth): nothing is kept apart."""

    def warm_state(self):
        return {}


def test_warm_start_continues_from_previous_phi():
    a = torch.tensor([1.0, -2.0, 3.0])
    phi = torch.nn.Parameter(torch.zeros(3))
    theta = torch.nn.Parameter(torch.ones(3))
    ad = ToyAdapter(phi)
    inner = lambda: ((phi - a) ** 2).sum()  # noqa: E731  ∇ = 2(φ − a)
    outer = lambda: ((theta * phi - a) ** 2).sum()  # noqa: E731
    opt = TorchOuter([theta], lr=0.01)
    beta = 0.1
    phi1, _ = imma_iteration(ad, None, inner, outer, opt, [theta], inner_lr=beta)
    assert torch.allclose(phi1["phi"], 0 - beta * 2 * (0 - a))
    with torch.no_grad():
        phi.fill_(99.0)  # anything done to φ in between must not matter
    phi2, _ = imma_iteration(ad, phi1, inner, outer, opt, [theta], inner_lr=beta)
    expected = phi1["phi"] - beta * 2 * (phi1["phi"] - a)
    assert torch.allclose(phi2["phi"], expected)


def test_overlap_outer_gradient_sees_phi_written_into_theta():
    a = torch.tensor([0.5, 0.5])
    theta = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    ad = ToyOverlap(theta)
    seen = {}

    def outer():
        seen["theta"] = theta.detach().clone()
        return ((theta - a) ** 2).sum()

    start = theta.detach().clone()
    beta = 0.25
    phi_next, _ = imma_iteration(ad, None, lambda: ((theta - a) ** 2).sum(), outer, TorchOuter([theta], lr=0.1),
                                 [theta], inner_lr=beta)
    phi_i = start - beta * 2 * (start - a)
    assert torch.allclose(seen["theta"], phi_i)  # θ[U] ← φ^i before the outer gradient
    assert phi_next == {}
    assert not torch.allclose(theta.detach(), phi_i)  # and the outer step moved θ[S] on from there


def test_outer_step_ascends_the_attack_loss():
    torch.manual_seed(0)
    a = torch.randn(4)
    phi = torch.nn.Parameter(torch.zeros(4))
    theta = torch.nn.Parameter(torch.randn(4))
    ad = ToyAdapter(phi)
    outer = lambda: ((theta + phi - a) ** 2).sum()  # noqa: E731
    state, opt = None, TorchOuter([theta], lr=0.05)
    for _ in range(5):
        state, stats = imma_iteration(ad, state, lambda: ((theta.detach() + phi - a) ** 2).sum(), outer, opt,
                                      [theta], inner_lr=0.1)
        with torch.no_grad():
            after = float(outer())  # same φ, θ after the outer step
        assert after > stats["outer_loss"]
    assert not phi.requires_grad and theta.requires_grad


def test_retain_term_enters_the_outer_gradient_with_its_weight():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.5])
    phi = torch.nn.Parameter(torch.zeros(2))
    theta = torch.nn.Parameter(torch.tensor([0.3, -0.7]))
    ad = ToyAdapter(phi)
    captured = {}

    class Capture(TorchOuter):
        def step(self):
            captured["grad"] = theta.grad.detach().clone()

    w = 0.5
    outer = lambda: (((theta + phi - a) ** 2).sum(), ((theta - b) ** 2).sum())  # noqa: E731
    _, stats = imma_iteration(ad, None, lambda: ((phi - a) ** 2).sum(), outer, Capture([theta], lr=0.1), [theta],
                              inner_lr=0.1, retain_weight=w)
    phi_i = 0.1 * 2 * a  # one inner step from 0
    expected = -2 * (theta.detach() + phi_i - a) + w * 2 * (theta.detach() - b)
    assert torch.allclose(captured["grad"], expected)
    assert stats["retain_loss"] == pytest.approx(float(((theta.detach() - b) ** 2).sum()))


def test_retain_term_scores_the_released_weights_not_the_attackers_adapter(tmp_path):
    """The retain term must keep θ (what is released) good on legal data; with the simulated attacker's
    LoRA left on, it kept θ + φ good and θ itself fell apart."""
    from raystack.hardening.data import mixed_losses
    from raystack.hardening.imma import IMMARecipe
    from raystack.hardening.spec import HardenSpec
    from raystack.models.pipeline_io import load_pipeline
    from raystack.tinyworld.folder import write_concept_folder

    write_concept_folder(tmp_path / "t", ["circle"], ["red"], ["sunset"], 2, 1, None, False)
    write_concept_folder(tmp_path / "l", ["square"], ["blue"], ["striped", "plain"], 1, 2, None, False)
    spec = HardenSpec(method="imma", against="lora", target=[tmp_path / "t"], legal=tmp_path / "l",
                      out=tmp_path / "o", retain_weight=1.0, batch_size=2)
    r = IMMARecipe(spec, load_pipeline(None))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in r.ad.parameters():
            p.normal_(0.0, 0.3)  # an adapter that changes every attention output
    flags = [p.requires_grad for p in r.ad.parameters()]
    start = r.generator.get_state()
    _, retain = r.outer_losses()
    assert [p.requires_grad for p in r.ad.parameters()] == flags  # peft's switch back leaves φ as it was

    def legal_parts():  # the recipe's draws, replayed: its target batch first, then legal cond + uncond
        r.generator.set_state(start)
        r._loss(r.target)
        cond, uncond = mixed_losses(r.pipe.unet, r.noise, r.ad.encode, [(r.legal, 2), (r.legal_uncond, 2)],
                                    r.generator)
        return float((cond + uncond) / 2)

    with torch.no_grad():
        with_adapter = legal_parts()
        r.finish()  # the release: θ alone
        released = legal_parts()
    assert float(retain.detach()) == pytest.approx(released, rel=1e-5)
    assert abs(with_adapter - released) > 1e-3 * released  # the adapter matters, so the check above can fail


class _EchoUNet(torch.nn.Module):
    """Stands in for a UNet: records the timesteps it is called with; its prediction depends on a weight."""

    def __init__(self, scale: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(scale))
        self.seen = []

    def forward(self, x, t, enc):
        from types import SimpleNamespace

        self.seen.append(t.clone())
        return SimpleNamespace(sample=self.w * x)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def test_timestep_range_restricts_the_loss_to_it():
    unet = _EchoUNet(0.5)
    from raystack.diffusion import diffusion_loss

    g = torch.Generator().manual_seed(0)
    diffusion_loss(unet, _scheduler(), torch.randn(64, 4, 2, 2), torch.zeros(64, 3, 8), g, timesteps=(700, 1000))
    diffusion_loss(unet, _scheduler(), torch.randn(64, 4, 2, 2), torch.zeros(64, 3, 8), g)
    ranged, full = unet.seen
    assert ranged.min() >= 700 and ranged.max() < 1000
    assert full.min() < 700  # the default draws every timestep, so the check above can fail


def test_teacher_target_is_zero_at_the_teacher_and_grows_away_from_it():
    from raystack.diffusion import diffusion_loss

    lat, enc = torch.randn(8, 4, 2, 2), torch.zeros(8, 3, 8)
    teacher = _EchoUNet(0.5).requires_grad_(False)
    same = diffusion_loss(_EchoUNet(0.5), _scheduler(), lat, enc, torch.Generator().manual_seed(1), teacher=teacher)
    off = diffusion_loss(_EchoUNet(0.7), _scheduler(), lat, enc, torch.Generator().manual_seed(1), teacher=teacher)
    plain = diffusion_loss(_EchoUNet(0.5), _scheduler(), lat, enc, torch.Generator().manual_seed(1))
    assert float(same.detach()) == 0.0
    assert float(off.detach()) > 0.0 and float(plain.detach()) > 0.0  # against the noise the same network has a loss


def test_retain_against_the_original_unet_starts_at_zero_and_sees_changes_to_theta(tmp_path):
    """--retain-target original: the retain term compares θ alone with a frozen copy of the unhardened UNet,
    taken before the attacker's adapter is attached."""
    from raystack.hardening.imma import IMMARecipe
    from raystack.hardening.spec import HardenSpec
    from raystack.models.pipeline_io import load_pipeline
    from raystack.tinyworld.folder import write_concept_folder

    write_concept_folder(tmp_path / "t", ["circle"], ["red"], ["sunset"], 2, 1, None, False)
    write_concept_folder(tmp_path / "l", ["square"], ["blue"], ["striped", "plain"], 1, 2, None, False)
    spec = HardenSpec(method="imma", against="lora", target=[tmp_path / "t"], legal=tmp_path / "l",
                      out=tmp_path / "o", retain_weight=1.0, batch_size=2, retain_target="original")
    r = IMMARecipe(spec, load_pipeline(None))
    assert not any(".lora_" in n for n, _ in r.teacher.named_parameters())
    with torch.no_grad():
        for p in r.ad.parameters():
            p.normal_(0.0, 0.3)  # the attacker's adapter is off in the retain term, so it must not count
        _, at_start = r.outer_losses()
        for p in r.S.values():
            p.add_(0.05 * torch.randn_like(p))
        _, moved = r.outer_losses()
    assert float(at_start) == pytest.approx(0.0, abs=1e-10)
    assert float(moved) > 1e-6
