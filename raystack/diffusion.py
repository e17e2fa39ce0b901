"""The one diffusion training loss every method shares (attacks, IMMA, FreezeAsGuard).

`L(x, c; θ) = E_{t,ε} || ε_θ(x_t, c, t) − target ||²` on VAE latents, target ε (or v for
v-prediction models such as SD 2.x), exactly what the diffusers training examples optimise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


#: pixels per VAE encode and per sampling call (env IMMUNIZE_CHUNK_PIXELS overrides): bounds the activations'
#: memory at real image sizes — 4 images per call at 512 px, 1 at 1024 px — while the tiny world's 32-px batches
#: stay at their cap of 64, so its results are unchanged
CHUNK_PIXELS = 1 << 20


def images_per_call(height: int, width: int, cap: int = 64) -> int:
    """How many images of this size one VAE or sampling call takes (≥ 1, ≤ cap)."""
    import os

    budget = int(os.environ.get("IMMUNIZE_CHUNK_PIXELS") or CHUNK_PIXELS)
    return max(1, min(cap, budget // max(1, height * width)))


@dataclass
class LatentBank:
    """VAE posterior moments of a fixed image set, encoded once: the VAE is frozen in every method."""

    mean: "torch.Tensor"  # noqa: F821
    std: "torch.Tensor"  # noqa: F821
    scaling_factor: float

    @classmethod
    def encode(cls, vae, images: np.ndarray, batch: int | None = None) -> "LatentBank":
        """Posterior moments of uint8 N×H×W×3 images, `batch` (default: `images_per_call`) per VAE call: the
        peak memory does not grow with N."""
        import torch

        from .imageio import to_model_tensor

        batch = batch or images_per_call(images.shape[1], images.shape[2])
        means, stds = [], []
        dev, dtype = vae.device, vae.dtype
        with torch.no_grad():
            for i in range(0, len(images), batch):
                d = vae.encode(to_model_tensor(images[i : i + batch]).to(dev, dtype)).latent_dist
                means.append(d.mean.float().cpu())
                stds.append(d.std.float().cpu())
        return cls(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor))

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, idx, generator):
        import torch

        m, s = self.mean[idx], self.std[idx]
        return (m + s * torch.randn(m.shape, generator=generator)) * self.scaling_factor


def train_noise_scheduler(pipe):
    """A DDPM scheduler with the pipeline's own noise schedule and prediction type."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def diffusion_loss(unet, noise_scheduler, latents, encoder_hidden_states, generator, reduce: bool = True,
                   snr_gamma: float | None = None, noise_offset: float = 0.0,
                   timesteps: tuple[int, int] | None = None, teacher=None):
    """Denoising MSE at uniform timesteps; `snr_gamma` weights each sample by min(SNR, γ)/SNR (Min-SNR,
    Hang et al. 2023, the diffusers examples' --snr_gamma) so easy low-noise steps stop dominating.
    `noise_offset` adds a per-channel constant to the noise (the examples' --noise_offset): SD's schedule
    never fully noises an image's mean colour, so without it a fine-tune barely moves overall brightness
    or background colour. `timesteps` (lo, hi) draws t uniformly from [lo, hi) instead of every step. With a
    `teacher` UNet the target is the teacher's own prediction at the same x_t, t (distillation: no
    irreducible noise term, so its gradient is far less noisy than the denoising loss's)."""
    import torch

    dev = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        per_channel = (*latents.shape[:2], *[1] * (latents.ndim - 2))
        noise = noise + noise_offset * torch.randn(per_channel, generator=generator)
    lo, hi = timesteps or (0, noise_scheduler.config.num_train_timesteps)
    t = torch.randint(lo, hi, (latents.shape[0],), generator=generator)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    if teacher is not None:
        with torch.no_grad():
            target = teacher(noisy.to(dev, dtype), t.to(dev), encoder_hidden_states.to(dev, dtype)).sample.float()
    # Contiguous, not channels-last: with conv_in frozen (a FreezeAsGuard mask may freeze it) the first
    # GroupNorm gets an input that needs no gradient, and torch 2.13's CPU GroupNorm backward segfaults on
    # a channels-last one (tests/test_attacks.py::test_frozen_input_layer_trains).
    noisy = noisy.contiguous()
    pred = unet(noisy.to(dev, dtype), t.to(dev), encoder_hidden_states.to(dev, dtype)).sample
    err = (pred.float() - target.to(dev).float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
    if snr_gamma:
        snr = noise_scheduler.alphas_cumprod[t] / (1 - noise_scheduler.alphas_cumprod[t])
        w = torch.clamp(snr, max=snr_gamma) / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
        err = err * w.to(dev)
    return err.mean() if reduce else err


def encode_text(text_encoder, tokenizer, captions: list[str]):

    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


class FrozenTextCache:
    """Text encodings of a frozen text encoder, computed once per distinct caption."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self._cache: dict = {}

    def __call__(self, captions: list[str]):
        import torch

        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            with torch.no_grad():
                enc = encode_text(self.text_encoder, self.tokenizer, missing)
            self._cache.update(zip(missing, enc))
        return torch.stack([self._cache[c] for c in captions])


def resolution_of(pipe, override: int | None = None, flag: str = "--resolution") -> int:
    """The image size a pipeline trains at: its own (UNet sample size x VAE factor), or `override`, which must
    survive the VAE and every UNet down-sampling evenly."""
    if override is None:
        return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    step = int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.down_block_types) - 1)
    if override % step:
        from .errors import UserError

        raise UserError(f"{flag} {override}: this model needs a multiple of {step} (VAE factor x UNet down-sampling)")
    return int(override)
