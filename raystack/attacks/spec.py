"""AttackSpec: every knob of a simulated malicious fine-tune, validated with the flag's name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..outputs import shown
from ..models.pipeline_io import model_family, resolve_model_path
from ..outputs import check_disjoint, check_new_output
from ..runtime import PRECISIONS
from ..specs import check_finite_fields

METHODS = ("lora", "dreambooth", "dreambooth-lora", "textual-inversion", "full")
OPTIMIZERS = ("adamw", "adafactor")
DEFAULT_RANK = 8  # kohya-style LoRA rank; IMMA's simulated attacker uses the same

#: Defaults scaled for the tiny world on 2 CPU cores (a few minutes each); real SD users pass their own.
#: The LoRA methods run what kohya-style users run (rank 8, alpha = rank, min-SNR γ = 5, offset noise
#: 0.1) at a learning rate and step count sized so the default attack re-learns the held-out style
#: (bench/results/attacks.md). Unlisted knobs: rank 8, no min-SNR, no offset noise.
METHOD_DEFAULTS: dict[str, dict] = {
    "lora": {"steps": 400, "lr": 3e-3, "rank": DEFAULT_RANK, "snr_gamma": 5.0, "noise_offset": 0.1},
    "dreambooth": {"steps": 400, "lr": 5e-4},
    "dreambooth-lora": {"steps": 400, "lr": 3e-3, "rank": DEFAULT_RANK, "snr_gamma": 5.0, "noise_offset": 0.1},
    "textual-inversion": {"steps": 400, "lr": 5e-3},
    "full": {"steps": 200, "lr": 1e-4},
}

#: Defaults for real Stable Diffusion models (SD-1.x, SD-2.x and SDXL at the published width, `model_family`): the
#: settings the tools attackers run ship with (shared/REDTEAM_NOTES.md; the diffusers examples' READMEs): LoRA lr 1e-4,
#: rank 4, 15,000 steps at batch 1 x 4 accumulation (train_text_to_image_lora; kohya sd-scripts' default is 1,600
#: steps, ai-toolkit's 2,000); DreamBooth lr 5e-6, 800 steps, batch 1, prior preservation on 200 class images the
#: model generates itself (train_dreambooth); DreamBooth-LoRA lr 1e-4, 500 steps, batch 1 (train_dreambooth_lora);
#: textual inversion lr 5e-4, 3,000 steps, batch 1 x 4 (textual_inversion; its --scale_lr multiplies the rate by
#: the batch); full fine-tune lr 1e-5, 15,000 steps, batch 1 x 4 (train_text_to_image). Plain MSE and no offset
#: noise (the examples' defaults), checkpoints every 500 steps (their --checkpointing_steps), a dense method's
#: every 1,500 (each is a whole UNet). The tiny world keeps METHOD_DEFAULTS (bench numbers depend on them).
SD_METHOD_DEFAULTS: dict[str, dict] = {
    "lora": {"steps": 15000, "lr": 1e-4, "rank": 4, "batch_size": 4, "checkpoint_every": 500},
    "dreambooth": {"steps": 800, "lr": 5e-6, "batch_size": 1, "prior_preservation": True, "num_class_images": 200,
                   "checkpoint_every": 400},
    "dreambooth-lora": {"steps": 500, "lr": 1e-4, "rank": 4, "batch_size": 1, "checkpoint_every": 100},
    "textual-inversion": {"steps": 3000, "lr": 5e-4, "batch_size": 4, "checkpoint_every": 500},
    "full": {"steps": 15000, "lr": 1e-5, "batch_size": 4, "checkpoint_every": 1500},
}
#: what every family shares where its table is silent
COMMON_DEFAULTS = {"batch_size": 4, "prior_preservation": False, "num_class_images": 16, "snr_gamma": 0.0,
                   "noise_offset": 0.0, "rank": DEFAULT_RANK}


def method_defaults(method: str, model) -> dict:
    """The defaults of an attack method on a model: the tiny world's (METHOD_DEFAULTS, for the tiny world and
    reduced-width models) or real Stable Diffusion's (SD_METHOD_DEFAULTS), chosen from the model folder's configs
    (`pipeline_io.model_family`)."""

    table = METHOD_DEFAULTS if model_family(model) == "tiny" else SD_METHOD_DEFAULTS
    return {**COMMON_DEFAULTS, **table[method]}


#: what the defaults table of `attack --help` shows per method, in this order
_SHOWN_DEFAULTS = (("steps", "steps"), ("lr", "lr"), ("rank", "rank"), ("batch_size", "batch"),
                   ("snr_gamma", "min-SNR"), ("noise_offset", "offset noise"), ("prior_preservation", "prior preservation"))


def defaults_help() -> str:
    """The attack defaults as `attack --help` shows them: one line per method and model family, made from
    METHOD_DEFAULTS and SD_METHOD_DEFAULTS (so the help cannot drift from what runs)."""
    lines = ["Defaults per method (a flag or config key overrides each):", ""]
    for family, table in (("tiny world", METHOD_DEFAULTS), ("SD-1.x/2.x/XL", SD_METHOD_DEFAULTS)):
        for method in METHODS:
            d = {**COMMON_DEFAULTS, **table[method]}
            shown = [label if d[key] is True else f"{label} {d[key]:g}" if isinstance(d[key], float) else f"{label} {d[key]}"
                     for key, label in _SHOWN_DEFAULTS if key in d and d[key] not in (None, False, 0.0)
                     and not (key == "rank" and "lora" not in method)]
            lines.append(f"  {family:<14} {method:<18} " + ", ".join(shown))
    return "\n".join(lines)


def names_word(text: str | None, word: str) -> bool:
    """Does a caption or prompt have `word` as one of its words (trailing commas and full stops aside)?"""
    return word in [w.strip(",.") for w in (text or "").split()]


def first_caption(data) -> str | None:
    """The first caption of an image folder's metadata.jsonl; None when it cannot be read."""
    import json

    try:
        with open(Path(data) / "metadata.jsonl", encoding="utf-8") as f:
            return str(json.loads(f.readline()).get("text") or "")
    except (OSError, ValueError, AttributeError):
        return None


def derived_class_prompt(spec: "AttackSpec") -> str | None:
    """DreamBooth's class prompt where none is given: the instance prompt (--prompt, else the first caption of
    --data) without the attacker's token, as the diffusers example writes it ("a photo of sks dog" -> "a photo of
    dog"); None when neither names the token."""
    text = spec.prompt or first_caption(spec.data)
    if not names_word(text, spec.token):
        return None
    return " ".join(w for w in text.split() if w.strip(",.") != spec.token) or None


def check_device_flag(device) -> None:
    """--device (attack, evaluate): auto, cpu or cuda."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {shown(device)}: expected auto, cpu or cuda")


def check_precision_flag(precision, gpu: bool) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"--precision {shown(precision)}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16":
        raise UserError("--precision fp16: not built (fp16 training needs loss scaling); use bf16")


def check_resolution_flag(resolution) -> None:
    if resolution is not None and (int(resolution) <= 0 or int(resolution) % 8):
        raise UserError(f"--resolution {resolution}: must be a positive multiple of 8")


#: a dense attack's default checkpoint interval: each checkpoint is a whole UNet, so half as many as an
#: adapter's (a 200-step full fine-tune at SD-1.5 writes one 3.4 GB checkpoint, not three)
DENSE_CHECKPOINT_EVERY = 100


@dataclass
class AttackSpec:
    # What to attack --------------------------------------------------------------------------------
    method: str
    """Adaptation method: lora, dreambooth, dreambooth-lora, textual-inversion or full."""
    data: Path
    """Image folder with metadata.jsonl (file_name, text): the concept the attacker wants."""
    out: Path | None = None
    """Output folder (adapter or weights, losses.jsonl, checkpoints/, attack.json)."""
    model: str | None = None
    """Pipeline folder to attack (default: the tiny world)."""
    # Training -------------------------------------------------------------------------------------
    steps: int | None = None
    """Optimizer steps (default per method and model family: the table below)."""
    lr: float | None = None
    """Learning rate (default per method and model family)."""
    batch_size: int | None = None
    """Images per step (default per method and model: 4; DreamBooth on a real SD model 1, as its example)."""
    precision: str = "fp32"
    """fp32, or bf16 compute (torch autocast: weights and optimizer state stay fp32)."""
    resolution: int | None = None
    """Image size (pixels, square) to train at: each image's short side is resized to it and the centre
    cropped, as the diffusers training examples do (any sizes in one folder); default: the model's own."""
    # LoRA -----------------------------------------------------------------------------------------
    rank: int | None = None
    """LoRA rank (lora, dreambooth-lora); default per method."""
    alpha: float | None = None
    """LoRA alpha; default = rank (scale 1, kohya-style)."""
    # Captions and DreamBooth ----------------------------------------------------------------------
    token: str = "sks"
    """The attacker's identifier in the captions (DreamBooth's rare token; TI replaces it by a new token)."""
    prompt: str | None = None
    """One caption for every image, overriding metadata.jsonl (DreamBooth's instance prompt)."""
    cross_attention_only: bool = False
    """dreambooth/full: tune only the UNet cross-attention (attn2) instead of the whole UNet."""
    prior_preservation: bool | None = field(default=None,
                                            metadata={"flag": "--prior-preservation/--no-prior-preservation"})
    """dreambooth: add the class-prior loss on images the model itself generates for --class-prompt (default: on
    for a real SD model, as the diffusers example runs it; off on the tiny world)."""
    class_prompt: str | None = None
    """dreambooth prior preservation: prompt of the class (e.g. 'a photo of emblem'); default: the instance prompt
    (--prompt, else the first caption) without --token."""
    num_class_images: int | None = None
    """dreambooth prior preservation: class images generated before training (default 16; 200 on a real SD model)."""
    prior_loss_weight: float = 1.0
    """dreambooth prior preservation: weight of the class loss."""
    # Textual inversion ----------------------------------------------------------------------------
    num_vectors: int = 1
    """textual-inversion: embedding vectors of the new token."""
    initializer_token: str = "emblem"
    """textual-inversion: existing word whose embedding initialises the new one."""
    # Loss and optimizer ---------------------------------------------------------------------------
    snr_gamma: float | None = None
    """Min-SNR loss weighting γ (the diffusers examples' --snr_gamma, 5.0 is usual); 0: plain MSE; default
    per method."""
    noise_offset: float | None = None
    """Offset noise (the diffusers examples' --noise_offset; 0.1 is usual): lets a fine-tune change an
    image's overall colour, e.g. a new background."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass instead of keeping them (diffusers' gradient
    checkpointing): less activation memory at real sizes, roughly a third more time per step."""
    optimizer: str = "adamw"
    """The attacker's optimizer: adamw, or adafactor (as kohya/OneTrainer users run it)."""
    # Checkpoints and output -----------------------------------------------------------------------
    checkpoint_every: int | None = None
    """Save the adapter/weights every N steps (for curves of quality against attack steps). Default: 50; 100 for
    full and dreambooth, whose checkpoint is a whole UNet (3.4 GB at SD-1.5 in fp32)."""
    seed: int = 0
    """Seeds data order, noise and timesteps."""
    freeze_mask: Path | None = None
    """FreezeAsGuard mask to respect: frozen UNet tensors get no gradient and keep their exact values."""
    device: str = "auto"
    """auto, cpu or cuda."""
    overwrite: bool = False
    """Replace --out if it exists."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"--method {shown(self.method)}: unknown attack method; expected one of {', '.join(METHODS)}")
        d = method_defaults(self.method, self.model)
        for key in ("steps", "lr", "noise_offset", "rank", "snr_gamma", "batch_size", "num_class_images"):
            if getattr(self, key) is None:
                setattr(self, key, d[key])
        self.alpha = float(self.rank) if self.alpha is None else self.alpha
        if self.checkpoint_every is None:
            self.checkpoint_every = d.get("checkpoint_every") or (
                DENSE_CHECKPOINT_EVERY if self.method in ("full", "dreambooth") else 50)
        defaulted = self.prior_preservation is None
        if defaulted:
            self.prior_preservation = self.method == "dreambooth" and d["prior_preservation"]
        if self.prior_preservation and not self.class_prompt:
            self.class_prompt = derived_class_prompt(self)
            if not self.class_prompt and defaulted:
                raise UserError(f"--method dreambooth on {shown(str(self.model))}: trains with prior preservation "
                                "(as the diffusers example does), whose class prompt is the instance prompt "
                                f"without --token {shown(self.token)}, which no caption names; give "
                                "--class-prompt, or --no-prior-preservation")

        check_finite_fields(self)
        if not self.alpha > 0:
            raise UserError(f"--alpha {self.alpha}: must be positive")
        if self.prior_loss_weight < 0:
            raise UserError(f"--prior-loss-weight {self.prior_loss_weight}: must not be negative")
        for name, val in (("--steps", self.steps), ("--batch-size", self.batch_size), ("--rank", self.rank),
                          ("--num-vectors", self.num_vectors), ("--checkpoint-every", self.checkpoint_every),
                          ("--num-class-images", self.num_class_images)):
            if int(val) <= 0:
                raise UserError(f"{name} {val}: must be a positive integer")
        if not self.lr > 0:
            raise UserError(f"--lr {self.lr}: must be positive")
        check_resolution_flag(self.resolution)
        check_precision_flag(self.precision, self.device == "cuda")
        if not 0.0 <= self.noise_offset <= 1.0:
            raise UserError(f"--noise-offset {self.noise_offset}: must be in [0, 1]")
        if not self.snr_gamma >= 0:
            raise UserError(f"--snr-gamma {self.snr_gamma}: must be positive, or 0 for plain MSE")
        if self.prior_preservation and not self.class_prompt:
            raise UserError("--prior-preservation needs --class-prompt (or --token naming a word of the first caption, "
                            "which the class prompt then leaves out)")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer {shown(self.optimizer)}: expected one of {', '.join(OPTIMIZERS)}")
        check_device_flag(self.device)
        self.data = Path(self.data)
        self.out = Path(self.out) if self.out is not None else None
        self.freeze_mask = Path(self.freeze_mask) if self.freeze_mask else None

    def check_output(self, extra_inputs: tuple = ()) -> None:
        """--out apart from every input of the attack (and `extra_inputs`, e.g. the --config file), then
        `check_out_free`."""

        if self.out is None:
            raise UserError("--out is required")
        check_disjoint(self.out, [("--data", self.data), ("--model", resolve_model_path(self.model)),
                                  ("--freeze-mask", self.freeze_mask), *extra_inputs])
        self.check_out_free()

    def check_out_free(self) -> None:
        """--out is new, or --overwrite replaces an earlier output of this tool."""

        check_new_output(self.out, self.overwrite)
