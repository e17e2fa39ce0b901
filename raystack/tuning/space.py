"""TuneSpace: what a sweep varies, how each trial is attacked and scored, read from tune_spaces/*.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..outputs import shown
from ..search import ALGORITHMS, DISTRIBUTIONS, SCHEDULERS, check_distribution, param_space  # noqa: F401
from ..specs import MAX_COUNT
from ..attacks.spec import AttackSpec, METHODS
from ..hardening.spec import HardenSpec
from ..judges import TINY, judge_spec
from ..outputs import check_plain_name
from ..redteam.space import draw_attacks, load_attack_space
from ..specs import build_spec
from ..tinyworld.concepts import COLOURS, SHAPES, STYLES
from ..tinyworld.folder import check_caption_template, write_concept_folder, write_emblem_folder



@dataclass
class GeneratorSpec:
    """Tiny-world images a sweep writes itself, e.g. `{style: [sunset], n: 2, seed: 1}` or `{emblem: emblem1}`."""

    shape: list[str] | None = None
    """Shapes to draw (default: all)."""
    colour: list[str] | None = None
    """Colours (default: all)."""
    style: list[str] | None = None
    """Styles (default: all)."""
    emblem: str | None = None
    """Photos of this personal emblem instead of shape/colour/style images."""
    n: int | None = None
    """Images per combination (per emblem); default 1 (an emblem: 4)."""
    seed: int = 0
    """Same seed, same images."""
    caption: str | None = None
    """Caption template with {shape}/{colour}/{style} (an emblem: the caption, default 'a photo of sks emblem')."""

    def __post_init__(self):
        if self.n is not None and self.n <= 0:
            raise UserError(f"n {self.n}: must be a positive integer")
        for key, allowed in (("shape", SHAPES), ("colour", COLOURS), ("style", STYLES)):
            for x in getattr(self, key) or []:
                if x not in allowed:
                    raise UserError(f"{key} {shown(x)}: unknown; expected one of {', '.join(allowed)}")
        if self.emblem is None:
            check_caption_template(self.caption, "caption")
        else:
            from ..tinyworld.render import emblem_by_name

            try:
                emblem_by_name(self.emblem)
            except ValueError:
                raise UserError(f"emblem {shown(self.emblem)}: not a tiny-world emblem") from None

    def write(self, dest: Path) -> None:
        if self.emblem is not None:
            write_emblem_folder(dest, self.emblem, self.n or 4, self.seed, self.caption or "a photo of sks emblem",
                                True)
        else:
            write_concept_folder(dest, self.shape, self.colour, self.style, self.n or 1, self.seed, self.caption,
                                 True)


@dataclass
class DataSpec:
    """The sweep's image folders: each a folder path, or a tiny-world generator spec the sweep writes once."""

    target: str | GeneratorSpec | None = None
    """The concept to protect (harden's --target). Required."""
    legal: str | GeneratorSpec | None = None
    """Legal data (harden's --legal; the legal fine-tune's data)."""
    attacker: str | GeneratorSpec | None = None
    """The attacker's own images (default: the target's)."""

    def __post_init__(self):
        if self.target is None:
            raise UserError("target: the concept to protect is needed")

    def folders(self) -> dict[str, str]:
        """The roles given as folder paths."""
        return {r: v for r in ("target", "legal", "attacker") if isinstance(v := getattr(self, r), str)}


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
    target_concept: str | None = None
    """Tiny-world concept scored for mitigation (a style, shape, emblem or colour-style-shape object; default
    sunset); with a concept file, its name (the default)."""
    judge: str = "tiny"
    """Who scores mitigation and utility: tiny (the tiny world's classifier: tiny-world models only) or clip:DIR
    (CLIP zero-shot from a local CLIP folder, any model; needs `concepts`)."""
    concepts: str | dict | None = None
    """The CLIP judge's concept file (concepts/*.yaml: the target's prompts and labels, its alternatives, the other
    concepts utility keeps), or its content as a mapping."""
    data: DataSpec = field(default_factory=lambda: DataSpec(target=GeneratorSpec(style=["sunset"])))
    """Image folders {target, legal, attacker}; a tiny-world generator spec ({style: .., n: .., seed: ..})
    instead of a path makes the sweep create it (see DataSpec, GeneratorSpec)."""
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
    mitigation: str = "mean"
    """How a trial's attacks make its mitigation: mean (their average target accuracy) or worst (the strongest
    of them: a small worst case, so a setting is chosen against its best attacker, not the default one)."""
    attacker_space: str | None = None
    """An attack space (attack_spaces/*.yaml) from which every trial draws `attacker_draws` more attacks: the
    same draws for every trial (seeded by `attacker_seed`), an inner random-search red team."""
    attacker_draws: int = 0
    """Attacks drawn from `attacker_space` per trial, beside `attacks`."""
    attacker_seed: int = 0
    """Seed of the draws from `attacker_space`."""
    utility_guard: float = 0.0
    """Skip attacking a setting that already ruined the model (TamperBench): a hardened model keeping less than
    utility_guard x the unhardened model's utility counts as fully broken (mitigation 1.0) without an attack."""

    def _resolve_attacker_spaces(self) -> None:
        """harden's attacker space (robust hardening), fixed or searched (e.g. {grid: [null, a.yaml, b.yaml]}: the
        attacker distribution's width as a setting), as absolute paths: trials run in their own folders."""
        self.harden = {**self.harden, **({"attacker_space": _resolved_if_file(self.harden["attacker_space"])}
                                         if "attacker_space" in self.harden else {})}
        dist = self.search.get("attacker_space")
        if isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in ("grid", "choice"):
            kind, vals = next(iter(dist.items()))
            if isinstance(vals, list):
                self.search = {**self.search, "attacker_space": {kind: [_resolved_if_file(v) for v in vals]}}

    def _resolve_judge(self) -> None:
        """The judge checked now (the CLIP folder from its config, the concept file strictly), the concept file
        read once: its content replaces its path (trials get it in their config, not the file), the CLIP folder
        is made absolute, and target_concept is the concept file's name (sunset by default on the tiny world)."""

        if self.judge == TINY and self.concepts is None and self.target_concept is None:
            self.target_concept = "sunset"
        spec = judge_spec(self.judge, self.concepts, self.target_concept, flag="judge", concepts_flag="concepts",
                          target_flag="target_concept")
        if spec["kind"] != TINY:  # absolute: trials run in their own folders
            self.judge, self.concepts, self.target_concept = (f"clip:{spec['clip']}", spec["concepts"],
                                                              spec["concepts"]["name"])

    def judge_spec(self) -> dict:
        """The sweep's judge (`judges.judge_spec`), as trials load it."""
        from ..judges import CLIP, TINY, parse_judge

        kind, folder = parse_judge(self.judge, "judge")
        if kind == TINY:
            return {"kind": TINY, "target": self.target_concept}
        return {"kind": CLIP, "clip": str(folder.resolve()), "concepts": self.concepts}

    @property
    def workers(self) -> int:
        """Ray Train workers of every trial's harden run."""
        w = self.harden.get("workers", 1)
        return w if isinstance(w, int) and w > 0 else 1

    def __post_init__(self):
        check_plain_name(self.name, "name")
        self._resolve_judge()
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"algorithm {self.algorithm}: expected one of {', '.join(ALGORITHMS)}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"scheduler {self.scheduler}: expected one of {', '.join(SCHEDULERS)}")
        if not isinstance(self.search, dict) or not self.search:
            raise UserError("search: at least one harden setting to vary is needed")
        if not 0 < self.samples <= MAX_COUNT:
            raise UserError(f"samples {self.samples}: must be a positive integer, at most {MAX_COUNT}")
        for key, weight in (("mitigation_weight", self.mitigation_weight), ("utility_weight", self.utility_weight)):
            if weight < 0:
                raise UserError(f"{key} {weight}: must not be negative")
        for key, n in (("eval_samples", self.eval_samples), ("eval_steps", self.eval_steps)):
            if not 0 < n <= MAX_COUNT:
                raise UserError(f"{key} {n}: must be a positive integer, at most {MAX_COUNT}")

        self._resolve_attacker_spaces()
        base = {**self.harden}
        base.setdefault("target", ["."])
        base.setdefault("legal", ".")
        base.setdefault("out", "probe")
        for key, dist in self.search.items():
            check_distribution(key, dist)
        # the fixed settings with one value of every varied one: names and types are checked now, not in trial 3
        build_spec(HardenSpec, {**base, **{k: _example(v) for k, v in self.search.items()}}, source="harden/search")
        for key, dist in self.search.items():
            kind, vals = next(iter(dist.items()))
            # every value (both bounds of a range) must make a valid harden spec: names, types, finiteness and
            # ranges are checked now, not in trial 3
            for i, v in enumerate(vals):
                try:
                    build_spec(HardenSpec, {**base, key: v}, source=f"search.{key}.{kind}[{i}]")
                except UserError as e:
                    raise UserError(f"search.{key}: {shown(v)}: {e}") from None
        if not isinstance(self.attacks, list) or not self.attacks:
            raise UserError("attacks: at least one attack scores mitigation")
        if self.mitigation not in ("mean", "worst"):
            raise UserError(f"mitigation {shown(self.mitigation)}: expected mean or worst")
        if not 0.0 <= self.utility_guard <= 1.0:
            raise UserError(f"utility_guard {self.utility_guard}: must be within [0, 1]")
        if self.attacker_draws < 0 or self.attacker_seed < 0:
            raise UserError("attacker_draws and attacker_seed: must not be negative")
        if self.attacker_draws and not self.attacker_space:
            raise UserError(f"attacker_draws {self.attacker_draws}: needs attacker_space (an attack space file)")
        if self.attacker_space:
            from pathlib import Path

            if not Path(self.attacker_space).is_file():
                raise UserError(f"attacker_space {shown(self.attacker_space)}: no such file")
            # resolved now: trials run in their own folders
            self.attacker_space = str(Path(self.attacker_space).resolve())
            drawn_attacks(self)  # checked now, not in trial 3: every draw must make a valid attack

        checks = [(f"attacks[{i}]", a) for i, a in enumerate(self.attacks)]
        if self.legal_finetune is not None:
            checks.append(("legal_finetune", self.legal_finetune))
        for where, a in checks:
            if not isinstance(a, dict):
                raise UserError(f"{where}: expected a mapping of attack settings (e.g. {{method: lora}}), "
                                f"got {shown(a)}")
            if a.get("method") not in METHODS:
                raise UserError(f"{where}: unknown method {shown(a.get('method'))!r}; expected one of "
                                f"{', '.join(METHODS)}")
            build_spec(AttackSpec, {"data": ".", **a}, source=where)


def drawn_attacks(space: TuneSpace, attacker_data=None) -> list[dict]:
    """The attacks every trial draws from `attacker_space` (the same for every trial). With the attacker's data,
    each runs as the red team runs it (`redteam.sweep.attacker_settings`: textual inversion on the concept's word
    of the captions, DreamBooth with prior preservation)."""
    if not space.attacker_draws:
        return []
    from ..attacks.spec import AttackSpec
    from ..specs import build_spec

    attack_space = load_attack_space(space.attacker_space)
    drawn = draw_attacks(attack_space, space.attacker_draws, space.attacker_seed)
    if attacker_data is not None:
        from ..redteam.space import attacker_settings, concept_word

        concept = sweep_target(space)
        word = concept_word(attack_space, concept, attacker_data, flag="attacker data") if concept else None
        drawn = [{**a, **attacker_settings(a, word)} for a in drawn]
    for i, a in enumerate(drawn):
        build_spec(AttackSpec, {"data": ".", **a}, source=f"attacker_space draw {i}")
    return drawn


def sweep_target(space: TuneSpace) -> str | None:
    """The sweep's target concept's name (the tiny-world concept, or the concept file's name)."""
    spec = space.judge_spec()
    if spec.get("kind") == "tiny":
        return spec.get("target")
    concepts = spec.get("concepts")
    return concepts.get("name") if isinstance(concepts, dict) else None


def _resolved_if_file(value):
    from pathlib import Path

    return str(Path(value).resolve()) if isinstance(value, str) and Path(value).is_file() else value


def _example(dist: dict):
    return next(iter(dist.values()))[0]


def load_space(path: Path, overrides: list[str] | None = None, extra: dict | None = None) -> TuneSpace:
    """The space file, with `--set KEY=VALUE` overrides (e.g. harden.seed=1 for a second seed), then `extra`
    top-level keys (tune's --judge and --concepts)."""
    from ..specs import apply_overrides, build_spec, read_yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--space {shown(str(path))}: no such file")
    values = {**apply_overrides(read_yaml(path, "--space"), overrides or []), **(extra or {})}
    return build_spec(TuneSpace, values, source=str(path))
