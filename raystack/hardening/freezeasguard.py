"""FreezeAsGuard (Huang, Wang & Gao): learn which UNet tensors to freeze so that fine-tuning the rest
learns illegal concepts badly and legal ones well.

Relaxation per tensor i: m_i = σ(w_i / T), θ(m) = m ⊙ θ_pre + (1 − m) ⊙ θ_ft. Only two copies of the
weights exist: θ(m) (the UNet's own tensors) and θ_d = θ_pre − θ_ft.

    repeat K:
        repeat L:  g = ∂L_low/∂θ(m)                       L_low = L(illegal) + L(legal), one mixed batch
                   θ_d  ← θ_d  + η2 g (1 − m)              Eq. 9
                   θ(m) ← θ(m) − η2 g (1 − m)²             Eq. 10
        G = ∂L_up/∂θ(m)                                    L_up = −λ1 L(illegal) + λ2 L(legal)
        w ← w − η1 (<G_i, θ_d,i> σ'(w_i/T)/T + ∂(Σm/N − ρ)²/∂w_i)   Eq. 8 (+ sparsity)
        θ(m) ← θ(m) + (m_new − m_old) θ_d                  θ(m) follows the new mask
    release: the original weights + the binary mask (top ⌊ρN⌉ tensors by m)
"""

from __future__ import annotations

from .method import HardeningPhase, PhaseResult, load_into_unet


def mask_of(w, temperature: float):
    import torch

    return torch.sigmoid(w / temperature)


def _build_mask_module():
    import torch

    class MaskLogits(torch.nn.Module):
        """The defender's trainable parameters in FreezeAsGuard: one logit per UNet tensor."""

        def __init__(self, n: int, init: float = -0.5, jitter: float = 0.05, seed: int = 0):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.w = torch.nn.Parameter(init + jitter * torch.rand(n, generator=g) * -1.0)

        def forward(self, coupling, rho: float, temperature: float):
            """THE MASK UPDATE's objective (Eq. 8): a surrogate whose gradient in w is Eq. 8 plus the sparsity
            term, Σ_i c_i m_i + (mean m − ρ)², with c_i = <G_i, θ_d,i> fixed (`couplings`, per rank):
            ∂/∂w_i = c_i σ'(w_i/T)/T + ∂(Σm/N − ρ)²/∂w_i. The engine's backward/step apply it
            (`FreezeAsGuardRecipe.step`); tests/test_freezeasguard_core.py checks it against autograd."""
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


def couplings(params: list, theta_d: list, loss_up):
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


class FreezeAsGuardRecipe(HardeningPhase):
    """FreezeAsGuard bound to a pipeline. The defender's parameters are the mask logits (in the engine);
    the UNet holds θ(m) and `theta_d` the second copy, both replicated on every rank."""

    name = "freezeasguard"
    needs_legal = True

    def __init__(self, spec, pipe, rank: int = 0, world: int = 1):
        import torch

        from ..diffusion import FrozenTextCache, train_noise_scheduler
        from .data import load_shard

        super().__init__(spec, pipe, rank, world)
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        self.illegal = load_shard(spec.target, pipe, rank, world, flag="--target", resolution=spec.resolution)
        self.legal = load_shard([spec.legal], pipe, rank, world, flag="--legal", resolution=spec.resolution)
        n_ill, n_leg = self.illegal.total, self.legal.total
        self.lambda1 = spec.lambda1 if spec.lambda1 is not None else n_ill / (n_ill + n_leg)
        self.lambda2 = spec.lambda2 if spec.lambda2 is not None else n_leg / (n_ill + n_leg)
        self.names = [n for n, _ in pipe.unet.named_parameters()]
        self.params = [p for _, p in pipe.unet.named_parameters()]
        for p in self.params:
            p.requires_grad_(True)
        self.mask_module = new_mask_logits(len(self.params), seed=spec.seed)
        self.noise = train_noise_scheduler(pipe)
        self.generator = torch.Generator().manual_seed(spec.seed * 7919 + rank)
        self.theta_d: list | None = None
        self._encode = FrozenTextCache(pipe.text_encoder, pipe.tokenizer)

    def engine_module(self):
        return self.mask_module

    def engine_params(self) -> list:
        return list(self.mask_module.parameters())

    def make_optimizer(self):
        import torch

        return torch.optim.SGD(self.engine_params(), lr=self.spec.mask_lr)

    def _losses(self):
        """(L(illegal), L(legal)) from one mixed batch of --batch-size images, half of each."""
        from .data import mixed_losses

        b = self.spec.batch_size
        parts = [(self.illegal, max(1, (b + 1) // 2)), (self.legal, max(1, b // 2))]
        return tuple(mixed_losses(self.pipe.unet, self.noise, self._encode, parts, self.generator))

    def _low(self):
        ill, leg = self._losses()
        return ill + leg

    def mask(self):
        """Current m = σ(w/T), read safely whatever the ZeRO stage."""
        return mask_of(self._logits(), self.spec.temperature)

    def prepare(self) -> dict:
        """θ_ft: the model fully fine-tuned on illegal + legal data; then θ_d = θ_pre − θ_ft, θ(m) = θ_ft + m θ_d."""
        import torch

        from .comm import all_reduce_mean

        pre = [p.detach().clone() for p in self.params]
        opt = torch.optim.Adam(self.params, lr=self.spec.user_lr)
        last = None
        for _ in range(self.spec.finetune_steps):
            loss = self._low()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_mean([p.grad for p in self.params])
            opt.step()
            last = float(loss.detach())
        del opt
        m = self.mask()
        with torch.no_grad():
            self.theta_d = [p0 - p.detach() for p0, p in zip(pre, self.params)]
            for i, (p, d) in enumerate(zip(self.params, self.theta_d)):
                p.add_(d, alpha=float(m[i]))
        del pre
        return {"finetune_loss": last}

    def step(self) -> dict:
        from .comm import all_reduce_mean

        m_old = self.mask()
        low = user_steps(self.params, self.theta_d, m_old, self._low, self.spec.user_lr, self.spec.user_steps,
                         all_reduce=all_reduce_mean)
        ill, leg = self._losses()
        up = -self.lambda1 * ill + self.lambda2 * leg
        c = couplings(self.params, self.theta_d, up)
        surrogate = self.engine.forward(c, self.spec.rho, self.spec.temperature)
        self.engine.backward(surrogate)
        self.engine.step()
        m_new = self.mask()
        follow_mask(self.params, self.theta_d, m_old, m_new)
        return {"lower_loss": low, "illegal_loss": float(ill.detach()), "legal_loss": float(leg.detach()),
                "soft_ratio": float(m_new.mean())}

    def result(self) -> PhaseResult:
        return PhaseResult(mask=self.final_mask())

    def final_mask(self) -> dict[str, bool]:
        """The released mask; refused if the logits diverged (a NaN logit would rank arbitrarily)."""
        import torch

        logits = self._logits()
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("the mask logits are not finite (the mask update diverged: lower --mask-lr); "
                             "nothing was released")
        return dict(zip(self.names, binarize(logits, self.spec.rho)))

    def _logits(self):
        import torch

        with self.engine.gather(self.mask_module.w), torch.no_grad():
            return self.mask_module.w.detach().float().clone()

    def state(self) -> dict:
        out = {f"theta_m/{n}": p.detach().cpu().clone() for n, p in zip(self.names, self.params)}
        out.update({f"theta_d/{n}": d.detach().cpu().clone() for n, d in zip(self.names, self.theta_d)})
        out["mask/logits"] = self._logits()
        out["rng/generator"] = self.generator.get_state()
        return out

    def load_state(self, tensors: dict) -> None:
        """θ(m), θ_d, the RNG and the mask logits w (the engine's parameter, whatever the ZeRO stage)."""
        import torch

        load_into_unet(self.pipe.unet, {n: tensors[f"theta_m/{n}"] for n in self.names})
        self.theta_d = [tensors[f"theta_d/{n}"].clone() for n in self.names]
        self.generator.set_state(tensors["rng/generator"])
        with self.engine.gather(self.mask_module.w, modifier_rank=0), torch.no_grad():
            self.mask_module.w.copy_(tensors["mask/logits"])


class RandomFreezePhase(HardeningPhase):
    """The Random-ρ baseline: a seeded random choice of ⌊ρN⌉ tensors; nothing is trained."""

    name = "random-freeze"
    needs_target = False

    def total_steps(self) -> int:
        return 0

    def result(self) -> PhaseResult:
        names = [n for n, _ in self.pipe.unet.named_parameters()]
        return PhaseResult(mask=random_mask(names, self.spec.rho, self.spec.seed))
