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

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
"""SDXL's second text encoder and tokenizer (`StableDiffusionXLPipeline`), besides COMPONENTS."""


def is_sdxl_folder(path: Path) -> bool:
    """model_index.json names an SDXL pipeline (two text encoders, added conditioning)."""
    try:
        return json.loads((Path(path) / "model_index.json").read_text()).get("_class_name") == "StableDiffusionXLPipeline"
    except (OSError, ValueError, AttributeError):
        return False


def weight_components(path: Path) -> tuple[str, ...]:
    """The components whose weights a folder must have (safetensors): SD's three, SDXL's four."""
    return ("unet", "vae", "text_encoder") + (("text_encoder_2",) if is_sdxl_folder(path) else ())
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
EXTRA_INFO = "immunize_info.json"


def default_model_path() -> Path:
    return Path(__file__).resolve().parent.parent / "tinyworld" / "assets" / "tiny-sd"


def is_shipped_tiny_world(path) -> bool:
    """Is `path` (through any links) the tiny world this package ships?"""
    return os.path.realpath(str(path)) == os.path.realpath(str(default_model_path()))


def resolve_model_path(model: str | os.PathLike | None, flag: str = "--model") -> Path:
    """A local pipeline folder for `model`: a path, a hub id already in the local hub cache (`org/name`, or
    `org/name@REVISION`: a branch, tag or commit), or the tiny world if None. A single-file SD-1.x/2.x/XL
    `.safetensors` checkpoint is converted once into a cached diffusers folder, which is returned
    (`single_file.single_file_pipeline`); a pickled checkpoint (.ckpt/.pt/...) is refused."""
    if model is None or str(model) in ("", "tiny", "tinyworld"):
        return default_model_path()
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


def check_pipeline_folder(path: Path, flag: str = "--model") -> None:
    """One clear error for anything that is not a loadable SD pipeline folder with safetensors weights."""
    if not path.is_dir():
        raise UserError(f"{flag} {shown(str(path))}: not a folder (expected a diffusers pipeline folder)")
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{flag} {shown(str(path))}: not a diffusers pipeline (no model_index.json)")
    try:
        json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{flag} {index}: corrupt model_index.json") from None
    for comp in COMPONENTS + (SDXL_COMPONENTS if is_sdxl_folder(path) else ()):
        if not (path / comp).is_dir():
            raise UserError(f"{flag} {shown(str(path))}: missing the {comp}/ component of a Stable Diffusion pipeline")
    for comp in weight_components(path):
        files = list((path / comp).iterdir())
        st = [f for f in files if f.name.endswith(".safetensors")]
        pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
        if not st:
            if pickles:
                raise UserError(f"{flag} {pickles[0]}: pickle weights are refused (nothing is unpickled); "
                                "convert the model to safetensors first")
            raise UserError(f"{flag} {path / comp}: no .safetensors weights")
        for f in st:
            _check_safetensors(f, flag)


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


def check_tiny_world_judge(path: Path, flag: str,
                           hint: str = "--clip DIR --versus PROMPT, or --clip DIR --concepts FILE") -> None:
    """The tiny world's classifier judges its 32-px images only: on any other model every accuracy would be
    0 and mean nothing, so such a model is refused in one line instead of scored. `hint`: the caller's flags
    for the CLIP judge, which scores any model."""
    from ..tinyworld.classifier import IMAGE_SIZE

    size = config_resolution(path)
    if size is not None and size != IMAGE_SIZE:
        raise UserError(f"{flag}: the model makes {size}-px images; concepts are scored with the tiny world's "
                        f"{IMAGE_SIZE}-px classifier, which cannot judge them (any model is scored by CLIP "
                        f"zero-shot: {hint})")


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


def _safetensors_header(f: Path, flag: str) -> dict:
    """The header of a safetensors file, checked against the file's size without loading any tensor:
    catches truncated or corrupt files (and headers that are JSON but not a tensor table) up front."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size or n > 100 * 1024 * 1024:
                raise ValueError
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError
        end = 0
        for k, v in header.items():
            if k == "__metadata__":
                continue
            offsets, shape = v["data_offsets"], v["shape"]
            if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                    or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ValueError
            end = max(end, offsets[1])
        if 8 + n + end != size:
            raise ValueError
        return header
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise UserError(f"{flag} {shown(str(f))}: truncated or corrupt safetensors file") from None


def _check_safetensors(f: Path, flag: str) -> None:
    _safetensors_header(f, flag)


#: model_index.json names each component's library and class; only these libraries are looked up.
_COMPONENT_LIBRARIES = ("diffusers", "transformers")


def check_component_shapes(path: Path, flag: str = "--model") -> None:
    """Every weight's shape against what the component's config.json builds, on the meta device (no memory,
    no weights loaded): a mismatch is one line here, not a failure inside a Ray worker minutes later."""
    import importlib

    index = json.loads((path / "model_index.json").read_text())
    for comp in weight_components(path):
        entry = index.get(comp)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in _COMPONENT_LIBRARIES
                and isinstance(entry[1], str) and entry[1].isidentifier()):
            raise UserError(f"{flag} {path / 'model_index.json'}: {comp} must name a diffusers or transformers class")
        lib, cls_name = entry
        cls = getattr(importlib.import_module(lib), cls_name, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise UserError(f"{flag} {path / 'model_index.json'}: {comp}: {lib} has no model class {cls_name!r}")
        expected = _meta_shapes(cls, lib, path / comp, flag)
        actual: dict[str, tuple[Path, list]] = {}
        for f in sorted((path / comp).glob("*.safetensors")):
            for k, v in _safetensors_header(f, flag).items():
                if k != "__metadata__":
                    actual[k] = (f, v["shape"])
        shared = set(expected) & set(actual)
        if not shared:
            raise UserError(f"{flag} {path / comp}: none of its weights has a name that {cls_name} expects")
        for k in sorted(shared):
            f, shape = actual[k]
            if tuple(shape) != expected[k]:
                raise UserError(f"{flag} {shown(str(f))}: {k} has shape {tuple(shape)}, but {comp}/config.json builds "
                                f"{expected[k]}")


def _meta_shapes(cls, lib: str, folder: Path, flag: str) -> dict[str, tuple]:
    import torch

    try:
        with torch.device("meta"):
            if lib == "diffusers":
                model = cls.from_config(cls.load_config(str(folder), local_files_only=True))
            else:
                model = cls(cls.config_class.from_pretrained(str(folder), local_files_only=True))
    except Exception as e:  # noqa: BLE001 - a config the library cannot build
        raise UserError(f"{flag} {folder / 'config.json'}: cannot build {cls.__name__} from it "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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
