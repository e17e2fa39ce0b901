"""The papers' metrics: image similarity M between image sets, SGR and RSGR (IMMA Eq. 7, 8).

M(a, b) is the mean pairwise cosine similarity of image embeddings (DreamBooth's CLIP-I/DINO
convention). Embedders: the tiny world's classifier features (always there), or CLIP / DINO image
towers from a local folder (never downloaded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .outputs import shown


def set_similarity(fa: np.ndarray, fb: np.ndarray) -> float:
    """Mean pairwise cosine similarity of two sets of L2-normalised embeddings."""
    return float((fa @ fb.T).mean())


def sgr(m_ref_base: float, m_ref_hardened: float) -> float:
    """Similarity gap ratio: (M(x_r, x_A) − M(x_r, x_I)) / M(x_r, x_A). Higher: hardening took more away."""
    return (m_ref_base - m_ref_hardened) / m_ref_base


def rsgr(m_other_base_hardened: float, m_target_base_hardened: float) -> float:
    """Relative SGR: (M(x_A^o, x_I^o) − M(x_A, x_I)) / M(x_A^o, x_I^o). Higher: the damage is specific."""
    return (m_other_base_hardened - m_target_base_hardened) / m_other_base_hardened


class ClassifierEmbedder:
    name = "classifier"

    def __init__(self, judge):
        self.judge = judge

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.judge(images)["features"]


#: the image normalisation each kind of model was trained with: CLIP's own, and ImageNet's for DINO
NORMALISATION = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                 "dino": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def model_pixels(images: np.ndarray, size: int, kind: str):
    """uint8 N x H x W x 3 -> the N x 3 x size x size input a `kind` model expects (bicubic resize, then its
    normalisation). The tiny world's CLIP trains on exactly this."""
    import torch

    mean, std = (torch.tensor(v).view(1, 3, 1, 1).float() for v in NORMALISATION[kind])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x - mean) / std


def projected_features(out):
    """What CLIP's get_image_features / get_text_features return: a tensor (transformers 4), or an output whose
    pooler_output holds it (transformers 5)."""
    return out if hasattr(out, "norm") else out.pooler_output


class ClipZeroShot:
    """Concept accuracy for any model, with a local CLIP folder: each image is assigned the label (a concept's
    prompt: the target, or one of the `--versus` alternatives) whose text embedding is most similar to it,
    and a concept's accuracy is the share of its images assigned to its own label."""

    def __init__(self, path: Path, labels: list[str], flag: str | None = None):
        import torch
        from transformers import AutoTokenizer

        flag = flag or f"--clip {shown(str(path))}"
        self.images = HFImageEmbedder("clip", path, flag=flag)
        if not hasattr(self.images.model, "get_text_features"):
            raise UserError(f"{flag}: not a CLIP model with a text tower (zero-shot scoring needs both)")
        check_tokenizer_files(path, flag)
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{flag}: no tokenizer to read the labels with ({type(e).__name__})") from None
        self.labels = list(labels)
        ids = tok(self.labels, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            t = projected_features(self.images.model.get_text_features(input_ids=ids.input_ids,
                                                                       attention_mask=ids.attention_mask))
        self.text = torch.nn.functional.normalize(t, dim=-1).numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The index of the most similar label, per image."""
        return np.argmax(self.images(images) @ self.text.T, axis=1)

    def hits(self, images: np.ndarray, label: str) -> np.ndarray:
        """Per image: assigned to `label` (the judge's verdict, image by image)."""
        return self.predict(images) == self.labels.index(label) if len(images) else np.zeros(0, bool)

    def accuracy(self, images: np.ndarray, label: str) -> float:
        return float(np.mean(self.hits(images, label))) if len(images) else 0.0

    def label_hits(self, images: np.ndarray, labels: list[str]) -> np.ndarray:
        """Per image: assigned to one of `labels` (a concept's own labels, `judges.ClipJudge`)."""
        if not len(images):
            return np.zeros(0, bool)
        return np.isin(self.predict(images), [self.labels.index(x) for x in labels])


def check_tokenizer_files(path: Path, flag: str) -> None:
    """A CLIP folder's tokenizer files (tokenizer.json, or vocab.json and merges.txt): without them transformers
    builds an empty tokenizer that reads every label as unknown words, and every label would score alike."""
    p = Path(path)
    if not ((p / "tokenizer.json").is_file() or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())):
        raise UserError(f"{flag}: no tokenizer to read the labels with (tokenizer.json, or vocab.json and merges.txt)")


#: transformers model types each embedder takes: CLIP needs both towers (CLIPModel), DINO a ViT-like backbone
EMBEDDER_MODEL_TYPES = {"clip": ("clip", "siglip", "siglip2"), "dino": ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit")}


def check_embedder_folder(kind: str, path: Path, flag: str | None = None) -> None:
    """A local transformers folder of the right kind (read from its config.json, before any weight is loaded);
    `flag` names it in the error line (default: --clip/--dino and the folder)."""
    import json

    flag = flag or f"--{kind} {shown(str(path))}"
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{flag}: not a local transformers model folder (no config.json)")
    try:
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{flag}: config.json is not a transformers model config") from None
    if model_type not in EMBEDDER_MODEL_TYPES[kind]:
        what = "a CLIP model with its vision and text towers (CLIPModel)" if kind == "clip" else "a DINO / ViT model"
        raise UserError(f"{flag}: a {shown(model_type)} model, not {what}")
    if not list(Path(path).glob("*.safetensors")):
        raise UserError(f"{flag}: no .safetensors weights (pickles are refused)")


class HFImageEmbedder:
    """CLIP (vision tower + projection) or DINO (CLS token) from a local transformers folder."""

    def __init__(self, kind: str, path: Path, flag: str | None = None):
        import torch
        from transformers import AutoModel

        self.name, self._torch = kind, torch
        path = Path(path)
        flag = flag or f"--{kind} {shown(str(path))}"
        check_embedder_folder(kind, path, flag)
        try:
            model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{flag}: cannot load ({type(e).__name__})") from None
        self.model = model.eval()
        cfg = getattr(model.config, "vision_config", model.config)
        self.size = int(getattr(cfg, "image_size", 224))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = model_pixels(images, self.size, "clip" if self.name == "clip" else "dino")
        with torch.no_grad():
            if self.name == "clip":
                f = projected_features(self.model.get_image_features(pixel_values=x))
            else:
                f = self.model(pixel_values=x).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(f, dim=-1).numpy()
