"""Batched, seeded image generation through the pipeline's own `__call__`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import numpy as np
from .diffusion import images_per_call, resolution_of


#: samplers the red team and tune may score with: the model's own scheduler, or diffusers' multistep DPM-Solver++
SAMPLERS = ("default", "dpm-solver")


@contextmanager
def sampler(pipe, name: str = "default"):
    """The pipeline sampling with `name` (one of SAMPLERS) inside the block, its own scheduler again after."""
    if name == "default":
        yield pipe
        return
    from diffusers import DPMSolverMultistepScheduler

    own = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(own.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = own


def generate(pipe, prompts: list[str], steps: int = 25, guidance: float = 4.0, seed: int = 0,
             batch: int | None = None, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """uint8 N x H x W x 3 images, one per prompt (repeat a prompt for several samples).

    `batch` prompts per pipeline call (default: `images_per_call` at the model's resolution, 64 on the tiny
    world), and the VAE decodes one image at a time when several large ones share a call: memory stays bounded
    however many samples are asked for."""
    import torch

    size = resolution_of(pipe)
    batch = batch or images_per_call(size, size)
    slicing = getattr(pipe.vae, "use_slicing", False)
    if size * size * batch > 256 * 256 and hasattr(pipe.vae, "enable_slicing"):
        pipe.vae.enable_slicing()
    out = []
    try:
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            g = torch.Generator(device="cpu").manual_seed(seed + i)
            res = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="np")
            out.append(np.clip(np.rint(res.images * 255), 0, 255).astype(np.uint8))
            if on_batch:
                on_batch(len(chunk))
    finally:
        if hasattr(pipe.vae, "use_slicing"):
            pipe.vae.use_slicing = slicing
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


def image_grid(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    n, h, w, c = images.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = im
    return grid
