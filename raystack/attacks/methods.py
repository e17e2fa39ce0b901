"""One class per adaptation method A. Each sets up its trainable parameters φ on a pipeline, encodes
captions, and exports what it learned as safetensors in the format diffusers loads back.

The same classes are IMMA's inner problem (`raystack/hardening/imma.py`): `parameters()` is φ,
`state()`/`load_state()` give the warm start (Alg. 1 line 5), `overlap()` names the UNet tensors
φ shares with θ (line 7).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

from ..diffusion import FrozenTextCache, encode_text
from ..errors import UserError
from .spec import AttackSpec, names_word

LORA_ALL_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_FILE = "pytorch_lora_weights.safetensors"
TI_FILE = "learned_embeds.safetensors"


def is_cross_attention(name: str) -> bool:
    return ".attn2." in name


class Adaptation:
    """What every method shares: caption handling and the cache of frozen text encodings."""

    method: str = ""
    trains_text_encoder = False

    def __init__(self, spec: AttackSpec, pipe, freeze_mask: dict[str, bool] | None = None):
        self.spec, self.pipe, self.mask = spec, pipe, freeze_mask or {}
        self._frozen_text = FrozenTextCache(pipe)
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        pipe.unet.requires_grad_(False)

    # captions ------------------------------------------------------------------------------
    def caption(self, text: str) -> str:
        return self.spec.prompt or text

    def encode(self, captions: list[str]):
        if self.trains_text_encoder:
            return encode_text(self.pipe.text_encoder, self.pipe.tokenizer, captions)
        return self._frozen_text(captions)

    # φ ------------------------------------------------------------------------------------
    def named_parameters(self) -> dict[str, "torch.nn.Parameter"]:  # noqa: F821
        raise NotImplementedError

    def parameters(self) -> list:
        return list(self.named_parameters().values())

    def state(self) -> dict:
        return {k: p.detach().clone() for k, p in self.named_parameters().items()}

    def load_state(self, state: dict) -> None:
        import torch

        with torch.no_grad():
            for k, p in self.named_parameters().items():
                p.copy_(state[k])

    def overlap(self) -> list[str]:
        """UNet parameter names that φ shares with the released weights θ (DreamBooth/full)."""
        return []

    def warm_state(self) -> dict:
        """The part of φ kept apart from θ, carried from one IMMA iteration to the next (Alg. 1 line 5).
        Overlapping φ (DreamBooth/full) *is* θ after line 7, so nothing of it is kept apart."""
        return self.state()

    def load_warm_state(self, state: dict) -> None:
        if state:
            self.load_state(state)

    def after_step(self) -> None:
        pass

    def released(self):
        """A context in which the pipeline computes with θ alone, the weights a publisher releases (IMMA's
        retain term must protect those, not θ with the simulated attacker's φ). Overlapping φ (DreamBooth,
        full) is θ itself, and a new token (textual inversion) is absent from legal captions: nothing to
        take off."""
        return nullcontext()

    def export(self, dest: Path) -> list[Path]:
        raise NotImplementedError

    def weight_decay(self) -> float:
        return 1e-2


class LoRA(Adaptation):
    """Text-to-image LoRA on the UNet attention projections through peft (kohya-style rank/alpha)."""

    method = "lora"
    cross_attention_only = False

    def __init__(self, spec, pipe, freeze_mask=None):
        super().__init__(spec, pipe, freeze_mask)
        from peft import LoraConfig

        targets = self._target_modules()
        if not targets:
            raise UserError("--freeze-mask: every attention projection is frozen; LoRA has nothing to adapt")
        pipe.unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian",
                                         target_modules=targets), adapter_name="attack")
        for n, p in pipe.unet.named_parameters():
            p.requires_grad_(".lora_" in n)

    def _target_modules(self) -> list[str]:
        names = []
        for name, mod in self.pipe.unet.named_modules():
            if not any(name.endswith("." + t) for t in LORA_ALL_ATTENTION):
                continue
            if self.cross_attention_only and not is_cross_attention(name + "."):
                continue
            if self.mask.get(name + ".weight", False):
                continue  # a compliant user leaves frozen tensors alone, adapters included
            names.append(name)
        return names

    def named_parameters(self):
        return {n: p for n, p in self.pipe.unet.named_parameters() if ".lora_" in n}

    def export(self, dest: Path) -> list[Path]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.unet, adapter_name="attack"))
        dest.mkdir(parents=True, exist_ok=True)
        type(self.pipe).save_lora_weights(  # SD's or SDXL's LoRA file layout, as each pipeline loads it
            str(dest), unet_lora_layers=layers, safe_serialization=True,
            unet_lora_adapter_metadata={"r": self.spec.rank, "lora_alpha": self.spec.alpha,
                                        "target_modules": self._target_modules()})
        return [dest / LORA_FILE]

    @contextmanager
    def released(self):
        """The UNet without the adapter (peft's switch; re-enabling would also mark the adapter trainable,
        so its flags are put back as they were)."""
        unet = self.pipe.unet
        flags = {n: p.requires_grad for n, p in self.named_parameters().items()}
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()
            for n, p in self.named_parameters().items():
                p.requires_grad_(flags[n])

    def remove(self) -> None:
        """Take the adapter off the UNet again (IMMA hardens the base weights, not the adapter)."""
        self.pipe.unet.unload_lora()


class DreamBoothLoRA(LoRA):
    """DreamBooth with LoRA on the cross-attention, instance prompt with the attacker's rare token."""

    method = "dreambooth-lora"
    cross_attention_only = True


class DreamBooth(Adaptation):
    """DreamBooth: fine-tune the UNet (or only attn2) on the instance images, optional prior preservation."""

    method = "dreambooth"

    def __init__(self, spec, pipe, freeze_mask=None):
        super().__init__(spec, pipe, freeze_mask)
        for n, p in self.named_parameters().items():
            p.requires_grad_(True)

    def named_parameters(self):
        out = {}
        for n, p in self.pipe.unet.named_parameters():
            if self.spec.cross_attention_only and not is_cross_attention(n):
                continue
            if self.mask.get(n, False):
                continue
            out[n] = p
        return out

    def overlap(self) -> list[str]:
        return list(self.named_parameters())

    def warm_state(self) -> dict:
        return {}

    def export(self, dest: Path) -> list[Path]:
        self.pipe.unet.save_pretrained(str(dest / "unet"), safe_serialization=True)
        return [dest / "unet" / "diffusion_pytorch_model.safetensors"]


class FullFineTune(DreamBooth):
    """Plain full fine-tuning of the UNet on the captions as given."""

    method = "full"


class TextualInversion(Adaptation):
    """New token embedding(s) replacing the attacker's word; everything else frozen."""

    method = "textual-inversion"
    trains_text_encoder = True

    def __init__(self, spec, pipe, freeze_mask=None):
        super().__init__(spec, pipe, freeze_mask)
        import torch

        if getattr(pipe, "text_encoder_2", None) is not None:
            raise UserError("--method textual-inversion: not built for SDXL (its new token needs an embedding in "
                            "both text encoders); use lora, dreambooth-lora, dreambooth or full")
        tok, te = pipe.tokenizer, pipe.text_encoder
        self.placeholder = f"<{spec.token}>"
        self.tokens = [self.placeholder] + [f"{self.placeholder}_{i}" for i in range(1, spec.num_vectors)]
        if tok.add_tokens(self.tokens) != len(self.tokens):
            raise UserError(f"--token {spec.token}: the tokenizer already has {self.placeholder}")
        init = tok.encode(spec.initializer_token, add_special_tokens=False)
        if len(init) != 1:
            raise UserError(f"--initializer-token {spec.initializer_token}: must be a single token of the tokenizer")
        te.resize_token_embeddings(len(tok))
        self.ids = tok.convert_tokens_to_ids(self.tokens)
        emb = te.get_input_embeddings().weight
        with torch.no_grad():
            for i in self.ids:
                emb[i] = emb[init[0]].clone()
        emb.requires_grad_(True)
        self._frozen_rows = emb.detach().clone()
        self._keep = torch.ones(len(tok), dtype=torch.bool)
        self._keep[self.ids] = False

    @property
    def phrase(self) -> str:
        return " ".join(self.tokens)

    def caption(self, text: str) -> str:
        text = super().caption(text)
        if not names_word(text, self.spec.token):
            raise UserError(f"--token {self.spec.token}: not in caption {text!r}; textual inversion replaces it "
                            "with the new token")
        return " ".join(self.phrase if w.strip(",.") == self.spec.token else w for w in text.split())

    def named_parameters(self):
        return {"text_encoder.token_embedding": self.pipe.text_encoder.get_input_embeddings().weight}

    def state(self) -> dict:
        return {"embeds": self.pipe.text_encoder.get_input_embeddings().weight.detach()[self.ids].clone()}

    def load_state(self, state: dict) -> None:
        """`state` may come from a checkpoint read on the CPU: an indexed write does not move it, so it is put
        on the embedding's device (and dtype) here."""
        import torch

        w = self.pipe.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            w[self.ids] = state["embeds"].to(w.device, w.dtype)

    def after_step(self) -> None:
        import torch

        with torch.no_grad():
            w = self.pipe.text_encoder.get_input_embeddings().weight
            w[self._keep] = self._frozen_rows[self._keep].to(w.dtype)

    def weight_decay(self) -> float:
        return 0.0

    def export(self, dest: Path) -> list[Path]:
        from safetensors.torch import save_file

        dest.mkdir(parents=True, exist_ok=True)
        save_file({self.placeholder: self.state()["embeds"].cpu().contiguous()}, str(dest / TI_FILE))
        return [dest / TI_FILE]


REGISTRY: dict[str, type[Adaptation]] = {
    "lora": LoRA,
    "dreambooth": DreamBooth,
    "dreambooth-lora": DreamBoothLoRA,
    "textual-inversion": TextualInversion,
    "full": FullFineTune,
}


def make_adaptation(spec: AttackSpec, pipe, freeze_mask=None, text_cache: FrozenTextCache | None = None) -> Adaptation:
    """The method's adaptation attached to `pipe`. `text_cache`: a shared cache of frozen text encodings (IMMA's
    attacker pool builds a new adaptation whenever the attacker changes and keeps one cache for all)."""
    ad = REGISTRY[spec.method](spec, pipe, freeze_mask)
    if text_cache is not None:
        ad._frozen_text = text_cache
    return ad
