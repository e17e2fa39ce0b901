"""Concept erasure: take out of the weights a concept the model already knows, before hardening it against
re-learning (both papers start there: IMMA protects ESD-erased weights, FreezeAsGuard runs UCE first).

Three methods, each one phase of the method interface (so `immunize-cli erase` is a Ray Train + DeepSpeed job
with checkpoints, resume and a manifest, and `harden --erase METHOD` runs it before --method in one job):

- **ablation** (concept ablation, Kumari et al. 2023): on noisy latents of the concept's images, the
  cross-attention is trained so the UNet predicts what the frozen original predicts for the *anchor* caption
  (the concept's word replaced by --anchor).
- **esd-x** (ESD on cross-attention, Gandikota et al. 2023): the prediction for the concept's caption is
  trained towards the original's negatively guided one, ε(x, n) − η (ε(x, c) − ε(x, n)). The paper's prompts
  name only the concept and its n is the empty prompt; our captions also name shapes and colours, which
  ε(x, c) − ε(x, ∅) guides away as well, so n is by default the anchor caption (--esd-neutral).
- **uce** (unified concept editing, Gandikota et al. 2024): closed form, no training; each cross-attention
  key/value projection W is replaced by the least-squares W' that maps the concept's text embeddings where W
  maps the anchor's, and keeps W on the preserved (--legal) captions:
  W' = (Σ W c*ᵢ cᵢᵀ + s Σ W pⱼ pⱼᵀ + λ W)(Σ cᵢ cᵢᵀ + s Σ pⱼ pⱼᵀ + λ I)⁻¹.

ablation and esd-x keep the other concepts with a retain term on --legal (the original's predictions there),
weighted by --erase-retain-weight.
"""

from __future__ import annotations

import re

from ..diffusion import unet_predict
from .method import HardeningPhase, PhaseResult, load_into_unet
from ..diffusion import FrozenTextCache, encode_prompts, is_sdxl, train_noise_scheduler
from ..errors import UserError
from ..imageio import read_image_folder
from ..outputs import shown
from .data import Shard, load_shard, mixed_losses, noisy_batch

#: UCE's ridge λ: keeps W' near W where the edit says nothing
UCE_RIDGE = 0.1


def concept_words(spec) -> list[str]:
    return [w.strip() for w in (spec.concept or "").split(",") if w.strip()]


def anchor_caption(caption: str, words: list[str], anchor: str) -> str:
    """The caption with every concept word (whole words) replaced by the anchor."""
    out = caption
    for w in words:
        out = re.sub(rf"(?<!\w){re.escape(w)}(?!\w)", lambda _m: anchor, out)
    return " ".join(out.split())


def check_erase_captions(spec, captions: list[str], flag: str = "--target") -> None:
    """Every caption of the concept's images must name it: erasure maps the named concept to the anchor."""

    words = concept_words(spec)
    for c in captions:
        if anchor_caption(c, words, spec.anchor) == " ".join(c.split()):
            raise UserError(f"{flag}: the caption {shown(c)} does not name the concept ({', '.join(words)}); "
                            "erasure maps the concept's word in each caption to --anchor")


def check_uce_anchor(spec, model, captions: list[str]) -> None:
    """UCE pairs the concept caption's token embeddings with the anchor caption's position by position: the
    anchor must take as many tokens as the concept's word(s)."""
    from transformers import CLIPTokenizer

    from ..errors import UserError

    tok = CLIPTokenizer.from_pretrained(str(model), subfolder="tokenizer")
    words = concept_words(spec)
    for c in captions:
        if len(tok(c).input_ids) != len(tok(anchor_caption(c, words, spec.anchor)).input_ids):
            from ..outputs import shown

            raise UserError(f"--anchor {shown(spec.anchor)}: UCE maps the concept's tokens to the anchor's one by one; give "
                            f"an anchor of as many tokens as {', '.join(words)} (e.g. a word of the same kind)")


class _TrainedErasure(HardeningPhase):
    """ablation and esd-x: the cross-attention (attn2) trained towards `goal()` on the concept's images."""

    name = "erase"
    needs_target = True
    supports_zero3 = False
    zero3_reason = "reads the trained cross-attention weights whole for its checkpoints and result"

    def __init__(self, spec, pipe, rank: int = 0, world: int = 1):
        import copy

        import torch

        super().__init__(spec, pipe, rank, world)
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        pipe.unet.requires_grad_(False)
        self.teacher = copy.deepcopy(pipe.unet).eval()  # the original, frozen
        self.target = load_shard(spec.target, pipe, rank, world, flag="--target", resolution=spec.resolution)
        check_erase_captions(spec, self.target.captions)
        words = concept_words(spec)
        self.anchors = [anchor_caption(c, words, spec.anchor) for c in self.target.captions]
        self.legal = None
        if spec.legal is not None and spec.erase_retain_weight > 0:
            self.legal = load_shard([spec.legal], pipe, rank, world, flag="--legal", resolution=spec.resolution)
            self.legal_uncond = Shard(self.legal.bank, [""] * len(self.legal.captions), self.legal.total)
        self.text = FrozenTextCache(pipe)
        self.S = {n: p for n, p in pipe.unet.named_parameters() if ".attn2." in n}
        for p in self.S.values():
            p.requires_grad_(True)
        self.noise = train_noise_scheduler(pipe)
        self.generator = torch.Generator().manual_seed(spec.seed * 7919 + rank + 17)

    def engine_module(self):
        return self.pipe.unet

    def engine_params(self) -> list:
        return list(self.S.values())

    def make_optimizer(self):
        import torch

        return torch.optim.Adam(self.engine_params(), lr=self.spec.erase_lr)

    def total_steps(self) -> int:
        return self.spec.erase_steps

    def goal(self, noisy, t, captions: list[str], anchors: list[str]):
        raise NotImplementedError

    def step(self) -> dict:
        import torch

        b, gen = self.spec.batch_size, self.generator
        noisy, t, idx = noisy_batch(self.target, b, self.noise, gen, self.pipe.unet)
        captions = [self.target.captions[i] for i in idx]
        anchors = [self.anchors[i] for i in idx]
        with torch.no_grad():
            goal = self.goal(noisy, t, captions, anchors)
        loss_e = (unet_predict(self.pipe.unet, noisy, t, self.text(captions)).float() - goal.float()).pow(2).mean()
        loss, out = loss_e, {"erase_loss": float(loss_e.detach())}
        if self.legal is not None:
            cond, uncond = mixed_losses(self.pipe.unet, self.noise, self.text, [(self.legal, b), (self.legal_uncond, b)],
                                        gen, teacher=self.teacher)
            retain = (cond + uncond) / 2
            loss = loss + self.spec.erase_retain_weight * retain
            out["erase_retain_loss"] = float(retain.detach())
        self.engine.backward(loss)
        self.engine.step()
        return out

    def changed(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.S.items()}

    def state(self) -> dict:
        """Built on rank 0, which writes the checkpoint; the others keep their RNG only."""
        theta = self.changed() if self.rank == 0 else {}
        return {**{f"theta/{k}": v for k, v in theta.items()}, "rng/generator": self.generator.get_state()}

    def load_state(self, tensors: dict) -> None:
        load_into_unet(self.pipe.unet, {k[6:]: v for k, v in tensors.items() if k.startswith("theta/")})
        self.generator.set_state(tensors["rng/generator"])

    def result(self) -> PhaseResult:
        return PhaseResult(changed=self.changed())

    def finish(self) -> None:
        self.pipe.unet.requires_grad_(False)
        self.teacher = None


class AblationPhase(_TrainedErasure):
    """Concept ablation: the concept's caption predicts what the original predicts for the anchor's."""

    name = "ablation"

    def goal(self, noisy, t, captions, anchors):
        return unet_predict(self.teacher, noisy, t, self.text(anchors))


class ESDxPhase(_TrainedErasure):
    """ESD-x: the concept's caption predicts the original's negatively guided prediction, away from the
    concept-free one (the anchor caption, or the empty prompt as in the paper)."""

    name = "esd-x"

    def goal(self, noisy, t, captions, anchors):
        neutral_captions = anchors if self.spec.esd_neutral == "anchor" else [""] * len(captions)
        neutral = unet_predict(self.teacher, noisy, t, self.text(neutral_captions))
        cond = unet_predict(self.teacher, noisy, t, self.text(captions))
        return neutral - self.spec.esd_guidance * (cond - neutral)


def uce_edit(w, concept, anchor, preserve=None, scale: float = 1.0, ridge: float = UCE_RIDGE):
    """UCE's closed form for one projection W (out × in): the W' minimising
    Σᵢ |W' cᵢ − W aᵢ|² + scale Σⱼ |W' pⱼ − W pⱼ|² + ridge |W' − W|², i.e.
    W' = (Σ W aᵢ cᵢᵀ + scale Σ W pⱼ pⱼᵀ + ridge W)(Σ cᵢ cᵢᵀ + scale Σ pⱼ pⱼᵀ + ridge I)⁻¹.
    Rows of `concept`/`anchor`/`preserve` are token embeddings (concept row i pairs with anchor row i)."""
    import torch

    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    lhs = (w @ anchor.T) @ concept + ridge * w
    rhs = concept.T @ concept + ridge * eye
    if preserve is not None:
        lhs = lhs + scale * (w @ preserve.T) @ preserve
        rhs = rhs + scale * preserve.T @ preserve
    return torch.linalg.solve(rhs, lhs.T).T  # W' = lhs · rhs⁻¹ (rhs is symmetric)


class UCEPhase(HardeningPhase):
    """UCE: one closed-form edit of every cross-attention key and value projection (no engine, one step)."""

    name = "uce"
    needs_target = True

    def __init__(self, spec, pipe, rank: int = 0, world: int = 1):
        super().__init__(spec, pipe, rank, world)

        captions = []
        for f in spec.target:  # captions only: UCE edits weights from text, no image is encoded
            captions += [c or "" for c in read_image_folder(f, flag="--target", check_only=True).captions]
        check_erase_captions(spec, captions)
        words = concept_words(spec)
        self.captions = sorted(set(captions))
        self.anchors = [anchor_caption(c, words, spec.anchor) for c in self.captions]
        self.preserve = []
        if spec.legal is not None:
            legal = read_image_folder(spec.legal, flag="--legal", require_captions=False, check_only=True).captions
            self.preserve = sorted({c for c in legal if c})
        self.edited: dict = {}

    def total_steps(self) -> int:
        return 1

    def _embeddings(self, captions: list[str]):
        import torch

        with torch.no_grad():
            enc = encode_prompts(self.pipe, captions).double()
        if is_sdxl(self.pipe.unet):
            enc = enc[:, :-1]  # the token states the keys and values see, without SDXL's pooled row
        return enc.reshape(-1, enc.shape[-1])

    def step(self) -> dict:
        import torch

        dev = next(self.pipe.unet.parameters()).device
        c, a = self._embeddings(self.captions).to(dev), self._embeddings(self.anchors).to(dev)
        p = self._embeddings(self.preserve).to(dev) if self.preserve else None
        s = self.spec.uce_preserve_scale
        moved = 0.0
        for name, mod in self.pipe.unet.named_modules():
            if ".attn2." not in name + "." or not name.endswith(("to_k", "to_v")):
                continue
            w = mod.weight.detach().double()
            new = uce_edit(w, c, a, p, s)
            moved = max(moved, float((new - w).abs().max()))
            with torch.no_grad():
                mod.weight.copy_(new.to(mod.weight.dtype))
            self.edited[f"{name}.weight"] = mod.weight.detach().cpu().clone()
        return {"uce_max_change": moved}

    def result(self) -> PhaseResult:
        return PhaseResult(changed=dict(self.edited))


#: `--erase` / `erase --method` values and their phases
ERASERS = {"uce": UCEPhase, "esd-x": ESDxPhase, "ablation": AblationPhase}
