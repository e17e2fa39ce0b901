"""FreezeAsGuard's update rules on a toy model, checked against autograd and their invariants."""

import pytest
import torch

from raystack.hardening.freezeasguard import (binarize, follow_mask, mask_of, new_mask_logits, random_mask,
                                              user_steps)

T = 0.2


def eq8_mask_gradient(G: list, theta_d: list, w, temperature: float):
    """The oracle: Eq. 8 written out, ∂L_up/∂w_i = <G_i, θ_d,i> · (1/T) σ(w_i/T)(1 − σ(w_i/T)) per tensor. The
    product's update is `MaskLogits.forward`'s surrogate, differentiated by the engine."""
    c = torch.stack([(g.float() * d.float()).sum() for g, d in zip(G, theta_d)])
    m = mask_of(w, temperature)
    return c * m * (1 - m) / temperature


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 2, 3)]
    pre = [torch.randn(s, generator=g) for s in shapes]
    ft = [torch.randn(s, generator=g) for s in shapes]
    target = [torch.randn(s, generator=g) for s in shapes]
    w = torch.randn(len(shapes), generator=g) * 0.3
    return pre, ft, target, w


def _loss(thetas, target):
    return sum(((t.sin() - y) ** 2).sum() for t, y in zip(thetas, target))


def test_eq8_equals_autograd_through_the_relaxation():
    pre, ft, target, w0 = _toy()
    w = w0.clone().requires_grad_(True)
    m = torch.sigmoid(w / T)
    theta_m = [m[i] * pre[i] + (1 - m[i]) * ft[i] for i in range(len(pre))]
    (auto,) = torch.autograd.grad(_loss(theta_m, target), w)

    leaves = [t.detach().clone().requires_grad_(True) for t in theta_m]
    G = torch.autograd.grad(_loss(leaves, target), leaves)
    theta_d = [p - f for p, f in zip(pre, ft)]
    assert torch.allclose(eq8_mask_gradient(G, theta_d, w0, T), auto, rtol=1e-5, atol=1e-6)


def test_mask_module_gradient_is_eq8_plus_sparsity():
    pre, ft, target, w0 = _toy(1)
    mod = new_mask_logits(len(pre))
    with torch.no_grad():
        mod.w.copy_(w0)
    theta_m = [mask_of(w0, T)[i] * pre[i] + (1 - mask_of(w0, T)[i]) * ft[i] for i in range(len(pre))]
    leaves = [t.clone().requires_grad_(True) for t in theta_m]
    G = torch.autograd.grad(_loss(leaves, target), leaves)
    theta_d = [p - f for p, f in zip(pre, ft)]
    c = torch.stack([(g * d).sum() for g, d in zip(G, theta_d)])
    rho = 0.4
    mod(c, rho, T).backward()
    m = mask_of(w0, T)
    sparsity = 2 * (m.mean() - rho) / len(pre) * m * (1 - m) / T
    assert torch.allclose(mod.w.grad, eq8_mask_gradient(G, theta_d, w0, T) + sparsity, rtol=1e-5, atol=1e-6)


def test_user_steps_keep_theta_m_consistent_with_theta_d():
    pre, ft, target, w0 = _toy(2)
    m = mask_of(w0, T)
    params = [torch.nn.Parameter(m[i] * pre[i] + (1 - m[i]) * ft[i]) for i in range(len(pre))]
    theta_d = [p - f for p, f in zip(pre, ft)]
    user_steps(params, theta_d, m, lambda: _loss(params, target), lr=0.05, steps=3)
    for i, p in enumerate(params):
        ft_now = pre[i] - theta_d[i]  # θ_ft as Eq. 9 moved it
        assert torch.allclose(p.detach(), m[i] * pre[i] + (1 - m[i]) * ft_now, atol=1e-5)
        assert not torch.allclose(ft_now, ft[i])


def test_fully_frozen_tensor_never_moves():
    pre, ft, target, _ = _toy(3)
    m = torch.tensor([1.0, 0.0, 0.5])
    params = [torch.nn.Parameter(m[i] * pre[i] + (1 - m[i]) * ft[i]) for i in range(3)]
    before = params[0].detach().clone()
    theta_d = [p - f for p, f in zip(pre, ft)]
    user_steps(params, theta_d, m, lambda: _loss(params, target), lr=0.1, steps=2)
    assert torch.equal(params[0].detach(), before)


def test_follow_mask_moves_theta_to_new_relaxation():
    pre, ft, _, w0 = _toy(4)
    m_old, m_new = mask_of(w0, T), mask_of(w0 + 0.3, T)
    params = [m_old[i] * pre[i] + (1 - m_old[i]) * ft[i] for i in range(len(pre))]
    theta_d = [p - f for p, f in zip(pre, ft)]
    follow_mask(params, theta_d, m_old, m_new)
    for i, p in enumerate(params):
        assert torch.allclose(p, m_new[i] * pre[i] + (1 - m_new[i]) * ft[i], atol=1e-6)


@pytest.mark.parametrize("rho", [0.0, 0.1, 0.3, 0.5, 0.85, 1.0])
def test_binary_masks_hit_rho(rho):
    w = torch.randn(137)
    frozen = binarize(w, rho)
    assert sum(frozen) == round(rho * 137)
    if 0 < sum(frozen) < 137:
        assert min(w[i] for i in range(137) if frozen[i]) >= max(w[i] for i in range(137) if not frozen[i])
    names = [f"p{i}" for i in range(137)]
    r = random_mask(names, rho, seed=1)
    assert sum(r.values()) == round(rho * 137) and r == random_mask(names, rho, seed=1)
