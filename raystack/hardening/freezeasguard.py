"""FreezeAsGuard (Huang, Wang & Gao): learn which UNet tensors to freeze so that fine-tuning the rest
learns illegal concepts badly and legal ones well.

Relaxation per tensor i: m_i = σ(w_i / T), θ(m) = m ⊙ θ_pre + (1 − m) ⊙ θ_ft. Only two copies of the
weights exist: θ(m) (the UNet's own tensors) and θ_d = θ_pre − θ_ft.

    repeat K:
        repeat L:  g = ∂L_low/∂θ(m)                       L_low = L(illegal) + L(legal)
                   θ_d  ← θ_d  + η2 g (1 − m)              Eq. 9
                   θ(m) ← θ(m) − η2 g (1 − m)²             Eq. 10
        G = ∂L_up/∂θ(m)                                    L_up = −λ1 L(illegal) + λ2 L(legal)
        w ← w − η1 (<G_i, θ_d,i> σ'(w_i/T)/T + ∂(Σm/N − ρ)²/∂w_i)   Eq. 8 (+ sparsity)
        θ(m) ← θ(m) + (m_new − m_old) θ_d                  θ(m) follows the new mask
    release: the original weights + the binary mask (top ⌊ρN⌉ tensors by m)
"""

from __future__ import annotations


def mask_of(w, temperature: float):
    import torch

    return torch.sigmoid(w / temperature)


def eq8_mask_gradient(G: list, theta_d: list, w, temperature: float):
    """∂L_up/∂w_i = <G_i, θ_d,i> · (1/T) σ(w_i/T)(1 − σ(w_i/T)), one scalar per tensor."""
    import torch

    c = torch.stack([(g.float() * d.float()).sum() for g, d in zip(G, theta_d)])
    m = mask_of(w, temperature)
    return c * m * (1 - m) / temperature


def _build_mask_module():
    import torch

    class MaskLogits(torch.nn.Module):
        """The defender's trainable parameters in FreezeAsGuard: one logit per UNet tensor."""

        def __init__(self, n: int, init: float = -0.5, jitter: float = 0.05, seed: int = 0):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.w = torch.nn.Parameter(init + jitter * torch.rand(n, generator=g) * -1.0)

        def forward(self, coupling, rho: float, temperature: float):
            """Surrogate whose gradient is Eq. 8 plus the sparsity term: Σ_i c_i m_i + (mean m − ρ)²,
            with c_i = <G_i, θ_d,i> fixed (computed outside, per rank)."""
            m = torch.sigmoid(self.w / temperature)
            return (coupling.detach().to(m.dtype) * m).sum() + (m.mean() - rho) ** 2

    return MaskLogits


def new_mask_logits(n: int, seed: int = 0):
    return _build_mask_module()(n, seed=seed)


def user_steps(params: list, theta_d: list, m, loss_fn, lr: float, steps: int, all_reduce=None) -> float:
    """L simulated user steps on θ(m) (Eq. 10) with the matching update of θ_d (Eq. 9)."""
    import torch

    last = 0.0
    for _ in range(steps):
        loss = loss_fn()
        grads = list(torch.autograd.grad(loss, params))
        if all_reduce is not None:
            all_reduce(grads)
        with torch.no_grad():
            for i, (p, d, g) in enumerate(zip(params, theta_d, grads)):
                free = 1.0 - m[i]
                d.add_(g, alpha=float(lr * free))  # Eq. 9
                p.sub_(g, alpha=float(lr * free * free))  # Eq. 10
        last = float(loss.detach())
    return last


def couplings(params: list, theta_d: list, loss_up, all_reduce=None):
    """c_i = <∂L_up/∂θ(m)_i, θ_d,i> for every tensor (the per-tensor factor of Eq. 8)."""
    import torch

    G = list(torch.autograd.grad(loss_up, params))
    return torch.stack([(g.float() * d.float()).sum() for g, d in zip(G, theta_d)])


def follow_mask(params: list, theta_d: list, m_old, m_new) -> None:
    """θ(m) = θ_ft + m θ_d, so a change of m moves θ(m) by Δm · θ_d."""
    import torch

    with torch.no_grad():
        for i, (p, d) in enumerate(zip(params, theta_d)):
            dm = float(m_new[i] - m_old[i])
            if dm:
                p.add_(d, alpha=dm)


def binarize(w, rho: float) -> list[bool]:
    """The ⌊ρN⌉ tensors with the largest logits are frozen: the released ratio hits ρ by construction."""
    import torch

    n = w.numel()
    k = int(round(rho * n))
    frozen = torch.zeros(n, dtype=torch.bool)
    if k > 0:
        frozen[torch.topk(w.detach().float(), k).indices] = True
    return frozen.tolist()


def random_mask(names: list[str], rho: float, seed: int) -> dict[str, bool]:
    """Random-ρ baseline: a seeded random choice of ⌊ρN⌉ tensors."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k = int(round(rho * len(names)))
    chosen = set(rng.choice(len(names), size=k, replace=False).tolist()) if k else set()
    return {n: i in chosen for i, n in enumerate(names)}
