"""IMMA (Zheng & Yeh, Alg. 1): make the weights adapt badly to a target concept under a method A.

    for i in 1..I:
        φ ← φ_prev                          line 5, warm start of the inner problem
        φ ← φ − β ∇_φ L_A(x_A; θ, φ)        the simulated attacker's step(s)
        θ[U] ← φ[U]                          line 7, overlapping parameters (DreamBooth/full)
        θ[S] ← θ[S] + α ∇_θ L_A(x_I; θ, φ)   outer ascent with Adam, first order

`imma_iteration` is that loop body, plain torch; `IMMARecipe` binds it to a pipeline, data, and an
outer optimizer (a torch Adam, or a DeepSpeed engine inside a Ray Train worker).

The attacker's step: by default the attack library's own (AdamW at the method's lr, gradient clipping,
min-SNR weighting and offset noise as `raystack/attacks/` trains), not the SGD step Alg. 1 writes. A
LoRA moved by φ − β∇ at an attacker-sized β hardly leaves its initialisation, so the "adapted" model
the outer step sees is nearly θ itself and IMMA degenerates into the direct maximisation the paper
warns ruins the model; that is what the tiny world showed (research/imma/results/imma_probe.jsonl).
`--inner-optimizer sgd` keeps the literal step.

Overlap (line 7): for DreamBooth/full, φ is the UNet's own tensors, so the attacker's step writes θ[U]
in place: the assignment is that write, and the next iteration starts from the θ the outer step left
(the warm start of the overlapping part *is* θ).
"""

from __future__ import annotations

from typing import Callable, Protocol

from ..distributed import all_reduce_mean
from .method import HardeningPhase, PhaseResult, load_into_unet
from ..attacks.methods import make_adaptation
from ..attacks.recipe import GRAD_CLIP, attacker_optimizer
from ..attacks.spec import AttackSpec, names_word
from ..checkpoint import flatten_optimizer, unflatten_optimizer
from ..diffusion import train_noise_scheduler, unet_predict
from ..distributed import full_optimizer_state
from .data import Shard, load_shard, mixed_losses, noisy_batch, shard_loss


class OuterOptimizer(Protocol):
    def backward(self, loss) -> None: ...
    def step(self) -> None: ...


def imma_iteration(adaptation, phi_prev: dict | None, inner_loss: Callable[[], "torch.Tensor"],  # noqa: F821
                   outer_loss: Callable, outer: OuterOptimizer, theta_s: list,
                   inner_lr: float, inner_steps: int = 1, retain_weight: float = 0.0,
                   after_inner: Callable[[], None] | None = None, inner_opt=None,
                   inner_clip: float | None = None) -> tuple[dict, dict]:
    """One outer iteration; returns (φ to warm-start the next one, losses).

    The attacker's step is φ − β∇ (Alg. 1 as written) unless `inner_opt`, the attacker's own optimizer over
    φ, is given: then it is that optimizer's step after clipping the gradient norm to `inner_clip`, and its
    moments carry over between iterations like φ does. `outer_loss()` gives the attacker's loss at φ^i, or
    a pair (that loss, the retain loss on legal data) when the retain term is wanted."""

    adaptation.load_warm_state(phi_prev or {})  # line 5
    phi = adaptation.parameters()
    inner_val = attacker_steps(adaptation, phi, inner_loss, inner_lr, inner_steps, inner_opt, inner_clip)
    # line 7: overlapping φ are θ's own tensors and already hold φ^i; an engine may need to hear of it
    if after_inner is not None:
        after_inner()
    phi_next = adaptation.warm_state()
    for p in phi:
        p.requires_grad_(False)
    for p in theta_s:
        p.requires_grad_(True)
    loss_i, r = _pair(outer_loss())
    total = -loss_i  # ascent on the attacker's loss
    retain_val = None
    if r is not None and retain_weight > 0:
        total = total + retain_weight * r
        retain_val = float(r.detach())
    outer.backward(total)
    outer.step()
    return phi_next, {"inner_loss": inner_val, "outer_loss": float(loss_i.detach()), "retain_loss": retain_val}


def attacker_steps(adaptation, phi: list, inner_loss: Callable, inner_lr: float, steps: int, inner_opt=None,
                   inner_clip: float | None = None) -> float:
    """THE INNER STEP: the simulated attacker's `steps` step(s) on x_A (φ − β∇, or its optimizer's step after
    clipping); every rank takes the same step. Returns the last attacker loss."""
    import torch

    for p in phi:
        p.requires_grad_(True)
    inner_val = 0.0
    for _ in range(steps):
        loss_a = inner_loss()
        grads = list(torch.autograd.grad(loss_a, phi))
        all_reduce_mean(grads)  # every rank takes the same attacker step
        if inner_opt is None:
            with torch.no_grad():
                for p, g in zip(phi, grads):
                    p.sub_(inner_lr * g)
        else:
            for p, g in zip(phi, grads):
                p.grad = g
            if inner_clip is not None:
                torch.nn.utils.clip_grad_norm_(phi, inner_clip)
            inner_opt.step()
            inner_opt.zero_grad(set_to_none=True)
        adaptation.after_step()
        inner_val = float(loss_a.detach())
    return inner_val


def _pair(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out, None)


def select_outer_params(unet, patterns: list[str]) -> dict:
    """S: UNet parameters whose name contains a pattern (adapter parameters excluded)."""
    out = {n: p for n, p in unet.named_parameters() if any(pt in n for pt in patterns) and ".lora_" not in n}
    if not out:
        from ..errors import UserError

        raise UserError(f"--params {','.join(patterns)}: matches no UNet parameter")
    return out


def released_name(name: str) -> str:
    """A UNet parameter's name without peft's wrapper (`.base_layer`), i.e. its name in the release."""
    return name.replace(".base_layer.", ".")


class IMMARecipe(HardeningPhase):
    """IMMA bound to a pipeline: setup (attacker simulation, data, S), step, state for checkpoints.

    `outer_objective(recipe)`: what the outer step ascends, by default `outer_losses` (Alg. 1: the attacker's
    loss at φ^i, plus the retain term); research probes pass their own (research/imma/)."""

    name = "imma"
    simulates_attacker = True
    draws_attackers = True
    supports_zero3 = False  # the attacker's adapter is updated by hand inside the UNet ZeRO-3 would partition

    def _attacker_caption(self, text: str) -> str:
        """The simulated attacker's caption. Textual inversion learns a new word: a plain caption without the
        defender's --token gets it in front (the defender picks the word, the user's captions stay as given)."""

        if self.attacker.method == "textual-inversion" and not names_word(text, self.spec.token):
            text = f"{self.spec.token} {text}".strip()
        return self.ad.caption(text)

    def __init__(self, spec, pipe, rank: int = 0, world: int = 1, outer_objective: Callable | None = None):
        import torch

        super().__init__(spec, pipe, rank, world)
        self.outer_objective = outer_objective

        self.teacher = None
        retains_to_original = spec.retain_target == "original" and spec.legal is not None and spec.retain_weight > 0
        if retains_to_original or spec.imma_objective == "hold-erasure":
            import copy

            self.teacher = copy.deepcopy(pipe.unet).requires_grad_(False).eval()  # before φ is attached
        self.retain_teacher = self.teacher if retains_to_original else None  # else the retain term targets data
        self.pool = None
        if spec.attacker_space is not None:  # robust hardening: attackers drawn from a space, set up per turn
            from ..diffusion import FrozenTextCache
            from .attacker_pool import AttackerPool, draw_pool

            self.pool = AttackerPool(draw_pool(spec), spec.attacker_restart, spec.seed)
            self.ad, self.attacker, self.inner_opt, self.active = None, None, None, None
            self._text = FrozenTextCache(pipe)
            caption_fn = None  # every pool method trains on the captions as given
        else:
            attacker = AttackSpec(method=spec.against, data=spec.target[0], token=spec.token, rank=spec.rank,
                                  batch_size=spec.batch_size, lr=spec.inner_lr, seed=spec.seed)
            self.attacker = attacker  # its lr, loss weighting and noise offset are the method's defaults
            self.ad = make_adaptation(attacker, pipe)
            # its moments partitioned from ZeRO-1 on (vs full: two UNets)
            self.inner_opt = (attacker_optimizer(self.ad, attacker.lr, zero_stage=spec.zero_stage)
                              if spec.inner_optimizer == "adamw" else None)
            caption_fn = self._attacker_caption
        self.target = load_shard(spec.target, pipe, rank, world, caption_fn=caption_fn, jpeg_mix=spec.jpeg_mix,
                                 seed=spec.seed, resolution=spec.resolution)
        self.target_anchors = None
        if spec.imma_objective == "hold-erasure":  # each target caption with the concept's word(s) made the anchor
            from .erase import anchor_caption, check_erase_captions, concept_words

            check_erase_captions(spec, self.target.captions)
            words = concept_words(spec)
            self.target_anchors = [anchor_caption(c, words, spec.anchor) for c in self.target.captions]
        self.legal = (load_shard([spec.legal], pipe, rank, world, flag="--legal", resolution=spec.resolution)
                      if spec.legal is not None and spec.retain_weight > 0 else None)
        self.legal_uncond = (None if self.legal is None else
                             Shard(self.legal.bank, [""] * len(self.legal.captions), self.legal.total))
        self.S = select_outer_params(pipe.unet, spec.param_patterns)
        for p in self.S.values():
            p.requires_grad_(True)
        self.overlaps_s = self.pool is None and bool(set(self.ad.overlap()) & set(self.S))
        self.noise = train_noise_scheduler(pipe)
        self.generator = torch.Generator().manual_seed(spec.seed * 7919 + rank)
        self.phi_prev: dict | None = None
        self.after_inner: Callable[[], None] | None = None

    # the defender's parameters: S inside the UNet
    def engine_module(self):
        return self.pipe.unet

    def engine_params(self) -> list:
        return list(self.S.values())

    def make_optimizer(self):
        import torch

        return torch.optim.Adam(self.engine_params(), lr=self.spec.outer_lr)

    def bind(self, engine) -> None:
        """The engine is the outer optimizer; when φ overlaps S (line 7 writes θ[S] by hand) it must hear of it."""
        self.engine = engine
        self.after_inner = engine.refresh_master_weights if self.overlaps_s else None

    def _loss(self, shard, timesteps=None):
        """L_A: the attacker's loss on target images (its min-SNR weighting and offset noise)."""

        return shard_loss(self.pipe.unet, self.noise, self.ad.encode, shard, self.spec.batch_size, self.generator,
                          snr_gamma=self.attacker.snr_gamma, noise_offset=self.attacker.noise_offset,
                          timesteps=timesteps)

    def outer_value(self):
        """What the outer step ascends at the attacker's adapted point φ^i (--imma-objective): L_A on target
        data (ascent, Alg. 1), or minus the held-erasure loss (hold-erasure)."""
        if self.spec.imma_objective == "hold-erasure":
            return -self.held_erasure_loss()
        return self._loss(self.target, self.spec.outer_timestep_range)

    def held_erasure_loss(self):
        """hold-erasure: on a noisy target image, the UNet's prediction for the concept's caption (the attacker's
        adapter on) against the input model's for the caption with the concept made --anchor — concept
        ablation's goal, which the attacker's adaptation must not undo. Bounded below by 0, unlike L_A, so the
        outer step cannot buy a high attacker loss by wrecking the prediction."""
        import torch

        noisy, t, idx = noisy_batch(self.target, self.spec.batch_size, self.noise, self.generator, self.pipe.unet,
                                    self.spec.outer_timestep_range)
        with torch.no_grad():
            goal = unet_predict(self.teacher, noisy, t, self.ad.encode([self.target_anchors[i] for i in idx]))
        pred = unet_predict(self.pipe.unet, noisy, t, self.ad.encode([self.target.captions[i] for i in idx]))
        return (pred.float() - goal.float()).pow(2).mean()

    def outer_losses(self):
        """The outer value at φ^i (`outer_value`), and the retain loss on legal data at θ alone, the released
        weights: with the adapter left on, the retain term kept θ + φ good and let θ itself fall apart. Legal
        images are retained with their captions and unconditioned (empty caption), since classifier-free
        guidance samples from both branches."""
        loss_i = self.outer_value()
        if self.legal is None:
            return loss_i
        return loss_i, self.retain_loss()

    def retain_loss(self):
        """The retain term on legal data at θ alone (adapter off), captioned and unconditioned halves."""

        b = self.spec.batch_size
        with self.ad.released():
            cond, uncond = mixed_losses(self.pipe.unet, self.noise, self.ad.encode,
                                        [(self.legal, b), (self.legal_uncond, b)], self.generator,
                                        teacher=self.retain_teacher)
        return (cond + uncond) / 2

    def step(self) -> dict:
        if self.pool is not None:
            return self.robust_step()
        objective = (lambda: self.outer_objective(self)) if self.outer_objective else self.outer_losses
        self.phi_prev, stats = imma_iteration(
            self.ad, self.phi_prev, lambda: self._loss(self.target), objective, self.engine,
            self.engine_params(), self.attacker.lr, self.spec.inner_steps, self.spec.retain_weight,
            self.after_inner, self.inner_opt, GRAD_CLIP)
        return stats

    # robust hardening: the attacker pool (--attacker-space) ------------------------------------------------
    def robust_step(self) -> dict:
        """One outer iteration against the pool member drawn for it (`attacker_pool.py`): its warm-started
        attacker takes --inner-steps steps, the outer step ascends L_A at that adapted point, then descends the
        retain term at θ alone. A dense member's displacement is taken off θ before the outer step, so the
        ascent's gradient (taken at θ + Δ) is applied to the release, first order."""
        import torch

        from ..attacks.recipe import GRAD_CLIP

        k, restart = self.pool.choose(self.pool.iteration)
        member = self._activate(k, restart)
        phi_named = self.ad.named_parameters()
        phi = list(phi_named.values())
        theta_here = None
        if member.dense:  # the member's displacement onto θ
            theta_here = {n: p.detach().clone() for n, p in phi_named.items()}
            with torch.no_grad():
                for n, d in member.phi.items():
                    phi_named[n].add_(d)
        inner_val = attacker_steps(self.ad, phi, lambda: self._loss(self.target), member.attack.lr,
                                   self.spec.inner_steps, self.inner_opt, GRAD_CLIP)
        member.steps_taken += self.spec.inner_steps
        for p in phi:
            p.requires_grad_(False)
        S = self.engine_params()
        for p in S:
            p.requires_grad_(True)
        loss_i = self.outer_value()  # at the adapted point
        grads = torch.autograd.grad(loss_i, S)
        if member.dense:  # Δ kept apart: θ back to the release before the outer step
            with torch.no_grad():
                member.phi = {n: p.detach() - theta_here[n] for n, p in phi_named.items()}
                for n, p in phi_named.items():
                    p.copy_(theta_here[n])
        # a surrogate whose gradient in S is −∇_S L_A(adapted) (+ the retain term's, taken at θ alone)
        total = -sum((g.detach() * p).sum() for g, p in zip(grads, S))
        retain_val = None
        if self.legal is not None and self.spec.retain_weight > 0:
            r = self.retain_loss()
            total = total + self.spec.retain_weight * r
            retain_val = float(r.detach())
        self.engine.backward(total)
        self.engine.step()
        self.pool.iteration += 1
        return {"inner_loss": inner_val, "outer_loss": float(loss_i.detach()), "retain_loss": retain_val,
                "attacker": k, "attacker_steps": member.steps_taken}

    def _activate(self, k: int, restart: bool):
        """Pool member k on the pipeline: its adapter (LoRA) or nothing yet (dense: Δ goes on in the step), its
        warm state and optimizer moments; a restart starts it from the release with a fresh initialisation."""
        from ..attacks.methods import make_adaptation
        from ..attacks.recipe import attacker_optimizer, seeded_init

        member = self.pool.members[k]
        if self.active == k and not restart:
            return member
        self._stash()
        if restart:
            member.reset()
        if self.ad is not None and hasattr(self.ad, "remove"):
            self.ad.remove()
        with seeded_init(member.attack.seed * 131 + member.restarts):
            self.ad = make_adaptation(member.attack, self.pipe, text_cache=self._text)
        self.attacker = member.attack
        if member.phi and not member.dense:
            self.ad.load_warm_state(member.phi)
        self.inner_opt = attacker_optimizer(self.ad, member.attack.lr, member.attack.optimizer)
        if member.opt is not None:
            self.inner_opt.load_state_dict(member.opt)
        self.active = k
        return member

    def _stash(self) -> None:
        """The active member's φ (adapter) and moments back into the pool (before a switch or a checkpoint)."""
        if self.active is None:
            return
        member = self.pool.members[self.active]
        if not member.dense:
            member.phi = self.ad.warm_state()
        member.opt = self.inner_opt.state_dict()

    # checkpoints ----------------------------------------------------------------------------
    def changed_tensors(self) -> dict:
        """What IMMA changed in the release, by released name: S, plus all of φ's overlap (line 7; the pool
        keeps dense attackers apart, so there only S)."""
        overlap = set(self.ad.overlap()) if self.pool is None else set()
        names = {released_name(n) for n in set(self.S) | overlap}
        params = {released_name(n): p for n, p in self.pipe.unet.named_parameters()}  # whatever adapter is on
        return {n: params[n].detach().cpu().clone() for n in sorted(names)}

    def result(self) -> PhaseResult:
        return PhaseResult(changed=self.changed_tensors())

    def state(self) -> dict:
        """Built whole on rank 0, which writes the checkpoint (every rank resumes from it); the others keep their
        RNG only (the pool's bookkeeping runs on every rank alike, so they build it too)."""

        moments = None
        if self.inner_opt is not None and self.pool is None:  # the simulated attacker's, warm-started like φ
            moments = full_optimizer_state(self.inner_opt)  # every rank: a partitioned one is gathered to rank 0
        if self.rank != 0 and self.pool is None:
            return {"rng/generator": self.generator.get_state()}
        out = {f"theta/{k}": v for k, v in self.changed_tensors().items()}
        out.update({f"phi/{k}": v.detach().cpu() for k, v in (self.phi_prev or {}).items()})
        if moments is not None:
            flatten_optimizer("inner_opt", moments, out, {})
        out["rng/generator"] = self.generator.get_state()
        if self.pool is not None:
            self._stash()
            out.update(self.pool.state())
        return out

    def load_state(self, tensors: dict) -> None:
        load_into_unet(self.pipe.unet, {k[6:]: v for k, v in tensors.items() if k.startswith("theta/")},
                       released_names=True)
        if self.pool is not None:  # the checkpoint is read on the CPU: φ goes where the UNet is
            self.pool.load_state(tensors, next(self.pipe.unet.parameters()).device)
            self.generator.set_state(tensors["rng/generator"])
            return
        dev = self.ad.parameters()[0].device  # the warm start lives beside φ, as in an uninterrupted run
        phi = {k[4:]: v.to(dev, copy=True) for k, v in tensors.items() if k.startswith("phi/")}
        self.phi_prev = phi or None
        if self.inner_opt is not None and any(k.startswith("inner_opt/") for k in tensors):
            from ..distributed import indexed_param_groups

            groups = {"inner_opt": {"param_groups": indexed_param_groups(self.inner_opt), "scalars": {}}}
            self.inner_opt.load_state_dict(unflatten_optimizer("inner_opt", tensors, groups))
        self.generator.set_state(tensors["rng/generator"])

    def finish(self) -> None:
        """Take the simulated attacker's adapter off (the release holds θ alone)."""
        if self.ad is not None and hasattr(self.ad, "remove"):
            self.ad.remove()
