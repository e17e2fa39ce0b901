"""What a diffusers pipeline folder must hold, checked without loading a weight: its components, safetensors
headers checked against the file size, every shape against the component's config (on the meta device), and
the tiny world this package ships."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def default_model_path() -> Path:
    return Path(__file__).resolve().parent.parent / "tinyworld" / "assets" / "tiny-sd"


def is_shipped_tiny_world(path) -> bool:
    """Is `path` (through any links) the tiny world this package ships?"""
    return os.path.realpath(str(path)) == os.path.realpath(str(default_model_path()))


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


def safetensors_header(f: Path, flag: str) -> dict:
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
    safetensors_header(f, flag)


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
            for k, v in safetensors_header(f, flag).items():
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
