"""TuneSpace: what a sweep varies, how each trial is attacked and scored, read from tune_spaces/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

ALGORITHMS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")


@dataclass
class TuneSpace:
    name: str
    """Sweep name: the folder under --out and the name Ray Tune resumes by."""
    harden: dict
    """Fixed harden settings (any `immunize-cli harden` flag, dashes as underscores)."""
    search: dict
    """Varied harden settings: {flag: {grid|choice: [values]} or {uniform|loguniform: [low, high]}}."""
    attacks: list = field(default_factory=lambda: [{"method": "lora"}])
    """Attacks run on every hardened model (AttackSpec fields; `data` defaults to the attacker's images)."""
    legal_finetune: dict | None = None
    """Optional legal fine-tune (AttackSpec fields on the legal data) after which utility is measured; without
    it utility is measured on the hardened model itself."""
    target_concept: str = "sunset"
    """Tiny-world concept scored for mitigation (a style, shape, emblem or colour-style-shape object)."""
    data: dict = field(default_factory=dict)
    """Image folders {target, legal, attacker}; a tiny-world generator spec ({style: .., n: .., seed: ..})
    instead of a path makes the sweep create it."""
    mitigation_weight: float = 1.0
    """Scalarised objective = utility_weight * utility - mitigation_weight * mitigation (maximised)."""
    utility_weight: float = 1.0
    """See mitigation_weight."""
    algorithm: str = "random"
    """random (or grid values expanded), grid, or optuna (needs the optuna package)."""
    scheduler: str = "asha"
    """asha: stop trials early on intermediate results (after each attack checkpoint); fifo: never."""
    samples: int = 4
    """Trials (for grid: repetitions of the whole grid)."""
    eval_samples: int = 12
    """Images per concept when scoring."""
    eval_steps: int = 15
    """Sampler steps when scoring."""

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"algorithm {self.algorithm}: expected one of {', '.join(ALGORITHMS)}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"scheduler {self.scheduler}: expected one of {', '.join(SCHEDULERS)}")
        if not self.search:
            raise UserError("search: at least one harden setting to vary is needed")
        for key, dist in self.search.items():
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise UserError(f"search.{key}: expected one of {', '.join(DISTRIBUTIONS)} with its values")
            kind, vals = next(iter(dist.items()))
            if not isinstance(vals, list) or not vals:
                raise UserError(f"search.{key}.{kind}: expected a non-empty list")
            if kind in ("uniform", "loguniform") and (len(vals) != 2 or not vals[0] < vals[1]):
                raise UserError(f"search.{key}.{kind}: expected [low, high] with low < high")
            if kind == "loguniform" and vals[0] <= 0:
                raise UserError(f"search.{key}.loguniform: bounds must be positive")
            if key == "rho":
                bad = [v for v in vals if not 0.0 <= float(v) <= 1.0]
                if bad:
                    raise UserError(f"search.rho: {bad[0]} is outside [0, 1]")
        if self.samples <= 0:
            raise UserError(f"samples {self.samples}: must be a positive integer")
        if not self.attacks:
            raise UserError("attacks: at least one attack scores mitigation")
        from ..attacks.spec import METHODS

        for a in self.attacks + ([self.legal_finetune] if self.legal_finetune else []):
            if a.get("method") not in METHODS:
                raise UserError(f"attacks: unknown method {a.get('method')!r}; expected one of {', '.join(METHODS)}")
        from ..hardening.spec import HardenSpec
        from ..specs import build_spec

        probe = {**self.harden, **{k: _example(v) for k, v in self.search.items()}}
        probe.setdefault("target", ["."])
        probe.setdefault("legal", ".")
        probe.setdefault("out", "probe")
        build_spec(HardenSpec, probe, source="harden/search")  # names and types are checked now, not in trial 3


def _example(dist: dict):
    return next(iter(dist.values()))[0]


def param_space(space: TuneSpace) -> dict:
    from ray import tune

    out = {}
    for key, dist in space.search.items():
        kind, vals = next(iter(dist.items()))
        if kind == "grid":
            out[key] = tune.grid_search(vals) if space.algorithm in ("grid", "random") else tune.choice(vals)
        elif kind == "choice":
            out[key] = tune.choice(vals)
        elif kind == "uniform":
            out[key] = tune.uniform(*vals)
        else:
            out[key] = tune.loguniform(*vals)
    return out


def load_space(path: Path, overrides: list[str] | None = None) -> TuneSpace:
    """The space file, with `--set KEY=VALUE` overrides (e.g. harden.seed=1 for a second seed)."""
    from ..specs import apply_overrides, build_spec, read_yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--space {path}: no such file")
    return build_spec(TuneSpace, apply_overrides(read_yaml(path, "--space"), overrides or []), source=str(path))
