"""Recipe: one simulated malicious fine-tune, end to end (setup / step / checkpoint / save).

Outputs in `spec.out` (written atomically): the method's safetensors (LoRA weights, learned
embeddings or UNet), `losses.jsonl` (one line per step), `checkpoints/step-NNNNNN/` every
`checkpoint_every` steps, and `attack.json` (resolved spec, base model, timings, final loss).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Callable

from ..atomic import atomic_dir
from ..outputs import output_lock
from ..specs import spec_to_dict
from .methods import Adaptation, make_adaptation
from .spec import AttackSpec
from ..diffusion import LatentBank, diffusion_loss, resolution_of, train_noise_scheduler
from ..distributed import partitioned_optimizer
from ..freeze_mask import load_freeze_mask
from ..imageio import read_image_folder
from ..models.pipeline_io import load_pipeline, resolve_model_path
from ..runtime import compute_precision, pick_device
from ..sampling import generate

ATTACK_INFO = "attack.json"


def load_attack_data(spec: AttackSpec, pipe):
    folder = read_image_folder(spec.data, flag="--data", require_captions=spec.prompt is None,
                               size=resolution_of(pipe, spec.resolution))
    return folder


def class_images(pipe, spec: AttackSpec):
    """DreamBooth prior preservation: the model's own images of the class, made before training."""

    return generate(pipe, [spec.class_prompt] * spec.num_class_images, steps=25, seed=spec.seed + 7)


@contextmanager
def seeded_init(seed: int):
    """φ's initialisation (peft draws LoRA's A from torch's global generator) from `seed` alone: `--seed`
    then changes the adapter too, and an attack run inside a longer process (a Tune trial, a bench, IMMA's
    scoring) starts from the same adapter as the same attack run alone. The caller's generator state is
    left as it was."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def setup(spec: AttackSpec, pipe=None):
    """Everything a training step needs: the pipeline with φ attached, latents, captions, optimizer."""

    device = pick_device(spec.device)
    if pipe is None:
        pipe = load_pipeline(spec.model, device=device)
    if spec.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    mask = None
    if spec.freeze_mask is not None:
        mask = load_freeze_mask(spec.freeze_mask, [n for n, _ in pipe.unet.named_parameters()])
    folder = load_attack_data(spec, pipe)
    prior = class_images(pipe, spec) if spec.prior_preservation else None
    with seeded_init(spec.seed):
        ad = make_adaptation(spec, pipe, mask)
    captions = [ad.caption(c or "") for c in folder.captions]
    bank = LatentBank.encode(pipe.vae, folder.images)
    prior_bank = LatentBank.encode(pipe.vae, prior) if prior is not None else None
    return AttackState(spec, pipe, ad, captions, bank, prior_bank, attacker_optimizer(ad, spec.lr, spec.optimizer),
                       train_noise_scheduler(pipe))


GRAD_CLIP = 1.0  # gradient-norm clip of every attacker step (IMMA's simulated attacker included)


def attacker_optimizer(ad: Adaptation, lr: float, name: str = "adamw", zero_stage: int = 0):
    """The attacker's optimizer over φ (IMMA's simulated attacker uses the same; inside a hardening job from
    ZeRO-1 on, its moments are partitioned across the ranks: `distributed.partitioned_optimizer`)."""

    cls, kwargs = optimizer_class(name, lr, ad.weight_decay())
    return partitioned_optimizer(ad.parameters(), cls, zero_stage, **kwargs)


def optimizer_class(name: str, lr: float, weight_decay: float) -> tuple[type, dict]:
    """AdamW, or Adafactor as kohya/OneTrainer users run it (transformers' implementation, fixed learning rate,
    no relative step): the class and its arguments."""
    import torch

    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor, dict(lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                               weight_decay=weight_decay)
    return torch.optim.AdamW, dict(lr=lr, weight_decay=weight_decay)


def optimizer_named(name: str, params: list, lr: float, weight_decay: float):
    """`optimizer_class`'s optimizer over `params`."""
    cls, kwargs = optimizer_class(name, lr, weight_decay)
    return cls(params, **kwargs)


class AttackState:
    def __init__(self, spec, pipe, ad: Adaptation, captions, bank, prior_bank, opt, noise_scheduler):
        import torch

        self.spec, self.pipe, self.ad, self.captions = spec, pipe, ad, captions
        self.bank, self.prior_bank, self.opt, self.noise_scheduler = bank, prior_bank, opt, noise_scheduler
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.step_no = 0

    def loss(self, generator=None):
        """L_A on one batch of the attacker's images (plus the prior term for DreamBooth)."""
        import torch

        g = generator or self.generator
        idx = torch.randint(0, len(self.bank), (self.spec.batch_size,), generator=g)
        enc = self.ad.encode([self.captions[i] for i in idx.tolist()])
        loss = diffusion_loss(self.pipe.unet, self.noise_scheduler, self.bank.sample(idx, g), enc, g,
                              snr_gamma=self.spec.snr_gamma, noise_offset=self.spec.noise_offset)
        if self.prior_bank is not None:
            pidx = torch.randint(0, len(self.prior_bank), (self.spec.batch_size,), generator=g)
            penc = self.ad.encode([self.spec.class_prompt] * self.spec.batch_size)
            loss = loss + self.spec.prior_loss_weight * diffusion_loss(
                self.pipe.unet, self.noise_scheduler, self.prior_bank.sample(pidx, g), penc, g,
                snr_gamma=self.spec.snr_gamma, noise_offset=self.spec.noise_offset)
        return loss

    def step(self) -> float:
        import torch

        with compute_precision(self.spec.precision, self.pipe.device.type):
            loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.ad.parameters(), GRAD_CLIP)
        self.opt.step()
        self.ad.after_step()
        self.step_no += 1
        return float(loss.item())


def run_attack(spec: AttackSpec, on_step: Callable[[int, float], None] | None = None, pipe=None) -> dict:
    """Run the attack and write `spec.out`; returns the attack.json contents."""
    spec.check_output()
    with output_lock(spec.out):
        spec.check_out_free()  # again under the lock: another run may have written it meanwhile
        return _run_attack_locked(spec, on_step, pipe)


def _run_attack_locked(spec: AttackSpec, on_step, pipe) -> dict:
    t0 = time.time()
    st = setup(spec, pipe)
    with atomic_dir(spec.out, overwrite=spec.overwrite) as tmp:
        losses = []
        with open(tmp / "losses.jsonl", "w") as log:
            for step in range(1, spec.steps + 1):
                loss = st.step()
                losses.append(loss)
                log.write(json.dumps({"step": step, "loss": loss}) + "\n")
                if step % spec.checkpoint_every == 0 and step != spec.steps:
                    st.ad.export(tmp / "checkpoints" / f"step-{step:06d}")
                if on_step:
                    on_step(step, loss)
        files = st.ad.export(tmp)
        info = {
            "method": spec.method,
            "spec": spec_to_dict(spec),
            "base_model": str(Path(resolve_model_path(spec.model)).resolve()),  # evaluate runs from anywhere
            "placeholder": getattr(st.ad, "placeholder", None),
            "files": [str(f.relative_to(tmp)) for f in files],
            "checkpoints": sorted(p.name for p in (tmp / "checkpoints").glob("step-*")) if (tmp / "checkpoints").exists() else [],
            "steps": spec.steps,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "wall_seconds": round(time.time() - t0, 2),
        }
        (tmp / ATTACK_INFO).write_text(json.dumps(info, indent=2))
    return info
