"""HardenSpec: the whole hardening job as one typed, validated record (YAML keys equal the flags).

The CLI builds harden's flags from this module when `--help` is asked, so it imports only the light config
modules at the top; the method registry and the phases (which reach numpy and the samplers) are imported where a
spec is checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..attacks.spec import DEFAULT_RANK
from ..attacks.spec import METHODS as ATTACK_METHODS
from ..attacks.spec import check_precision_flag, check_resolution_flag
from ..errors import UserError
from ..outputs import shown
from ..specs import check_finite_fields

INNER_OPTIMIZERS = ("adamw", "sgd")
RETAIN_TARGETS = ("data", "original")
IMMA_OBJECTIVES = ("ascent", "hold-erasure")
#: attackers one robust-hardening run may draw (and simulate per step): each keeps its own state on every worker
MAX_ATTACKER_POOL = 64


def path_or_uri(value, flag: str):
    """A path flag that also takes object storage: a URI (checked, kept as text) or a local Path."""
    from ..outputs import check_local_path
    from ..storage import check_uri, is_uri

    if not isinstance(value, str):
        return value
    if is_uri(value):
        return check_uri(value, flag)
    check_local_path(value, flag)  # its one line for a malformed URI such as s3:/x
    return Path(value)


def check_concept_words(concept: str, anchor: str) -> None:
    """--concept names at least one word; --anchor (what the word becomes) is not one of them."""
    words = [w.strip() for w in str(concept).split(",") if w.strip()]
    if not words:
        raise UserError(f"--concept {shown(concept)}: names no word; give the concept's word(s) as its captions name "
                        "them, comma-separated (e.g. dotted)")
    if anchor and " ".join(anchor.split()) in words:
        raise UserError(f"--anchor {shown(anchor)}: the same as the concept's word; the anchor is what the concept "
                        "becomes (e.g. --concept dotted --anchor plain)")


@dataclass
class HardenSpec:
    # Model, data and output ---------------------------------------------------
    method: str = "imma"
    """imma | freezeasguard | random-freeze | imma+freeze."""
    model: str | None = None
    """Pipeline folder to harden (default: the tiny world)."""
    target: list[Path | str] = field(default_factory=list)
    """Image folders of the illegal concept(s) (metadata.jsonl with captions); one or more; local, or
    object-storage URIs (s3://, gs://: each machine fetches them once)."""
    legal: Path | str | None = None
    """Image folder of legal data (local or a URI): IMMA's retain term, FreezeAsGuard's legal loss."""
    against: str = "lora"
    """The attacker's adaptation method simulated inside: lora, dreambooth, dreambooth-lora, textual-inversion, full."""
    out: Path | str | None = None
    """Output folder: hardened pipeline, freeze_mask.safetensors, manifest.json (written atomically); or an
    object-storage URI (s3://bucket/release, gs://...): written locally, then uploaded with manifest.json last."""
    # Where and how it runs ------------------------------------------------------------------------
    cluster: str | None = None
    """Ray cluster address ('auto' for the running one); none: an embedded local Ray."""
    workers: int = 1
    """Ray Train workers (each one DeepSpeed rank)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3: from 1, optimizer state is partitioned across the workers (FreezeAsGuard's
    preparation too); from 2, gradients; at 3, parameters and FreezeAsGuard's second UNet copy."""
    use_gpu: bool = field(default=False, metadata={"flag": "--use-gpu/--cpu"})
    """One GPU per worker (nccl) instead of CPU workers (gloo)."""
    seed: int = 0
    """Seeds data order, noise, timesteps and initialisations."""
    steps: int = 100
    """Outer iterations: IMMA's I, FreezeAsGuard's mask steps K."""
    batch_size: int = 4
    """Images per batch and worker."""
    precision: str = "fp32"
    """fp32, or bf16 compute (torch autocast: weights and optimizer state stay fp32)."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass instead of keeping them (diffusers' gradient
    checkpointing): less activation memory at real sizes, roughly a third more time per step."""
    resolution: int | None = None
    """Image size (pixels, square) to train at: each image's short side is resized to it and the centre
    cropped, as the diffusers training examples do (any sizes in one folder); default: the model's own."""
    checkpoint_every: int = 25
    """Report a resumable checkpoint to Ray Train every N outer steps."""
    max_failures: int = 0
    """Ray Train FailureConfig: restart the workers from the last checkpoint up to N times (-1: forever)."""
    resume: bool = False
    """Continue the run found in --out's run folder instead of starting over."""
    keep_run: bool = False
    """Keep --out's run folder (`<out>.run`: Ray Train's checkpoints) after a successful run; by default it is
    removed once --out is written, since only an unfinished run can be resumed from it."""
    overwrite: bool = False
    """Replace --out if it exists."""
    sign_key: Path | None = None
    """Ed25519 private key (PEM): sign manifest.json into manifest.sig (`verify --public-key` checks it)."""
    placement_timeout: float | None = None
    """Seconds to wait for a cluster to grow (autoscaling) or free resources until the workers are placed;
    default: fail at once if the cluster has fewer CPUs/GPUs in total, wait up to 600 s while it is busy."""
    # IMMA -------------------------------------------------------------------------------------------
    outer_lr: float = 1e-3
    """IMMA α: Adam learning rate of the outer ascent on S."""
    inner_lr: float | None = None
    """IMMA β: learning rate of the simulated attacker's inner step (default: the attack method's own lr)."""
    inner_optimizer: str = "adamw"
    """IMMA: the simulated attacker's update: adamw (the attack library's step: AdamW, gradient clipping,
    its loss weighting; moments warm-started with φ) or sgd (Alg. 1's φ − β∇ literally)."""
    inner_steps: int = 1
    """IMMA: attacker steps per outer iteration (paper: 1)."""
    params: str = "attn2"
    """IMMA S: UNet parameters whose name contains any of these comma-separated patterns."""
    retain_weight: float = 0.0
    """IMMA: weight of the ordinary loss on --legal data (keeps other concepts; 0 = paper)."""
    retain_target: str = "data"
    """IMMA retain term's target: data (the denoising loss on --legal) or original (match the unhardened
    UNet's predictions on --legal: same optimum, no irreducible noise in the gradient; one more UNet copy)."""
    token: str = "zxq"
    """Defender's identifier for DreamBooth/TI simulation; deliberately not the attacker's."""
    rank: int = DEFAULT_RANK
    """LoRA rank of the simulated attacker (the attack default)."""
    outer_timesteps: str | None = None
    """IMMA: timestep range LO-HI (e.g. 500-1000) of the outer ascent's loss; none: every timestep, as the
    attacker's loss (paper)."""
    imma_objective: str = "ascent"
    """IMMA's outer objective at the simulated attacker's adapted point: ascent (Alg. 1: raise the attacker's
    loss on --target) or hold-erasure (for erased weights: the concept's captions, attacker adapter on, still
    predict what the input model predicts for the --anchor caption on the same noisy image; needs --concept)."""
    jpeg_mix: float = 0.0
    """IMMA: share of JPEG-compressed copies mixed into the target images (robustness to compression)."""
    # Robust hardening: attackers drawn from a space ----------------------------------------------
    attacker_space: Path | None = None
    """Robust hardening: simulate attackers drawn from this attack space (attack_spaces/*.yaml, the red team's
    format) instead of the one --against attacker (IMMA) or the one fine-tuning user (FreezeAsGuard): a pool of
    persistent attackers, each warm-started between its turns."""
    attacker_pool: int = 4
    """With --attacker-space: attackers drawn from the space (IMMA: one takes --inner-steps per outer iteration;
    FreezeAsGuard: --attackers-per-step take --user-steps per mask step); dense ones keep about three UNet
    copies each."""
    attacker_restart: float = 0.0
    """With --attacker-space: chance per turn that the drawn attacker starts over (IMMA: from the release;
    FreezeAsGuard: from θ_ft); it also does after its drawn number of steps."""
    attackers_per_step: int = 1
    """FreezeAsGuard with --attacker-space: simulated users per mask step (their mask gradients are averaged)."""
    # FreezeAsGuard ----------------------------------------------------------------------------------
    rho: float = 0.3
    """Freezing ratio ρ: share of UNet tensors frozen."""
    lambda1: float | None = None
    """Weight of the illegal loss (default: proportional to the amount of illegal data)."""
    lambda2: float | None = None
    """Weight of the legal loss (default: proportional to the amount of legal data)."""
    mask_lr: float = 10.0
    """η1: step size of the mask logits."""
    user_lr: float = 1e-4
    """η2: learning rate of the simulated fine-tuning user."""
    user_steps: int = 10
    """L: simulated user steps per mask step (paper: 10)."""
    temperature: float = 0.2
    """T in m = σ(w / T)."""
    finetune_steps: int = 100
    """Steps of the mixed illegal + legal fine-tune that gives θ_ft."""
    # Concept erasure (erase, or harden --erase before --method) -----------------------------------
    erase: str | None = None
    """Erase the concept first, in the same job: uce, esd-x or ablation (then --method hardens the result)."""
    concept: str | None = None
    """Erasure: the concept's word(s) in the --target captions, comma-separated (e.g. dotted)."""
    anchor: str = ""
    """Erasure: what the concept's word becomes (e.g. plain; empty: the word is dropped)."""
    erase_steps: int = 300
    """Erasure (esd-x, ablation): training steps on the cross-attention."""
    erase_lr: float = 1e-3
    """Erasure (esd-x, ablation): Adam learning rate."""
    erase_retain_weight: float = 10.0
    """Erasure (esd-x, ablation): weight of keeping the original's predictions on --legal."""
    esd_guidance: float = 1.0
    """ESD's negative guidance η."""
    esd_neutral: str = "anchor"
    """ESD-x's concept-free prediction: anchor (the caption with the concept's word replaced by --anchor, so
    only the concept is guided away) or empty (the paper's ε(x, ∅), which also guides away what the rest of a
    full caption names)."""
    uce_preserve_scale: float = 1.0
    """UCE: weight of keeping the projections on the --legal captions."""

    def __post_init__(self):
        check_finite_fields(self)
        self.out = path_or_uri(self.out, "--out")
        self.target = [path_or_uri(t, "--target") for t in self.target]
        self.legal = path_or_uri(self.legal, "--legal")
        from .methods import method_names

        if self.method not in method_names():
            raise UserError(f"--method {shown(self.method)}: unknown hardening method; expected one of "
                            f"{', '.join(method_names())}")
        if self.against not in ATTACK_METHODS:
            raise UserError(f"--against {shown(self.against)}: unknown attack method; expected one of "
                            f"{', '.join(ATTACK_METHODS)}")
        if not 0.0 <= self.rho <= 1.0:
            raise UserError(f"--rho {self.rho}: must be within [0, 1]")
        if self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"--zero-stage {self.zero_stage}: expected 0, 1, 2 or 3")
        check_resolution_flag(self.resolution)
        check_precision_flag(self.precision, self.use_gpu)
        for flag, v in (("--workers", self.workers), ("--steps", self.steps), ("--batch-size", self.batch_size),
                        ("--checkpoint-every", self.checkpoint_every), ("--inner-steps", self.inner_steps),
                        ("--user-steps", self.user_steps), ("--rank", self.rank)):
            if v <= 0:
                raise UserError(f"{flag} {v}: must be a positive integer")
        if self.max_failures < -1:
            raise UserError(f"--max-failures {self.max_failures}: expected -1 (retry forever) or more")
        if self.finetune_steps < 0:
            raise UserError(f"--finetune-steps {self.finetune_steps}: must not be negative")
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise UserError(f"--inner-optimizer {shown(self.inner_optimizer)}: expected one of {', '.join(INNER_OPTIMIZERS)}")
        if self.retain_target not in RETAIN_TARGETS:
            raise UserError(f"--retain-target {shown(self.retain_target)}: expected one of {', '.join(RETAIN_TARGETS)}")
        if self.inner_lr is not None and not self.inner_lr > 0:
            raise UserError(f"--inner-lr {self.inner_lr}: must be positive")
        for flag, v in (("--outer-lr", self.outer_lr), ("--mask-lr", self.mask_lr),
                        ("--user-lr", self.user_lr), ("--temperature", self.temperature)):
            if not v > 0:
                raise UserError(f"{flag} {v}: must be positive")
        for flag, v in (("--retain-weight", self.retain_weight), ("--lambda1", self.lambda1),
                        ("--lambda2", self.lambda2)):
            if v is not None and v < 0:
                raise UserError(f"{flag} {v}: must not be negative (it weights a loss term)")
        if self.lambda1 is not None and self.lambda2 is not None and self.lambda1 + self.lambda2 == 0:
            raise UserError("--lambda1 0 --lambda2 0: at least one loss must have a positive weight")
        if self.placement_timeout is not None and not self.placement_timeout > 0:
            raise UserError(f"--placement-timeout {self.placement_timeout}: must be positive")
        if self.sign_key is not None:
            self.sign_key = Path(self.sign_key)
        if not 0.0 <= self.jpeg_mix <= 1.0:
            raise UserError(f"--jpeg-mix {self.jpeg_mix}: must be within [0, 1]")
        _ = self.outer_timestep_range  # validates --outer-timesteps
        if self.erase is not None:
            from .erase import ERASERS

            if self.erase not in ERASERS:
                raise UserError(f"--erase {shown(self.erase)}: expected one of {', '.join(ERASERS)}")
            if self.method in ERASERS:
                raise UserError(f"--erase {self.erase} --method {self.method}: two erasures; --method names the "
                                "hardening that follows the erasure (e.g. imma or freezeasguard)")
        phases = self.phases()
        if self.imma_objective not in IMMA_OBJECTIVES:
            raise UserError(f"--imma-objective {shown(self.imma_objective)}: expected one of {', '.join(IMMA_OBJECTIVES)}")
        erasing = any(p.name in ("uce", "esd-x", "ablation") for p in phases)
        if self.imma_objective != "ascent" and not any(p.name == "imma" for p in phases):
            raise UserError(f"--imma-objective {self.imma_objective}: --method {self.method} runs no IMMA step; use "
                            "it with --method imma (or a method that includes IMMA)")
        if not erasing and self.imma_objective != "hold-erasure":
            for flag, v in (("--concept", self.concept), ("--anchor", self.anchor)):
                if v:
                    raise UserError(f"{flag} {shown(v)}: used only by an erasure (--erase, or erase --method) or by "
                                    "--imma-objective hold-erasure; this run has neither")
        if self.concept is not None:
            check_concept_words(self.concept, self.anchor)
        if self.imma_objective == "hold-erasure" and not self.concept:
            raise UserError("--imma-objective hold-erasure: give the erased concept's word(s) as --concept (and its "
                            "--anchor), as its --target captions name it")
        if erasing and not self.concept:
            raise UserError("--concept: erasure needs the concept's word(s) as its captions name it (e.g. --concept "
                            "dotted)")
        if self.esd_neutral not in ("anchor", "empty"):
            raise UserError(f"--esd-neutral {shown(self.esd_neutral)}: expected anchor or empty")
        for flag, v in (("--erase-steps", self.erase_steps),):
            if v <= 0:
                raise UserError(f"{flag} {v}: must be a positive integer")
        for flag, v in (("--erase-lr", self.erase_lr), ("--esd-guidance", self.esd_guidance)):
            if not v > 0:
                raise UserError(f"{flag} {v}: must be positive")
        for flag, v in (("--erase-retain-weight", self.erase_retain_weight),
                        ("--uce-preserve-scale", self.uce_preserve_scale)):
            if v < 0:
                raise UserError(f"{flag} {v}: must not be negative (it weights a loss term)")
        if any(p.needs_target for p in phases) and not self.target:
            raise UserError("--target: at least one image folder of the concept to protect is needed")
        self._check_attacker_space(phases)
        needs_legal = [p.name for p in phases if p.needs_legal]
        if needs_legal and self.legal is None:
            raise UserError(f"--legal: {needs_legal[0]} needs an image folder of legal data")

    def _check_attacker_space(self, phases) -> None:
        for flag, v in (("--attacker-pool", self.attacker_pool), ("--attackers-per-step", self.attackers_per_step)):
            if v <= 0:
                raise UserError(f"{flag} {v}: must be a positive integer")
            if v > MAX_ATTACKER_POOL:
                raise UserError(f"{flag} {v}: at most {MAX_ATTACKER_POOL} (each simulated attacker keeps its own "
                                "state on every worker)")
        if not 0.0 <= self.attacker_restart <= 1.0:
            raise UserError(f"--attacker-restart {self.attacker_restart}: must be within [0, 1]")
        if self.attacker_space is None:
            return
        self.attacker_space = Path(self.attacker_space)
        if not any(p.draws_attackers for p in phases):
            raise UserError(f"--attacker-space: --method {self.method} simulates no attacker (imma, freezeasguard "
                            "and imma+freeze do)")
        if self.attackers_per_step > self.attacker_pool:
            raise UserError(f"--attackers-per-step {self.attackers_per_step}: more than the --attacker-pool of "
                            f"{self.attacker_pool}")
        if not self.attacker_space.is_file():
            raise UserError(f"--attacker-space {shown(self.attacker_space)}: no such file")
        if self.inner_lr is not None or self.inner_optimizer != "adamw":
            raise UserError("--attacker-space: each drawn attacker brings its own learning rate and optimizer; "
                            "leave --inner-lr and --inner-optimizer unset")
        self.attacker_space = self.attacker_space.resolve()
        from .attacker_pool import draw_pool

        draw_pool(self)  # refuses a space the pool cannot simulate, on the driver

    def localize_inputs(self) -> "HardenSpec":
        """--model, --target and --legal given as URIs replaced by this machine's fetched copies (on each worker,
        and wherever the data is read in this process); the driver ships the URIs, never its own paths."""
        from ..models.pipeline_io import resolve_model_path
        from ..storage import is_uri, local_input

        if is_uri(self.model):
            self.model = str(resolve_model_path(self.model))
        self.target = [local_input(t, "--target") for t in self.target]
        self.legal = local_input(self.legal, "--legal") if self.legal is not None else None
        return self

    def phases(self) -> tuple:
        """The phases this job runs: the --erase phase (if any), then --method's."""
        from .methods import method_phases

        if self.erase is None:
            return method_phases(self.method)
        from .erase import ERASERS

        return (ERASERS[self.erase], *method_phases(self.method))

    @property
    def outer_timestep_range(self) -> tuple[int, int] | None:
        if self.outer_timesteps is None:
            return None
        try:
            lo, hi = (int(x) for x in str(self.outer_timesteps).split("-"))
        except ValueError:
            lo, hi = -1, -1
        if not 0 <= lo < hi:
            raise UserError(f"--outer-timesteps {shown(self.outer_timesteps)}: expected LO-HI with 0 <= LO < HI, e.g. 500-1000")
        return lo, hi

    @property
    def param_patterns(self) -> list[str]:
        return [p.strip() for p in self.params.split(",") if p.strip()]
