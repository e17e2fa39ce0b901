"""A CLIP that knows the tiny world: the stand-in for a real CLIP when the judge for any model (`evaluate --clip DIR
--versus ...` or `--concepts FILE`, `redteam`/`tune --judge clip:DIR --concepts FILE`; raystack/judges.py) is checked
against the tiny world's own classifier. concepts/tiny_sunset.yaml is the tiny world's sunset style as a concept
file for it.

A `transformers.CLIPModel` at the tiny world's size (32-px images in 4-px patches, the pipeline's own word-level
tokenizer), trained contrastively on the generator's images and their captions, held-out concepts included (a
judge must know every concept, as the classifier does). Images that share a caption are positives of each other
(125 combinations: a batch holds repeats). Like the classifier it sees VAE round-trips and noise, because
generated images come out of the VAE decoder with leftover noise. Saved as a local transformers folder
(config, safetensors, tokenizer) that `metrics.ClipZeroShot` reads like any CLIP.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .data import concept_set
from ..atomic import atomic_dir
from ..metrics import ClipZeroShot, model_pixels, projected_features
from ..models.pipeline_io import default_model_path
from ..runtime import seed_everything
from .classifier import _roundtrip
from .concepts import STYLES, caption
from .render import render_concept


@dataclass
class TinyClipSpec:
    out: Path
    """Folder for the CLIP model (config.json, model.safetensors) and its tokenizer."""
    pipeline: Path | None = None
    """Tiny-world pipeline whose tokenizer (and VAE, for round-trip augmentation) the CLIP uses; None: the
    shipped tiny world."""
    seed: int = 0
    steps: int = 1500
    batch: int = 128
    lr: float = 1e-3
    per_combo: int = 24
    """Training images per (shape, colour, style) combination, held-out ones included."""
    width: int = 64
    layers: int = 3


def train_tiny_clip(spec: TinyClipSpec, say: Callable[[str], None] = print) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    seed_everything(spec.seed)
    pipe_dir = Path(spec.pipeline or default_model_path())
    tok = CLIPTokenizer.from_pretrained(str(pipe_dir / "tokenizer"))
    cs = concept_set(spec.per_combo, spec.seed + 21, trained_only=False, random_background=0.3)
    vae = AutoencoderKL.from_pretrained(str(pipe_dir / "vae")).eval()
    images = np.concatenate([cs.images, _roundtrip(vae, cs.images)])
    captions = list(cs.captions) * 2
    kinds = sorted(set(captions))
    cap_id = torch.tensor([kinds.index(c) for c in captions])
    length = int(tok.model_max_length)  # the pipeline's own prompt length (16 in the tiny world)
    ids = tok(kinds, padding="max_length", max_length=length, truncation=True, return_tensors="pt")

    size = int(images.shape[1])
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": spec.width, "intermediate_size": 2 * spec.width,
                     "num_hidden_layers": spec.layers, "num_attention_heads": 4, "max_position_embeddings": length,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"image_size": size, "patch_size": 4, "hidden_size": spec.width,
                       "intermediate_size": 2 * spec.width, "num_hidden_layers": spec.layers,
                       "num_attention_heads": 4},
        projection_dim=spec.width)
    model = CLIPModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)
    x_all = model_pixels(images, size, "clip")  # what the judge (metrics.HFImageEmbedder) feeds it
    g = torch.Generator().manual_seed(spec.seed)
    t0 = time.time()
    model.train()
    for step in range(spec.steps):
        idx = torch.randint(0, len(images), (spec.batch,), generator=g)
        x = x_all[idx]
        sigma = torch.rand(spec.batch, 1, 1, 1, generator=g) * 0.4 * (torch.rand(spec.batch, 1, 1, 1, generator=g) < 0.5)
        x = x + sigma * torch.randn(x.shape, generator=g)
        c = cap_id[idx]
        img = F.normalize(projected_features(model.get_image_features(pixel_values=x)), dim=-1)
        txt = F.normalize(projected_features(model.get_text_features(input_ids=ids.input_ids[c],
                                                                     attention_mask=ids.attention_mask[c])), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = (c[:, None] == c[None, :]).float()  # images sharing a caption are each other's positives
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == spec.steps - 1:
            say(f"tiny CLIP step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    model.eval()
    meta = {"spec": {k: str(v) for k, v in spec.__dict__.items()}, "train_seconds": round(time.time() - t0, 1),
            "final_loss": round(float(loss.item()), 4)}
    with atomic_dir(Path(spec.out), overwrite=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "tiny_clip.json").write_text(json.dumps(meta, indent=2))
    return meta


def style_accuracy(clip_dir: Path, n_per_combo: int = 4, seed: int = 99) -> dict[str, float]:
    """Zero-shot style accuracy on fresh generator images, through the product's ClipZeroShot: per style, the
    share of a red circle's images in that style assigned to 'a red circle in <style> style' among the five."""

    labels = [caption("circle", "red", st) for st in STYLES]
    judge = ClipZeroShot(Path(clip_dir), labels)
    rng = np.random.default_rng(seed)
    out = {}
    for st in STYLES:
        imgs = np.stack([render_concept("circle", "red", st, rng) for _ in range(n_per_combo * 10)])
        out[st] = judge.accuracy(imgs, caption("circle", "red", st))
    return out
