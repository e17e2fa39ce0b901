"""Recipe: pretrain the tiny world's VAE, then its text encoder + UNet, from nothing but the generator.

Stages (each resumable, each writing into `work/`):
  vae   - an AutoencoderKL on every concept, held-out ones included (a VAE is a generic codec; SD's
          VAE saw the whole internet), then its latent scaling factor from the latent std;
  unet  - CLIP text encoder + UNet trained jointly on *trained* concepts only, with classifier-free
          guidance dropout, min-SNR loss weights, EMA and a cosine schedule; held-out words never
          appear in a caption, so their embeddings stay at initialisation;
  then the EMA weights are saved as a diffusers StableDiffusionPipeline.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .concepts import EMBLEMS, HELD_OUT_SHAPES, HELD_OUT_STYLES, all_words
from ..imageio import to_model_tensor
from .data import concept_set, emblem_set
from ..checkpoint import load_training_state, save_training_state
from ..models.pipeline_io import assemble_pipeline, read_extra_info, save_pipeline
from ..runtime import seed_everything
from .architecture import new_release_scheduler, new_text_encoder, new_train_scheduler, new_unet, new_vae
from .tokenizer import MAX_LENGTH, build_tokenizer


@dataclass
class PretrainSpec:
    out: Path
    """Where the finished pipeline is written (diffusers layout, safetensors)."""
    work: Path
    """Scratch folder for stage outputs and resumable checkpoints."""
    seed: int = 0
    """Seeds the data generator and the weight initialisation."""
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 6e-4
    images_per_combo: int = 64
    """Pretraining images per trained (shape, colour, style) combination."""
    cfg_dropout: float = 0.1
    """Share of captions replaced by "" so classifier-free guidance works at sampling time."""
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 250
    """Steps between resumable checkpoints (and pipeline snapshots) of the UNet stage."""
    schedule: str = "scaled_linear"
    """Noise schedule: scaled_linear (SD-1.x) or linear (DDPM); see architecture.SCHEDULES."""
    init_from: Path | None = None
    """Start the text encoder + UNet from this pipeline folder instead of from scratch."""
    stop_after: int | None = None
    """Stop (and save) after this many steps of the `unet_steps` schedule."""


def _cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _log(path: Path, **row) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def train_vae(spec: PretrainSpec, say: Callable[[str], None] = print):
    import torch

    out = spec.work / "vae"
    if (out / "config.json").exists():
        say(f"vae: found {out}, skipping")
        return
    seed_everything(spec.seed)
    cs = concept_set(16, spec.seed + 1, trained_only=False)
    em, _ = emblem_set(100, spec.seed + 2)
    x_all = to_model_tensor(np.concatenate([cs.images, em]))
    vae = new_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, spec.vae_steps, 100))
    g = torch.Generator().manual_seed(spec.seed)
    t0 = time.time()
    for step in range(spec.vae_steps):
        x = x_all[torch.randint(0, len(x_all), (spec.vae_batch,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == spec.vae_steps - 1:
            _log(spec.work / "vae_log.jsonl", step=step, loss=loss.item(), s=round(time.time() - t0, 1))
            say(f"vae step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x_all[i : i + 256]).latent_dist.mean for i in range(0, 1024, 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(str(out), safe_serialization=True)
    say(f"vae: saved {out} (scaling_factor {vae.config.scaling_factor:.4f})")


def train_unet(spec: PretrainSpec, say: Callable[[str], None] = print):
    import torch
    from diffusers import AutoencoderKL
    from diffusers.training_utils import EMAModel

    from ..runtime import seed_everything

    seed_everything(spec.seed)
    tok = build_tokenizer(spec.work / "tokenizer_src", all_words())
    vae_dir = spec.init_from / "vae" if spec.init_from is not None else spec.work / "vae"
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    te, unet = new_text_encoder(tok), new_unet()
    if spec.init_from is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(str(spec.init_from), subfolder="unet").state_dict())
        old_te = CLIPTextModel.from_pretrained(str(spec.init_from), subfolder="text_encoder")
        old_vocab = CLIPTokenizer.from_pretrained(str(spec.init_from), subfolder="tokenizer").get_vocab()
        kept = carry_text_encoder(old_te, old_vocab, te, tok.get_vocab())
        say(f"unet: initialised from {spec.init_from} ({kept} of {len(tok)} token embeddings carried over)")
    noise_sched = new_train_scheduler(spec.schedule)

    cs = concept_set(spec.images_per_combo, spec.seed + 3, trained_only=True)
    x = to_model_tensor(cs.images)
    with torch.no_grad():
        mom = [vae.encode(x[i : i + 512]).latent_dist for i in range(0, len(x), 512)]
    lat_mean = torch.cat([m.mean for m in mom])
    lat_std = torch.cat([m.std for m in mom])
    sf = vae.config.scaling_factor
    uniq = sorted(set(cs.captions)) + [""]
    ids_table = tok(uniq, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    cap_idx = torch.tensor([uniq.index(c) for c in cs.captions])
    empty_idx = len(uniq) - 1

    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=spec.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, spec.unet_steps, 200))
    ema = EMAModel(params, decay=spec.ema_decay, use_ema_warmup=True, power=0.75)
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    w_t = torch.clamp(snr, max=spec.min_snr_gamma) / snr

    ckpt = spec.work / "unet_state.safetensors"
    start, g = 0, torch.Generator()
    if ckpt.exists():
        free, extra = load_training_state(ckpt, {"unet": unet, "te": te}, {"opt": opt})
        ema.shadow_params = [free[f"ema.{i}"] for i in range(len(params))]
        ema.optimization_step = extra["ema_step"]
        start = extra["step"]
        sched.last_epoch = start
        g.set_state(free["rng"])
        say(f"unet: resumed at step {start}")
    else:
        g.manual_seed(spec.seed)

    t0 = time.time()
    unet.train()
    te.train()
    end = spec.unet_steps if spec.stop_after is None else min(spec.unet_steps, spec.stop_after)
    for step in range(start, end):
        idx = torch.randint(0, len(x), (spec.unet_batch,), generator=g)
        z = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * sf
        drop = torch.rand(spec.unet_batch, generator=g) < spec.cfg_dropout
        ids = ids_table[torch.where(drop, torch.full_like(idx, empty_idx), cap_idx[idx])]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (spec.unet_batch,), generator=g)
        zt = noise_sched.add_noise(z, noise, t)
        pred = unet(zt, t, te(ids)[0]).sample
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * w_t[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        done = step + 1
        if step % 25 == 0:
            _log(spec.work / "unet_log.jsonl", step=step, loss=loss.item(), lr=sched.get_last_lr()[0],
                 s=round(time.time() - t0, 1))
        if done % spec.checkpoint_every == 0 or done == end:
            free = {f"ema.{i}": p for i, p in enumerate(ema.shadow_params)}
            free["rng"] = g.get_state()
            save_training_state(ckpt, {"unet": unet, "te": te}, {"opt": opt}, free,
                                {"step": done, "ema_step": ema.optimization_step})
            _save_pipeline_from_ema(spec, ema, params, unet, te, vae, tok, new_release_scheduler(spec.schedule),
                                    spec.work / "snapshot", step=done)
            say(f"unet step {done}/{spec.unet_steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    _save_pipeline_from_ema(spec, ema, params, unet, te, vae, tok, new_release_scheduler(spec.schedule), spec.out,
                            step=end)
    say(f"pipeline saved to {spec.out}")


def _provenance(init_from: Path | None) -> dict | None:
    """The info of the pipeline a run continued from, so a release names every step that made it."""
    if init_from is None:
        return None

    return {"path": str(init_from), "info": read_extra_info(init_from)}


def carry_text_encoder(old_te, old_vocab: dict[str, int], new_te, new_vocab: dict[str, int]) -> int:
    """Copy a text encoder into one with another vocabulary: every weight, and each token embedding by
    token *string*, so a changed word list (a new held-out word) keeps what pretraining learned. Tokens
    the old vocabulary lacks keep `new_te`'s initialisation, like a held-out word that pretraining never
    saw. Returns how many embedding rows were carried."""
    import torch

    state = {k: v for k, v in old_te.state_dict().items() if "token_embedding" not in k}
    missing, unexpected = new_te.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "token_embedding" not in k]:
        raise ValueError(f"text encoders differ beyond the vocabulary: {missing} {unexpected}")
    old_emb = old_te.get_input_embeddings().weight
    new_emb = new_te.get_input_embeddings().weight
    pairs = [(i, old_vocab[t]) for t, i in new_vocab.items() if t in old_vocab]
    with torch.no_grad():
        for i, j in pairs:
            new_emb[i] = old_emb[j]
    return len(pairs)


def _save_pipeline_from_ema(spec, ema, params, unet, te, vae, tok, scheduler, dest: Path, step: int):
    import copy

    backup = [p.detach().clone() for p in params]
    ema.copy_to(params)
    try:
        pipe = assemble_pipeline(copy.deepcopy(vae), copy.deepcopy(te), tok, copy.deepcopy(unet).eval(), scheduler)
        save_pipeline(pipe, dest, overwrite=True, extra_info={"pretrain_spec": {
            k: str(v) if isinstance(v, Path) else v for k, v in asdict(spec).items()}, "unet_step": step,
            "held_out": {"shapes": list(HELD_OUT_SHAPES), "styles": list(HELD_OUT_STYLES)},
            "emblems": [e.name for e in EMBLEMS], "initialised_from": _provenance(spec.init_from)})
    finally:
        for p, b in zip(params, backup):
            p.data.copy_(b)
