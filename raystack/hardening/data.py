"""Hardening data: target (illegal) and legal image folders, encoded once, sharded across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from ..diffusion import LatentBank, diffusion_loss, resolution_of
from ..imageio import read_image_folder


@dataclass
class Shard:
    bank: object  # LatentBank
    captions: list[str]
    total: int  # images before sharding
    groups: list[int] | None = None
    """The image folder (concept) of each item when there are several: draws are then balanced per concept."""

    @cached_property
    def _members(self) -> list:
        """Each concept's item indices (computed once: `draw` runs every step)."""
        import torch

        groups = self.groups or []
        return [torch.tensor([i for i, g in enumerate(groups) if g == k]) for k in sorted(set(groups))]

    def draw(self, n: int, generator):
        """n item indices. One folder: uniform over the items. Several folders (a multi-concept hardening): each
        draw picks a concept uniformly, then one of its items — a small concept is not drowned by a large one
        (a concept protected "on average" can still be fully re-learnt)."""
        import torch

        members = self._members
        if len(members) < 2:
            return torch.randint(0, len(self.bank), (n,), generator=generator)
        which = torch.randint(0, len(members), (n,), generator=generator).tolist()
        pos = torch.rand(n, generator=generator).tolist()
        return torch.stack([members[k][int(u * len(members[k]))] for k, u in zip(which, pos)])


def jpeg_copies(images: np.ndarray, quality: int = 30) -> np.ndarray:
    """JPEG-compressed copies (IMMA: mixing them in keeps immunity when attackers compress)."""
    import io

    from PIL import Image

    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return np.stack(out)


def load_shard(folders, pipe, rank: int, world: int, caption_fn=None, flag: str = "--target",
               jpeg_mix: float = 0.0, seed: int = 0, resolution: int | None = None) -> Shard:

    images, captions, groups = [], [], []
    for k, f in enumerate(folders):
        folder = read_image_folder(f, flag=flag, size=resolution_of(pipe, resolution))
        images.append(folder.images)
        captions += [c or "" for c in folder.captions]
        groups += [k] * len(folder.images)
    imgs = np.concatenate(images)
    if jpeg_mix > 0:
        rng = np.random.default_rng(seed)
        pick = rng.random(len(imgs)) < jpeg_mix
        if pick.any():
            imgs = np.concatenate([imgs, jpeg_copies(imgs[pick])])
            captions = captions + [c for c, p in zip(captions, pick) if p]
            groups = groups + [g for g, p in zip(groups, pick) if p]
    if caption_fn is not None:
        captions = [caption_fn(c) for c in captions]
    idx = list(range(rank, len(imgs), world)) or [rank % len(imgs)]
    return Shard(LatentBank.encode(pipe.vae, imgs[idx]), [captions[i] for i in idx], len(imgs),
                 groups=[groups[i] for i in idx] if len(folders) > 1 else None)


def noisy_batch(shard: Shard, n: int, noise_scheduler, generator, unet, timesteps: tuple[int, int] | None = None):
    """n items of a shard noised at uniform timesteps (in [lo, hi) when given), on `unet`'s device and in its
    dtype: (x_t, t, item indices). For the objectives whose target is another prediction at the same x_t, not
    the noise (erasure's goals). Drawn on the CPU (the bank lives there), so every device draws alike."""
    import torch

    idx = shard.draw(n, generator)
    latents = shard.bank.sample(idx, generator)
    lo, hi = timesteps or (0, noise_scheduler.config.num_train_timesteps)
    t = torch.randint(lo, hi, (n,), generator=generator)
    noisy = noise_scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator), t).contiguous()
    w = next(unet.parameters())
    return noisy.to(w.device, w.dtype), t.to(w.device), idx.tolist()


def shard_loss(unet, noise_scheduler, encode, shard: Shard, batch: int, generator, **loss_kw):
    return mixed_losses(unet, noise_scheduler, encode, [(shard, batch)], generator, **loss_kw)[0]


def mixed_losses(unet, noise_scheduler, encode, parts: list[tuple[Shard, int]], generator, **loss_kw) -> list:
    """One UNet pass over a batch drawn from several shards (n images from each); returns each part's
    mean loss. FreezeAsGuard's mixed illegal + legal batches then cost one forward/backward, not one per
    data set, and any weighting of the parts (−λ1, +λ2) reuses the same graph."""
    import torch

    latents, captions, sizes = [], [], []
    for shard, n in parts:
        idx = shard.draw(n, generator)
        latents.append(shard.bank.sample(idx, generator))
        captions += [shard.captions[i] for i in idx.tolist()]
        sizes.append(n)
    err = diffusion_loss(unet, noise_scheduler, torch.cat(latents), encode(captions), generator, reduce=False,
                         **loss_kw)
    return [e.mean() for e in torch.split(err, sizes)]
