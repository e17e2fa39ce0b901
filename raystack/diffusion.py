"""The one diffusion training loss every method shares (attacks, IMMA, FreezeAsGuard).

`L(x, c; θ) = E_{t,ε} || ε_θ(x_t, c, t) − target ||²` on VAE latents, target ε (or v for
v-prediction models such as SD 2.x), exactly what the diffusers training examples optimise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from .imageio import to_model_tensor


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
            target = unet_predict(teacher, noisy.to(dev, dtype), t.to(dev), encoder_hidden_states.to(dev, dtype)).float()
    # Contiguous, not channels-last: with conv_in frozen (a FreezeAsGuard mask may freeze it) the first
    # GroupNorm gets an input that needs no gradient, and torch 2.13's CPU GroupNorm backward segfaults on
    # a channels-last one (tests/test_attacks.py::test_frozen_input_layer_trains).
    noisy = noisy.contiguous()
    pred = unet_predict(unet, noisy.to(dev, dtype), t.to(dev), encoder_hidden_states.to(dev, dtype))
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


# SDXL ---------------------------------------------------------------------------------------------------------
# SDXL conditions its UNet on two text encoders' penultimate hidden states (concatenated), the second encoder's
# pooled projection and the "time ids" (original size, crop corner, target size). To keep one conditioning
# tensor flowing through every loss, cache and batch here, `encode_prompts` packs the pooled embedding as one
# more row after the token states (zero-padded to their width), and `unet_predict` unpacks it.

def is_sdxl(unet) -> bool:
    """The UNet takes SDXL's added conditioning (pooled text embedding and time ids)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def encode_prompts(pipe, captions: list[str]):
    """The UNet's text conditioning for `captions`: SD's text encoder states, or SDXL's packed conditioning (as
    the diffusers SDXL training examples build it: hidden_states[-2] of both encoders, the second's pooled
    projection)."""
    import torch

    if getattr(pipe, "text_encoder_2", None) is None:
        return encode_text(pipe.text_encoder, pipe.tokenizer, captions)
    states, pooled = [], None
    for tok, te in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(te.device)
        out = te(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's pooled, projected embedding (text_embeds)
    hidden = torch.cat(states, dim=-1)
    row = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[-1])
    row[:, 0, : pooled.shape[-1]] = pooled
    return torch.cat([hidden, row], dim=1)


def unet_predict(unet, x, t, cond):
    """The UNet's prediction (`.sample`) for conditioning from `encode_prompts`. SDXL: the pooled row is
    unpacked, and the time ids say the image was made at this size, uncropped (how a fine-tune at one
    resolution trains)."""
    if not is_sdxl(unet):
        return unet(x, t, cond).sample
    import torch

    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    h, w = x.shape[-2] * 8, x.shape[-1] * 8  # SDXL's VAE factor
    time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=x.dtype, device=x.device).expand(x.shape[0], 6)
    return unet(x, t, encoder_hidden_states=cond[:, :-1], added_cond_kwargs={
        "text_embeds": cond[:, -1, :pooled_dim], "time_ids": time_ids}).sample


class FrozenTextCache:
    """Text conditioning from frozen text encoder(s), computed once per distinct caption."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._cache: dict = {}

    def __call__(self, captions: list[str]):
        import torch

        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            with torch.no_grad():
                enc = encode_prompts(self.pipe, missing)
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
