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
from ..attacks.recipe import GRAD_CLIP, optimizer_named
from ..diffusion import FrozenTextCache, train_noise_scheduler
from ..distributed import all_reduce_mean, partitioned_optimizer
from .data import load_shard, mixed_losses
from .sharded import ShardedTensors


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


def new_mask_logits(n: int, seed: int = 0, device=None):
    """Drawn on the CPU (the same logits on every device), then put on the UNet's `device`: without DeepSpeed
    nothing else moves them, and the mask step would mix them with the couplings on the GPU."""
    mod = _build_mask_module()(n, seed=seed)
    return mod if device is None else mod.to(device)


def user_steps(params: list, theta_d, m, loss_fn, lr: float, steps: int, all_reduce=None) -> float:
    """L simulated user steps on θ(m) (Eq. 10) with the matching update of θ_d (Eq. 9)."""
    import torch

    store = ShardedTensors.wrap(theta_d)  # a list, or the copy partitioned across ranks (ZeRO-3)
    free = 1.0 - m
    d_rates, m_rates = (lr * free).tolist(), (lr * free * free).tolist()  # one host transfer, not two per tensor
    last = 0.0
    for _ in range(steps):
        loss = loss_fn()
        grads = list(torch.autograd.grad(loss, params))
        if all_reduce is not None:
            all_reduce(grads)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                store.add_(i, g, d_rates[i])  # Eq. 9
                p.sub_(g, alpha=m_rates[i])  # Eq. 10
        last = float(loss.detach())
    return last


def couplings(params: list, theta_d, loss_up):
    """c_i = <∂L_up/∂θ(m)_i, θ_d,i> for every tensor (the per-tensor factor of Eq. 8). With θ_d partitioned,
    the ranks' mean gradient is used, so c is the same on every rank; replicated, each rank's c is its own
    batch's and the engine averages the mask gradient, which is the same thing (Eq. 8 is linear in c)."""
    import torch

    from .sharded import ShardedTensors

    return ShardedTensors.wrap(theta_d).mean_dots(list(torch.autograd.grad(loss_up, params)))


def follow_mask(params: list, theta_d, m_old, m_new) -> None:
    """θ(m) = θ_ft + m θ_d, so a change of m moves θ(m) by Δm · θ_d."""
    import torch

    from .sharded import ShardedTensors

    store = ShardedTensors.wrap(theta_d)
    dms = (m_new - m_old).tolist()  # one host transfer; the same on every rank (one mask), so each takes part in full()
    with torch.no_grad():
        for i, p in enumerate(params):
            dm = dms[i]
            if dm:
                p.add_(store.full(i), alpha=dm)


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
    """FreezeAsGuard bound to a pipeline. The defender's parameters are the mask logits (in the engine); the
    UNet holds θ(m), replicated on every rank, and `theta_d` the second copy: replicated too, or under
    `--zero-stage 3` partitioned across the ranks (`sharded.ShardedTensors`, 1/world of a UNet each). The
    preparation fine-tune's Adam moments are partitioned from ZeRO-1 on (torch's ZeroRedundancyOptimizer)."""

    name = "freezeasguard"
    needs_legal = True
    draws_attackers = True

    def __init__(self, spec, pipe, rank: int = 0, world: int = 1):
        import torch

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
        self.mask_module = new_mask_logits(len(self.params), seed=spec.seed, device=self.params[0].device)
        self.noise = train_noise_scheduler(pipe)
        self.generator = torch.Generator().manual_seed(spec.seed * 7919 + rank)
        self.theta_d = None  # ShardedTensors after prepare() or load_state()
        self._encode = FrozenTextCache(pipe)
        self.pool = None
        if spec.attacker_space is not None:  # robust: simulated users drawn from an attack space
            from .attacker_pool import AttackerPool, draw_pool, trained_tensors

            self.pool = AttackerPool(draw_pool(spec), spec.attacker_restart, spec.seed)
            self.trains = [trained_tensors(m.attack, self.names) for m in self.pool.members]
            self.user_opts: dict = {}
            self.theta_pre: list | None = None
            self.theta_ft0: list | None = None

    def engine_module(self):
        return self.mask_module

    def engine_params(self) -> list:
        return list(self.mask_module.parameters())

    def make_optimizer(self):
        import torch

        return torch.optim.SGD(self.engine_params(), lr=self.spec.mask_lr)

    def _losses(self, **loss_kw):
        """(L(illegal), L(legal)) from one mixed batch of --batch-size images, half of each (`loss_kw`: a drawn
        user's loss weighting and offset noise)."""

        b = self.spec.batch_size
        parts = [(self.illegal, max(1, (b + 1) // 2)), (self.legal, max(1, b // 2))]
        return tuple(mixed_losses(self.pipe.unet, self.noise, self._encode, parts, self.generator, **loss_kw))

    def _low(self, **loss_kw):
        ill, leg = self._losses(**loss_kw)
        return ill + leg

    def mask(self):
        """Current m = σ(w/T), read safely whatever the ZeRO stage."""
        return mask_of(self._logits(), self.spec.temperature)

    def prepare(self) -> dict:
        """θ_ft: the model fully fine-tuned on illegal + legal data; then θ_d = θ_pre − θ_ft, θ(m) = θ_ft + m θ_d."""
        import torch

        from .sharded import ShardedTensors

        if self.pool is not None:
            pre = [p.detach().clone() for p in self.params]
        else:  # θ_pre, kept as this rank's part only under ZeRO-3; it becomes θ_d in place below
            pre = ShardedTensors.partition([p.detach() for p in self.params], *self._copy_partition())
        opt = self._preparation_optimizer()
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
        if self.pool is not None:  # each drawn user starts from θ_ft and keeps its own copy of it
            self.theta_pre, self.theta_ft0 = pre, [p.detach().clone() for p in self.params]
            return {"finetune_loss": last}
        ms = m.tolist()
        with torch.no_grad():
            for i, p in enumerate(self.params):
                pre.add_(i, p.detach(), -1.0)  # θ_d = θ_pre − θ_ft
                p.add_(pre.full(i), alpha=ms[i])
        self.theta_d = pre
        return {"finetune_loss": last}

    def _copy_partition(self) -> tuple[int, int]:
        """(rank, world) θ_d is partitioned over: all ranks under ZeRO-3, else whole on each."""
        return (self.rank, self.world) if self.spec.zero_stage == 3 else (0, 1)

    def _preparation_optimizer(self):
        """Adam over the whole UNet for the preparation fine-tune, its moments partitioned from ZeRO-1 on."""
        import torch

        return partitioned_optimizer(self.params, torch.optim.Adam, self.spec.zero_stage, lr=self.spec.user_lr)

    def step(self) -> dict:
        from ..distributed import all_reduce_mean

        if self.pool is not None:
            return self.robust_step()
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

    # robust hardening: simulated users drawn from --attacker-space ---------------------------------------
    def robust_step(self) -> dict:
        """One mask step against --attackers-per-step users drawn from the pool: each continues its own
        fine-tune for L steps, and the mask update uses the couplings averaged over them (Eq. 8 is linear in
        them, so this is the average of the single-user mask gradients)."""
        import torch

        m = self.mask()
        cs, stats = [], []
        for k, restart in self.pool.choose_many(self.pool.iteration, self.spec.attackers_per_step):
            c, st = self.member_couplings(k, restart, m)
            cs.append(c)
            stats.append(st)
        self.engine.backward(self.engine.forward(torch.stack(cs).mean(0), self.spec.rho, self.spec.temperature))
        self.engine.step()
        self.pool.iteration += 1
        mean = {key: sum(st[key] for st in stats) / len(stats) for key in stats[0]}
        return {**mean, "soft_ratio": float(self.mask().mean())}

    def member_couplings(self, k: int, restart: bool, m) -> tuple:
        """Pool member k's turn: its θ_ft moves by L steps of its own optimizer, lr and loss weighting; θ(m) =
        m θ_pre + (1 − m) θ_ft, so a user step on θ_ft gets the gradient (1 − m) ∂L/∂θ(m) (with plain SGD this is
        Eq. 9/10); returns c = <∂L_up/∂θ(m), θ_d> with θ_d = θ_pre − θ_ft, and the turn's losses."""
        import torch

        from ..distributed import all_reduce_mean

        member, trains = self.pool.members[k], self.trains[k]
        if restart:
            member.reset()
            self.user_opts.pop(k, None)
        if not member.phi:
            member.phi = {n: t.clone() for n, t in zip(self.names, self.theta_ft0)}
        ft = [member.phi[n] for n in self.names]
        opt = self.user_opts.get(k)
        if opt is None:
            opt = optimizer_named(member.attack.optimizer, [t for t, on in zip(ft, trains) if on],
                                  member.attack.lr, 1e-2)
            if member.opt is not None:
                opt.load_state_dict(member.opt)
            self.user_opts[k] = opt
        kw = {"snr_gamma": member.attack.snr_gamma, "noise_offset": member.attack.noise_offset}
        self._set_relaxed(ft, m)
        free = [1.0 - mi for mi in m.tolist()]  # one host transfer for the turn
        low = 0.0
        for _ in range(self.spec.user_steps):
            loss = self._low(**kw)
            grads = list(torch.autograd.grad(loss, self.params))
            all_reduce_mean(grads)
            for i, (t, g) in enumerate(zip(ft, grads)):
                t.grad = (g * free[i]).to(t.dtype) if trains[i] else None
            torch.nn.utils.clip_grad_norm_([t for t, on in zip(ft, trains) if on], GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._set_relaxed(ft, m)
            low = float(loss.detach())
        member.steps_taken += self.spec.user_steps
        ill, leg = self._losses(**kw)
        up = -self.lambda1 * ill + self.lambda2 * leg
        with torch.no_grad():
            theta_d = [p0 - t for p0, t in zip(self.theta_pre, ft)]
        c = couplings(self.params, theta_d, up)
        return c, {"lower_loss": low, "illegal_loss": float(ill.detach()), "legal_loss": float(leg.detach())}

    def _set_relaxed(self, ft: list, m) -> None:
        """The UNet's tensors to θ(m) = m θ_pre + (1 − m) θ_ft for one user's θ_ft."""
        import torch

        with torch.no_grad():
            for p, p0, t, mi in zip(self.params, self.theta_pre, ft, m.tolist()):  # one host transfer
                p.copy_(p0 * mi + t * (1.0 - mi))

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
        """Built on rank 0, which writes the checkpoint; the other ranks only take part in gathering θ_d (and
        return the mask logits and RNG, which are small)."""
        if self.pool is not None:
            return self._pool_state()
        writer = self.rank == 0
        out = {}
        for i, n in enumerate(self.names):
            d = self.theta_d.full(i)  # every rank takes part when θ_d is partitioned
            if writer:
                out[f"theta_m/{n}"] = self.params[i].detach().cpu().clone()
                out[f"theta_d/{n}"] = d.detach().cpu().clone()
        out["mask/logits"] = self._logits()
        out["rng/generator"] = self.generator.get_state()
        return out

    def _pool_state(self) -> dict:
        for k, opt in self.user_opts.items():
            self.pool.members[k].opt = opt.state_dict()
        out = {f"theta_pre/{n}": t.detach().cpu().clone() for n, t in zip(self.names, self.theta_pre)}
        out.update({f"theta_ft0/{n}": t.detach().cpu().clone() for n, t in zip(self.names, self.theta_ft0)})
        out.update(self.pool.state())
        out["mask/logits"] = self._logits()
        out["rng/generator"] = self.generator.get_state()
        return out

    def load_state(self, tensors: dict) -> None:
        """θ(m), θ_d, the RNG and the mask logits w (the engine's parameter, whatever the ZeRO stage); with the
        attacker pool, θ_pre, θ_ft and every drawn user's θ_ft and moments instead of θ(m), θ_d."""
        import torch

        if self.pool is not None:
            dev = self.params[0].device  # the checkpoint is read on the CPU
            self.theta_pre = [tensors[f"theta_pre/{n}"].to(dev, copy=True) for n in self.names]
            self.theta_ft0 = [tensors[f"theta_ft0/{n}"].to(dev, copy=True) for n in self.names]
            self.pool.load_state(tensors, dev)
            self.user_opts = {}
            self.generator.set_state(tensors["rng/generator"])
            with self.engine.gather(self.mask_module.w, modifier_rank=0), torch.no_grad():
                self.mask_module.w.copy_(tensors["mask/logits"])
            return
        from .sharded import ShardedTensors

        load_into_unet(self.pipe.unet, {n: tensors[f"theta_m/{n}"] for n in self.names})
        self.theta_d = ShardedTensors.partition([tensors[f"theta_d/{n}"] for n in self.names], *self._copy_partition(),
                                                device=self.params[0].device)  # the checkpoint is read on the CPU
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
