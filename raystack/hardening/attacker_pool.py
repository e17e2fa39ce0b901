"""Robust hardening's simulated attackers: a pool drawn from an attack space (`--attacker-space`,
attack_spaces/*.yaml, the red team's format) instead of IMMA's one `--against` attacker.

Each pool member is one attack configuration (method, lr, rank, loss weighting, offset noise, optimizer,
cross-attention only, length) drawn once from the space with the run's seed. It is a *persistent* attacker,
as Alg. 1 line 5 warm-starts the one attacker: its φ and optimizer moments carry over between its turns, so
after n turns the outer step sees an attacker n x --inner-steps steps into its fine-tune without paying for
those steps again (a long horizon at the cost of one). A member restarts from the release (fresh φ, fresh
moments) when it has taken its drawn number of steps, and on any turn with probability --attacker-restart.

Which member takes iteration i, and whether it restarts, is a pure function of (seed, i): a resumed run
makes the same draws as an uninterrupted one.

Dense attackers (full fine-tune, DreamBooth) train the UNet's own tensors. Unlike IMMA's line 7 (the
attacker's steps written into θ), the pool keeps them *apart*: their displacement Δ from θ is stored per
member, put on before its turn and taken off before the outer step, whose gradient is the one taken at the
adapted point (first order, as MAML's first-order variant). The release never carries an attacker's steps.
Memory: a dense member keeps Δ and its optimizer moments, about three UNet copies per member.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import UserError
from ..outputs import shown
from ..attacks.methods import LORA_ALL_ATTENTION, is_cross_attention
from ..attacks.spec import AttackSpec
from ..checkpoint import flatten_optimizer, unflatten_optimizer
from ..redteam.space import draw_attacks, load_attack_space
from ..specs import build_spec

SIMULATED = ("lora", "dreambooth-lora", "full", "dreambooth")
"""Attack methods the pool can simulate. Textual inversion is not (it grows the tokenizer, which cannot be undone
between turns, and it leaves the UNet as it is): the pool draws from a space's other methods, and the red team
judges textual inversion; a space with no other method is refused."""
DENSE = ("full", "dreambooth")


def draw_pool(spec) -> list:
    """The pool's attack configurations (AttackSpecs), drawn from `spec.attacker_space` with `spec.seed` among the
    methods it can simulate (`SIMULATED`); refused with one line if the space offers none of them, or fixes one
    it cannot simulate."""

    import dataclasses

    space = load_attack_space(spec.attacker_space, flag="--attacker-space")
    methods = {space.fixed.get("method", "lora")}
    if "method" in space.search:
        (kind, values), = space.search["method"].items()
        simulated = [m for m in values if m in SIMULATED]
        if simulated and len(simulated) < len(values):  # e.g. the red team's space, with textual inversion
            space = dataclasses.replace(space, search={**space.search, "method": {kind: simulated}})
        methods |= set(simulated or values)
    bad = sorted(str(m) for m in methods if m not in SIMULATED)
    if bad:
        raise UserError(f"--attacker-space {shown(spec.attacker_space)}: method {bad[0]} cannot be simulated "
                        f"inside hardening (the pool simulates {', '.join(SIMULATED)})")
    if space.fixed.get("prior_preservation"):
        raise UserError(f"--attacker-space {shown(spec.attacker_space)}: prior preservation is not simulated")
    out = []
    for i, a in enumerate(draw_attacks(space, spec.attacker_pool, spec.seed)):
        a = {k: v for k, v in a.items() if k not in ("checkpoint_every",)}
        a.update(data=".", batch_size=spec.batch_size, token=spec.token, seed=spec.seed * 1000 + i)
        out.append(build_spec(AttackSpec, a, source=f"--attacker-space draw {i}"))
    return out


def trained_tensors(attack, names: list[str]) -> list[bool]:
    """Which UNet tensors a drawn attacker trains, as FreezeAsGuard's pool simulates it: a full fine-tune or
    DreamBooth all of them (attn2 with cross_attention_only), a LoRA the attention projections it adapts
    (dreambooth-lora: attn2's), simulated densely on those tensors (a compliant user's adapter skips frozen
    ones, as the relaxation's (1 − m) does)."""

    out = []
    for n in names:
        if attack.method in ("lora", "dreambooth-lora"):
            ok = any(n.endswith(f".{t}.weight") for t in LORA_ALL_ATTENTION)
            ok = ok and (attack.method == "lora" or is_cross_attention(n))
        else:
            ok = not attack.cross_attention_only or is_cross_attention(n)
        out.append(ok)
    return out


def describe(attack) -> dict:
    """A member's settings as the manifest records them."""
    keys = ("method", "lr", "steps", "rank", "optimizer", "snr_gamma", "noise_offset", "cross_attention_only")
    return {k: getattr(attack, k) for k in keys}


@dataclass
class PoolMember:
    attack: object
    """The drawn AttackSpec (method, lr, rank, ...; `steps` is its horizon)."""
    steps_taken: int = 0
    restarts: int = 0
    phi: dict = field(default_factory=dict)
    """Warm state: LoRA's adapter tensors, or a dense attacker's displacement Δ from θ (by UNet name)."""
    opt: dict | None = None
    """The member's optimizer state_dict (moments), or None before its first step."""

    def reset(self) -> None:
        self.steps_taken, self.phi, self.opt = 0, {}, None
        self.restarts += 1

    @property
    def dense(self) -> bool:
        return self.attack.method in DENSE


class AttackerPool:
    def __init__(self, attacks: list, restart: float, seed: int):
        self.members = [PoolMember(a) for a in attacks]
        self.restart, self.seed = restart, seed
        self.iteration = 0
        """Outer steps taken: which members the next one draws (checkpointed with the members)."""

    def _turn(self, k: int, coin: float) -> tuple[int, bool]:
        """Member k's turn and whether it restarts: at its drawn length, or when the coin falls under the rate."""
        m = self.members[k]
        return k, m.steps_taken > 0 and (m.steps_taken >= m.attack.steps or coin < self.restart)

    def choose_many(self, iteration: int, n: int) -> list[tuple[int, bool]]:
        """`n` distinct members for outer step `iteration` (FreezeAsGuard averages their mask gradients), each
        with its restart flag; a function of (seed, iteration) and the members' progress, as `choose`."""
        import numpy as np

        if n == 1:
            return [self.choose(iteration)]
        rng = np.random.default_rng([self.seed, iteration, 11])
        ks = [int(k) for k in rng.choice(len(self.members), size=n, replace=False)]
        return [self._turn(k, float(coin)) for k, coin in zip(ks, rng.random(n))]

    def choose(self, iteration: int) -> tuple[int, bool]:
        """(member, whether it restarts) for outer iteration `iteration`: a function of (seed, iteration) and
        the member's own progress only, so resuming repeats it."""
        import numpy as np

        rng = np.random.default_rng([self.seed, iteration, 7])
        k = int(rng.integers(len(self.members)))
        return self._turn(k, float(rng.random()))

    # checkpoints: every tensor under pool/, the rest as JSON bytes in one uint8 tensor --------------------
    def state(self) -> dict:
        import torch

        out: dict = {}
        meta: dict = {"iteration": self.iteration, "members": []}
        for k, m in enumerate(self.members):
            for n, v in m.phi.items():
                out[f"pool/{k}/phi/{n}"] = v.detach().cpu().clone()
            opt_meta: dict = {}
            if m.opt is not None:
                flatten_optimizer(f"pool/{k}/opt", m.opt, out, opt_meta)
            meta["members"].append({"steps_taken": m.steps_taken, "restarts": m.restarts,
                                    "opt": opt_meta.get(f"pool/{k}/opt")})
        out["pool/meta"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return out

    def load_state(self, tensors: dict, device=None) -> None:
        """`device`: the UNet's; the checkpoint is read on the CPU, and a member's φ is used beside the UNet (its
        moments follow φ when its optimizer loads them)."""

        meta = json.loads(bytes(tensors["pool/meta"].tolist()).decode())
        self.iteration = meta["iteration"]
        for k, (m, mm) in enumerate(zip(self.members, meta["members"])):
            m.steps_taken, m.restarts = mm["steps_taken"], mm["restarts"]
            prefix = f"pool/{k}/phi/"
            m.phi = {n[len(prefix):]: v.to(device, copy=True) for n, v in tensors.items() if n.startswith(prefix)}
            m.opt = (unflatten_optimizer(f"pool/{k}/opt", tensors, {f"pool/{k}/opt": mm["opt"]})
                     if mm["opt"] is not None else None)
