"""Load and save Stable Diffusion pipelines in the diffusers layout, safetensors only, atomically.

The tiny world is the default model; any SD-1.x/2.x folder (or a hub id already in the local cache,
read offline) goes through the same code. Pickled weights (.bin/.ckpt/.pt) are refused, never loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import UserError
from ..outputs import shown
from ..storage import fetch, is_uri
from .folders import (COMPONENTS, PICKLE_SUFFIXES, SDXL_COMPONENTS, check_component_shapes,  # noqa: F401
                      check_pipeline_folder, default_model_path, is_sdxl_folder, is_shipped_tiny_world,
                      safetensors_header, weight_components)

EXTRA_INFO = "immunize_info.json"


def resolve_model_path(model: str | os.PathLike | None, flag: str = "--model") -> Path:
    """A local pipeline folder for `model`: a path, a hub id already in the local hub cache (`org/name`, or
    `org/name@REVISION`: a branch, tag or commit), or the tiny world if None. A single-file SD-1.x/2.x/XL
    `.safetensors` checkpoint is converted once into a cached diffusers folder, which is returned
    (`single_file.single_file_pipeline`); a pickled checkpoint (.ckpt/.pt/...) is refused."""
    if model is None or str(model) in ("", "tiny", "tinyworld"):
        return default_model_path()
    if is_uri(str(model)):  # object storage: the folder or single file, fetched once into this machine's cache
        model = fetch(str(model), flag)
    p = Path(model).expanduser()
    if p.exists():
        if p.is_file():
            from .single_file import single_file_pipeline

            return single_file_pipeline(p, flag)
        return p
    if "/" in str(model) and not str(model).startswith((".", "/")):
        repo, _, revision = str(model).partition("@")
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
        except Exception:
            what = f"revision {shown(revision)} of {shown(repo)} is" if revision else f"{shown(repo)} is"
            raise UserError(f"{flag} {shown(str(model))}: not a local folder, and {what} not in the local hub cache "
                            "(nothing is downloaded: download it first, or copy the pipeline to a folder)") from None
    raise UserError(f"{flag} {shown(str(model))}: no such file or folder")


def config_geometry(path: Path) -> tuple[int, int] | None:
    """From a pipeline folder's configs alone: (the image size it makes = UNet sample size x VAE factor, the
    multiple every training size must be = VAE factor x UNet down-sampling); None when the configs do not say."""
    try:
        unet = json.loads((Path(path) / "unet" / "config.json").read_text())
        vae = json.loads((Path(path) / "vae" / "config.json").read_text())
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return int(unet["sample_size"]) * factor, factor * 2 ** (len(unet["down_block_types"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def config_resolution(path: Path) -> int | None:
    """The image size a pipeline folder makes (`config_geometry`); None when the configs do not say."""
    geometry = config_geometry(path)
    return None if geometry is None else geometry[0]


#: the UNet's first block width of the published Stable Diffusion architectures (SD-1.x, 2.x and XL alike)
SD_UNET_WIDTH = 320


def model_family(model) -> str:
    """Which attacker defaults fit a model (`attacks.spec`): "tiny" for the tiny world, its derivatives and any
    reduced-width model (the random-weight SD shapes of the tests); "sdxl" or "sd" (SD-1.x/2.x) for a model at
    the published width. Read from the configs alone; a model that cannot be resolved reads as "tiny" (what is
    wrong with it is reported where it is loaded)."""
    try:
        path = resolve_model_path(model)
    except UserError:
        return "tiny"
    if is_shipped_tiny_world(path):
        return "tiny"
    try:
        width = int(json.loads((path / "unet" / "config.json").read_text())["block_out_channels"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "tiny"
    if width < SD_UNET_WIDTH:
        return "tiny"
    return "sdxl" if is_sdxl_folder(path) else "sd"


def weights_digest(path: Path) -> str:
    """SHA-256 over every tensor of the pipeline's safetensors weights (names, dtypes, shapes and bytes; not
    the files' metadata) and its config and tokenizer files: two folders with the same digest are the same
    model to an attacker."""
    import hashlib

    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted([*Path(path).glob("*/*.json"), *Path(path).glob("*/*.txt"), Path(path) / "model_index.json"]):
        if f.is_file():  # configs, scheduler and tokenizer: the same weights under another schedule differ
            h.update(str(f.relative_to(path)).encode() + _without_provenance(f))
    for f in sorted(Path(path).glob("*/*.safetensors")):
        h.update(f"{f.parent.name}/{f.name}".encode())
        with safe_open(str(f), framework="pt") as st:
            for key in sorted(st.keys()):
                t = st.get_tensor(key).contiguous()
                h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: config keys that say where a folder was loaded from or which library version wrote it, not what the model is
PROVENANCE_KEYS = ("_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash")
#: what a saved tokenizer_config.json records of the tokenizer's call defaults (the same tokenizer either way)
TOKENIZER_CALL_DEFAULTS = {"padding_side": "right", "truncation_side": "right", "stride": 0,
                           "truncation_strategy": "longest_first", "pad_token_type_id": 0}


def _without_provenance(f: Path) -> bytes:
    """A config file's bytes for the digest: JSON without PROVENANCE_KEYS (a release saved from the same weights
    records another load path and library version, and is still the same model), anything else as it is."""
    data = f.read_bytes()
    if f.suffix != ".json":
        return data
    try:
        obj = json.loads(data)
    except ValueError:
        return data
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in PROVENANCE_KEYS}
        if f.name == "tokenizer_config.json":  # a tokenizer used once saves its call settings: the defaults
            obj = {k: v for k, v in obj.items()
                   if k not in ("local_files_only", "max_length") and v is not None
                   and TOKENIZER_CALL_DEFAULTS.get(k, object()) != v}
    return json.dumps(obj, sort_keys=True).encode()


def weights_variant(path: Path) -> str | None:
    """"fp16" for a folder published with fp16-variant weights only (`*.fp16.safetensors`, as hub repos ship
    them beside or instead of the full-precision files); None when plain weights are there (they win)."""
    variants = set()
    for comp in weight_components(path):
        names = [f.name for f in (Path(path) / comp).glob("*.safetensors")]
        plain = [n for n in names if n.count(".") == 1]
        if plain:
            return None
        variants |= {n.split(".")[-2] for n in names if n.count(".") >= 2}
    return "fp16" if variants == {"fp16"} else None


def load_pipeline(model: str | os.PathLike | None = None, flag: str = "--model", device: str = "cpu",
                  dtype=None):
    """A StableDiffusionPipeline with no safety checker (or a StableDiffusionXLPipeline, no watermarker), ready
    for training or sampling. A folder with fp16-variant weights only is read as such and, unless `dtype` says
    otherwise, held in fp32 for training."""
    path = resolve_model_path(model, flag)
    check_pipeline_folder(path, flag)
    variant = weights_variant(path)
    try:
        if is_sdxl_folder(path):
            from diffusers import StableDiffusionXLPipeline

            pipe = StableDiffusionXLPipeline.from_pretrained(
                str(path), add_watermarker=False, use_safetensors=True, local_files_only=True, torch_dtype=dtype,
                variant=variant)
            pipe.text_encoder_2.requires_grad_(False)
        else:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(
                str(path), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                use_safetensors=True, local_files_only=True, torch_dtype=dtype, variant=variant,
            )
        if variant and dtype is None:
            import torch

            pipe = pipe.to(torch.float32)
    except UserError:
        raise
    except Exception as e:  # diffusers raises many types for a broken folder
        raise UserError(f"{flag} {shown(str(path))}: cannot load the pipeline ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, dest: Path, overwrite: bool = False, extra_info: dict | None = None) -> Path:
    """Write `pipe` to `dest` in one rename; safetensors weights only."""
    with atomic_dir(Path(dest), overwrite=overwrite) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        for p in tmp.rglob("*"):
            if p.suffix in PICKLE_SUFFIXES:
                p.unlink()
        if extra_info is not None:
            (tmp / EXTRA_INFO).write_text(json.dumps(extra_info, indent=2))
    return Path(dest)


def read_extra_info(path: Path) -> dict:
    f = Path(path) / EXTRA_INFO
    return json.loads(f.read_text()) if f.is_file() else {}
