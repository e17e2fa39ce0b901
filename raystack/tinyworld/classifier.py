"""The tiny world's concept classifier: the judge of every generated image.

Heads for shape, colour, style, personal emblem (with "none") and junk (noise, mush, failed samples),
so a destroyed model cannot score by accident. Trained on the generator with noise and VAE round-trip
augmentation (generated images come out of the VAE decoder). Its penultimate features, L2-normalised,
are the always-available image-similarity backend M for SGR/RSGR.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .concepts import COLOURS, EMBLEM_NAMES, SHAPES, STYLES
from ..imageio import from_model_tensor, to_model_tensor
from .data import concept_set, emblem_set
from ..atomic import atomic_write_text
from ..runtime import seed_everything

IMAGE_SIZE = 32
"""The images the classifier judges: the tiny world's, 32 x 32 pixels."""

HEADS = {"shape": SHAPES, "colour": COLOURS, "style": STYLES, "emblem": ("none",) + EMBLEM_NAMES}
FEATURE_DIM = 128


def _build():
    import torch.nn as nn

    class ConceptClassifier(nn.Module):
        def __init__(self):
            super().__init__()

            def block(cin, cout, stride):
                return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

            self.body = nn.Sequential(
                block(3, 32, 1), block(32, 32, 1), block(32, 64, 2), block(64, 64, 1),
                block(64, 128, 2), block(128, 128, 1), block(128, FEATURE_DIM, 2),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            self.heads = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, len(v)) for k, v in HEADS.items()})
            self.junk = nn.Linear(FEATURE_DIM, 1)

        def features(self, x):
            return self.body(x)

        def forward(self, x):
            f = self.body(x)
            out = {k: h(f) for k, h in self.heads.items()}
            out["junk"] = self.junk(f).squeeze(-1)
            return out, f

    return ConceptClassifier()


def new_classifier():
    return _build()


# --- junk: what a broken generator produces --------------------------------------------------------

def junk_images(n: int, rng: np.random.Generator, real: np.ndarray) -> np.ndarray:
    """Noise of several spectra, blank or texture-only canvases, heavy noise on real images, blends."""
    out = np.empty((n, 32, 32, 3), dtype=np.float64)
    for i in range(n):
        kind = rng.integers(0, 6)
        if kind == 0:  # white noise
            img = rng.uniform(0, 1, (32, 32, 3))
        elif kind == 1:  # smooth noise
            k = int(rng.choice([2, 4, 8]))
            low = rng.uniform(0, 1, (32 // k, 32 // k, 3))
            img = np.kron(low, np.ones((k, k, 1)))
        elif kind == 2:  # flat colour, maybe with a texture-like grating but no object
            img = np.broadcast_to(rng.uniform(0, 1, 3), (32, 32, 3)).copy()
            if rng.random() < 0.5:
                yy = np.arange(32)[:, None, None]
                img = img * (1 - 0.5 * (((yy + rng.integers(8)) % 8) < 4))
        elif kind == 3:  # a real image under heavy noise
            img = real[rng.integers(len(real))] / 255.0 + rng.normal(0, rng.uniform(0.45, 1.0), (32, 32, 3))
        elif kind == 4:  # two real images blended
            a, b = real[rng.integers(len(real), size=2)] / 255.0
            img = 0.5 * a + 0.5 * b
        else:  # shuffled patches of a real image
            r = real[rng.integers(len(real))] / 255.0
            p = r.reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, 8, 8, 3)
            p = p[rng.permutation(16)]
            img = p.reshape(4, 4, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(32, 32, 3)
        out[i] = img
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


@dataclass
class ClassifierSpec:
    out: Path
    """Folder for classifier.safetensors + classifier.json."""
    vae: Path | None = None
    """VAE folder for round-trip augmentation (generated images pass its decoder); None skips it."""
    seed: int = 0
    steps: int = 1500
    batch: int = 128
    lr: float = 2e-3
    per_combo: int = 40
    per_emblem: int = 300
    n_junk: int = 3000
    random_background: float = 0.5
    """Share of concept images on a random background colour: the judge rates the object, not the canvas."""


def _roundtrip(vae, images: np.ndarray) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = to_model_tensor(images[i : i + 256])
            outs.append(from_model_tensor(vae.decode(vae.encode(x).latent_dist.mean).sample))
    return np.concatenate(outs)


def train_classifier(spec: ClassifierSpec, say: Callable[[str], None] = print) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    seed_everything(spec.seed)
    rng = np.random.default_rng(spec.seed + 10)
    cs = concept_set(spec.per_combo, spec.seed + 11, trained_only=False, random_background=spec.random_background)
    em, em_lab = emblem_set(spec.per_emblem, spec.seed + 12)
    junk = junk_images(spec.n_junk, rng, cs.images)
    imgs = np.concatenate([cs.images, em, junk])
    n_c, n_e, n_j = len(cs.images), len(em), len(junk)
    if spec.vae is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(spec.vae)).eval()
        imgs = np.concatenate([imgs, _roundtrip(vae, imgs[: n_c + n_e])])
        n_rt = n_c + n_e
    else:
        n_rt = 0
    neg = -100
    n = len(imgs)
    lab = {k: np.full(n, neg) for k in ("shape", "colour", "style", "emblem")}
    junk_lab = np.zeros(n, dtype=np.float32)
    for off in [0] + ([n_c + n_e + n_j] if n_rt else []):
        lab["shape"][off : off + n_c] = cs.shape
        lab["colour"][off : off + n_c] = cs.colour
        lab["style"][off : off + n_c] = cs.style
        lab["emblem"][off : off + n_c] = 0
        lab["emblem"][off + n_c : off + n_c + n_e] = em_lab + 1
    junk_lab[n_c + n_e : n_c + n_e + n_j] = 1.0
    x_all = to_model_tensor(imgs)
    y_all = {k: torch.from_numpy(v) for k, v in lab.items()}
    yj_all = torch.from_numpy(junk_lab)

    model = new_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(spec.seed)
    t0 = time.time()
    model.train()
    for step in range(spec.steps):
        idx = torch.randint(0, n, (spec.batch,), generator=g)
        x = x_all[idx]
        # noise augmentation: sampled images carry leftover noise; junk stays junk under any noise
        sigma = torch.rand(spec.batch, 1, 1, 1, generator=g) * 0.25 * (torch.rand(spec.batch, 1, 1, 1, generator=g) < 0.6)
        x = x + sigma * torch.randn(x.shape, generator=g)
        x = x * (1 + 0.1 * (torch.rand(spec.batch, 1, 1, 1, generator=g) - 0.5))
        out, _ = model(x)
        loss = F.binary_cross_entropy_with_logits(out["junk"], yj_all[idx])
        for k in HEADS:
            y = y_all[k][idx]
            if (y != neg).any():
                loss = loss + F.cross_entropy(out[k], y, ignore_index=neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == spec.steps - 1:
            say(f"classifier step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    model.eval()
    spec.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(spec.out / "classifier.safetensors"))
    meta = {"heads": {k: list(v) for k, v in HEADS.items()}, "feature_dim": FEATURE_DIM,
            "spec": {k: str(v) for k, v in spec.__dict__.items()}}
    atomic_write_text(spec.out / "classifier.json", json.dumps(meta, indent=2))
    return meta


def default_classifier_path() -> Path:
    return Path(__file__).resolve().parent / "assets" / "classifier"


class Judge:
    """Loaded classifier: predictions and similarity features for uint8 images."""

    def __init__(self, folder: Path | None = None):
        import torch
        from safetensors.torch import load_file

        folder = Path(folder or default_classifier_path())
        self.model = new_classifier()
        self.model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
        self.model.eval()
        self._torch = torch

    def __call__(self, images: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
        torch = self._torch
        outs: dict[str, list] = {k: [] for k in list(HEADS) + ["junk", "features"]}
        with torch.no_grad():
            for i in range(0, len(images), batch):
                o, f = self.model(to_model_tensor(images[i : i + batch]))
                for k in HEADS:
                    outs[k].append(o[k].argmax(-1).numpy())
                outs["junk"].append(torch.sigmoid(o["junk"]).numpy())
                outs["features"].append(torch.nn.functional.normalize(f, dim=-1).numpy())
        return {k: np.concatenate(v) for k, v in outs.items()}

    def predict_names(self, images: np.ndarray) -> list[dict]:
        p = self(images)
        return [{**{k: HEADS[k][int(p[k][i])] for k in HEADS}, "junk": float(p["junk"][i])}
                for i in range(len(images))]


def concept_hits(pred: dict[str, np.ndarray], shape: str | None = None, colour: str | None = None,
                 style: str | None = None, emblem: str | None = None) -> np.ndarray:
    """Per image: not junk and matching every attribute asked for (the judge's verdict, image by image)."""
    ok = pred["junk"] < 0.5
    for head, want in (("shape", shape), ("colour", colour), ("style", style), ("emblem", emblem)):
        if want is not None:
            ok &= pred[head] == HEADS[head].index(want)
    return ok


def concept_accuracy(pred: dict[str, np.ndarray], shape: str | None = None, colour: str | None = None,
                     style: str | None = None, emblem: str | None = None) -> float:
    """Share of images that are not junk and match every attribute asked for."""
    return float(concept_hits(pred, shape, colour, style, emblem).mean())
