"""Single-file Stable Diffusion checkpoints: `--model FILE.safetensors` in the original (LDM / A1111 / ComfyUI)
layout, converted once, offline, into a diffusers pipeline folder that every command then reads unchanged.

    from raystack.models.single_file import single_file_pipeline
    folder = single_file_pipeline(Path("v1-5-pruned-emaonly.safetensors"))   # a cached diffusers folder

What is supported: text-to-image checkpoints of Stable Diffusion 1.x (CLIP ViT-L text encoder), 2.x (OpenCLIP
ViT-H) and XL base (both), holding UNet, VAE and text encoder(s) (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*` / `conditioner.embedders.*`). Nothing is downloaded:

- the family is read from which keys the file holds (the text encoder's layout and SDXL's added conditioning);
- every shape is read from the tensors themselves, so reduced-width checkpoints convert too: UNet levels, widths,
  res-blocks per level, where attention is and how deep, linear or convolutional projections, cross-attention
  width, SDXL's added-conditioning sizes; VAE levels and widths; text encoders' vocabulary, width, depth, MLP width,
  context length and projection;
- what tensors cannot say comes from the family (configs/families.json, as the published diffusers folders set it):
  the scheduler, the VAE scaling factor, the text encoders' activation, UNet attention heads (SD-1.x: 8; 2.x/XL: one
  per 64 channels) and text-encoder heads (one per 64 channels), SD-2.x using its text encoder's penultimate layer;
- the image size and the prediction type come from the file's ModelSpec metadata when it has them
  (`modelspec.resolution`, `modelspec.prediction_type`, `modelspec.architecture`, a `v_pred` marker key), else from
  the family (SD-1.x 512 ε; SD-2.x 768 v-prediction, as diffusers assumes; XL 1024 ε): an SD-2.x 512 ε checkpoint
  without metadata reads as v-prediction;
- the tokenizer: CLIP's BPE (shipped, configs/clip-bpe-merges.txt.gz) for a 49,408-token vocabulary, the tiny world's
  for its own; any other vocabulary is refused (its tokenizer is not in the file: pass a diffusers folder instead).

Not supported, each refused in one line naming the file: pickled checkpoints (.ckpt/.pt/.pth/.bin/.pkl: nothing is
unpickled), inpainting and other image-conditioned UNets, the SDXL refiner, unCLIP/upscalers, files without a VAE or
text encoder (UNet-only files, LoRAs), and anything else. EMA copies (`model_ema.*`) are ignored (the trained
weights are used, as diffusers does by default). Heads are not in the tensors: a reduced-width checkpoint converts
with the family's rule, which may differ from the heads it was trained with (same weights, another attention split).

The folder is content-addressed: `$IMMUNIZE_CACHE/single-file/v1/<sha256 of the file>/` (default cache
`$XDG_CACHE_HOME/immunize-cli` or `~/.cache/immunize-cli`), written in a hidden sibling and renamed into place, so a
crash leaves nothing half-written and two processes converting the same file at once both end with the same folder.
An all-fp16 checkpoint is kept in fp16 as the folder's fp16 variant (`load_pipeline` trains it in fp32); any other
precision is stored in fp32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ..storage import cache_dir
from ..errors import UserError
from ..outputs import shown
from ..atomic import disk_full, is_disk_full
from ..tinyworld.tokenizer import _bytes_to_unicode
from .folders import (PICKLE_SUFFIXES, check_component_shapes, check_pipeline_folder, default_model_path, safetensors_header)

SINGLE_FILE_SUFFIX = ".safetensors"
CONFIGS = Path(__file__).resolve().parent / "configs"
#: bump when the conversion changes what it writes: older cached folders are then left alone, not reused
CONVERTER_VERSION = 1
PROVENANCE_FILE = "immunize_single_file.json"

U, V = "model.diffusion_model.", "first_stage_model."
SD1_TEXT = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
SD2_TEXT = "cond_stage_model.model."
XL_TEXT = ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")
CLIP_VOCAB_SIZE = 49408
FAMILY_NAMES = {"sd1": "SD-1.x", "sd2": "SD-2.x", "sdxl": "SDXL"}


def is_pickled_file(path: Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def pickle_refusal(path: Path, flag: str = "--model") -> UserError:
    return UserError(
        f"{flag} {shown(str(path))}: pickled checkpoints are refused (unpickling runs code from the file; nothing is "
        "unpickled): convert it to .safetensors first, on a machine you trust, e.g. with diffusers' "
        "scripts/convert_original_stable_diffusion_to_diffusers.py --checkpoint_path FILE --dump_path DIR "
        "--to_safetensors (then pass --model DIR)")


def single_file_pipeline(path: Path, flag: str = "--model") -> Path:
    """The diffusers folder for a single-file checkpoint (converted on first use, then cached); a pickle is refused;
    any other file is returned as it is (the caller's folder checks say what is wrong with it)."""
    path = Path(path)
    if is_pickled_file(path):
        raise pickle_refusal(path, flag)
    if path.suffix.lower() != SINGLE_FILE_SUFFIX:
        return path
    header = _header(path, flag)
    family = detect_family(header, path, flag)  # these checks read the header only, before hashing or writing
    preflight(header, family, path, flag)
    dest = cache_root() / f"v{CONVERTER_VERSION}" / file_digest(path)
    if (dest / PROVENANCE_FILE).is_file():
        return dest
    return _convert_into(path, dest, header, family, flag)


def cache_root() -> Path:
    """`$IMMUNIZE_CACHE/single-file`, else `$XDG_CACHE_HOME/immunize-cli/single-file`, else `~/.cache/...`."""
    return cache_dir("single-file")


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes, remembered per (path, size, mtime, inode) in this process and in the cache (a
    7 GB checkpoint is hashed once, not at every command)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _DIGESTS:
        return _DIGESTS[key]
    memo = cache_root() / "by-stat" / hashlib.sha256(repr(key).encode()).hexdigest()
    try:
        digest = memo.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            _DIGESTS[key] = digest
            return digest
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    digest = _DIGESTS[key] = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".memo-", dir=memo.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(digest)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache still converts; it just hashes again next time
    return digest


# --- what the file is -------------------------------------------------------------------------------------------


def _header(path: Path, flag: str) -> dict:
    return safetensors_header(path, flag)


def _shapes(header: dict) -> dict[str, tuple]:
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _unknown(path: Path, flag: str, why: str) -> UserError:
    return UserError(f"{flag} {shown(str(path))}: not a Stable Diffusion 1.x, 2.x or XL checkpoint ({why}); pass a "
                     "single-file SD checkpoint or a diffusers pipeline folder")


def detect_family(header: dict, path: Path, flag: str = "--model") -> str:
    """"sd1", "sd2" or "sdxl" from the keys alone; anything else is one UserError naming the file."""
    shapes = _shapes(header)
    keys = shapes.keys()
    if not any(k.startswith(U) for k in keys):
        if any(k.startswith(("lora_", "lora_unet", "lora_te")) or ".lora_" in k for k in keys):
            raise _unknown(path, flag, "it looks like a LoRA, not a full model")
        raise _unknown(path, flag, "no UNet weights model.diffusion_model.*")
    for k in (U + "input_blocks.0.0.weight", U + "out.2.weight", U + "time_embed.0.weight"):
        if k not in shapes:
            raise _unknown(path, flag, f"its UNet has no {k}")
    if not any(k.startswith(V + "encoder.") for k in keys) or not any(k.startswith(V + "decoder.") for k in keys):
        raise _unknown(path, flag, "no VAE weights first_stage_model.*")
    in_ch = shapes[U + "input_blocks.0.0.weight"][1]
    if in_ch != 4:
        raise _unknown(path, flag, f"a UNet with {in_ch} input channels, i.e. inpainting or image-conditioned: only "
                                   "text-to-image checkpoints are supported")
    labelled = U + "label_emb.0.0.weight" in shapes
    if XL_TEXT[0] + "embeddings.token_embedding.weight" in shapes and XL_TEXT[1] + "token_embedding.weight" in shapes:
        if not labelled:
            raise _unknown(path, flag, "SDXL text encoders but no added-conditioning weights in the UNet")
        return "sdxl"
    if "conditioner.embedders.0.model.token_embedding.weight" in shapes:
        raise _unknown(path, flag, "an SDXL refiner (image-to-image only)")
    if labelled or U + "label_emb.weight" in shapes:
        raise _unknown(path, flag, "a class- or image-conditioned UNet (unCLIP or an upscaler)")
    if SD2_TEXT + "token_embedding.weight" in shapes:
        return "sd2"
    if any(p + "embeddings.token_embedding.weight" in shapes for p in SD1_TEXT):
        return "sd1"
    raise _unknown(path, flag, "no CLIP or OpenCLIP text encoder weights")


def _indices(keys, prefix: str) -> list[int]:
    """The distinct integers right after `prefix` in `keys` (block numbers)."""
    out = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return sorted(out)


def _heads(channels: int, per_head: int) -> int:
    """One head per `per_head` channels (at least one), lowered until it divides the width."""
    h = max(1, channels // per_head)
    while channels % h:
        h -= 1
    return h


@functools.lru_cache(maxsize=None)
def _families() -> dict:
    return json.loads((CONFIGS / "families.json").read_text())


def _family(family: str) -> dict:
    return _families()[family]


def image_settings(header: dict, family: str) -> tuple[int, str]:
    """(image size, prediction type): the file's ModelSpec metadata, else the family's published defaults."""
    fam = _family(family)
    meta = header.get("__metadata__") or {}
    arch = str(meta.get("modelspec.architecture", "")).lower()
    pred = str(meta.get("modelspec.prediction_type", "")).lower().replace("-", "_")
    if pred in ("v", "v_prediction", "v_pred", "velocity"):
        prediction = "v_prediction"
    elif pred in ("epsilon", "eps"):
        prediction = "epsilon"
    elif arch.endswith("-v") or "v_pred" in header:
        prediction = "v_prediction"
    elif family == "sd2" and arch.endswith("-512"):
        prediction = "epsilon"
    else:
        prediction = fam["prediction_type"]
    m = re.fullmatch(r"\s*(\d+)\s*[x×,]\s*(\d+)\s*", str(meta.get("modelspec.resolution", "")))
    if m:
        size = max(int(m.group(1)), int(m.group(2)))
    elif prediction == "epsilon" and "resolution_epsilon" in fam:
        size = fam["resolution_epsilon"]
    else:
        size = fam["resolution"]
    return size, prediction


# --- configs from shapes ----------------------------------------------------------------------------------------


def unet_config(shapes: dict, family: str, image_size: int, path: Path, flag: str) -> dict:
    u = {k[len(U):]: v for k, v in shapes.items() if k.startswith(U)}
    levels: list[list[int]] = [[]]
    for i in _indices(u, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in u:
            levels.append([])
        elif f"input_blocks.{i}.0.out_layers.3.weight" in u:
            levels[-1].append(i)
        else:
            raise _unknown(path, flag, f"an unknown UNet block input_blocks.{i}")
    per_level = len(levels[0])
    outputs = _indices(u, "output_blocks.")
    if per_level == 0 or any(len(b) != per_level for b in levels) or len(outputs) != len(levels) * (per_level + 1):
        raise _unknown(path, flag, "an irregular UNet layout")
    widths = [u[f"input_blocks.{b[0]}.0.out_layers.3.weight"][0] for b in levels]
    down_attn = [f"input_blocks.{b[0]}.1.proj_in.weight" in u for b in levels]
    depth = [len(_indices(u, f"input_blocks.{b[0]}.1.transformer_blocks.")) or 1 for b in levels]
    up_first = [j * (per_level + 1) for j in range(len(levels))]
    up_attn = [f"output_blocks.{o}.1.proj_in.weight" in u for o in up_first]
    up_depth = [len(_indices(u, f"output_blocks.{o}.1.transformer_blocks.")) or 1 for o in up_first]
    if "middle_block.1.proj_in.weight" not in u:
        raise _unknown(path, flag, "a UNet without mid-block attention")
    mid_depth = len(_indices(u, "middle_block.1.transformer_blocks."))
    to_k = sorted(k for k in u if k.endswith("attn2.to_k.weight"))
    if not to_k:
        raise _unknown(path, flag, "a UNet without cross-attention")
    attn_widths = [w for w, a in zip(widths, down_attn) if a]
    fam = _family(family)["unet"]
    if "heads" in fam and all(w % fam["heads"] == 0 for w in attn_widths):
        heads = fam["heads"]
    else:
        heads = [_heads(w, fam.get("head_channels", 64)) for w in widths]
    cfg = {
        "sample_size": image_size // 8, "in_channels": u["input_blocks.0.0.weight"][1],
        "out_channels": u["out.2.weight"][0], "layers_per_block": per_level, "block_out_channels": widths,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "cross_attention_dim": u[to_k[0]][1], "attention_head_dim": heads,
        "use_linear_projection": len(u["middle_block.1.proj_in.weight"]) == 2,
        "upcast_attention": fam["upcast_attention"],
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "norm_num_groups": 32,
    }
    if up_depth != depth[::-1]:
        cfg["reverse_transformer_layers_per_block"] = [[d] * (per_level + 1) for d in up_depth]
    if mid_depth != depth[-1]:
        raise _unknown(path, flag, "a UNet whose mid-block depth differs from its last level's")
    if family == "sdxl":
        adm = u["label_emb.0.0.weight"][1]
        pooled = shapes[XL_TEXT[1] + "text_projection"][1]
        if (adm - pooled) % 6 or adm <= pooled:
            raise _unknown(path, flag, "SDXL added conditioning of an unknown size")
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=(adm - pooled) // 6,
                   projection_class_embeddings_input_dim=adm)
    return cfg


def vae_config(shapes: dict, family: str, image_size: int, path: Path, flag: str) -> dict:
    e = V + "encoder."
    levels = _indices(shapes, e + "down.")
    try:
        widths = [shapes[f"{e}down.{i}.block.0.conv2.weight"][0] for i in levels]
        cfg = {"in_channels": shapes[e + "conv_in.weight"][1], "out_channels": shapes[V + "decoder.conv_out.weight"][0],
               "latent_channels": shapes[V + "decoder.conv_in.weight"][1], "block_out_channels": widths,
               "layers_per_block": len(_indices(shapes, e + "down.0.block.")),
               "down_block_types": ["DownEncoderBlock2D"] * len(widths),
               "up_block_types": ["UpDecoderBlock2D"] * len(widths), "norm_num_groups": 32,
               "sample_size": image_size, "scaling_factor": _family(family)["vae_scaling_factor"]}
    except KeyError as e_:
        raise _unknown(path, flag, f"its VAE has no {e_.args[0]}") from None
    cfg["use_quant_conv"] = V + "quant_conv.weight" in shapes
    cfg["use_post_quant_conv"] = V + "post_quant_conv.weight" in shapes
    return cfg


def text_configs(shapes: dict, family: str) -> list[dict]:
    """Per text encoder: its prefix, layout ("clip": transformers' names, "openclip": OpenCLIP's), class and
    CLIPTextConfig fields (token ids are filled in with the tokenizer)."""
    fam = _family(family)["text_encoders"]
    if family == "sd1":
        prefix = next(p for p in SD1_TEXT if p + "embeddings.token_embedding.weight" in shapes)
        encoders = [(prefix, "clip", "CLIPTextModel")]
    elif family == "sd2":
        encoders = [(SD2_TEXT, "openclip", "CLIPTextModel")]
    else:
        encoders = [(XL_TEXT[0], "clip", "CLIPTextModel"), (XL_TEXT[1], "openclip", "CLIPTextModelWithProjection")]
    out = []
    for (prefix, layout, cls), f in zip(encoders, fam):
        if layout == "clip":
            vocab, width = shapes[prefix + "embeddings.token_embedding.weight"]
            context = shapes[prefix + "embeddings.position_embedding.weight"][0]
            layers = len(_indices(shapes, prefix + "encoder.layers."))
            mlp = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
            projection = width
        else:
            vocab, width = shapes[prefix + "token_embedding.weight"]
            context = shapes[prefix + "positional_embedding"][0]
            layers = len(_indices(shapes, prefix + "transformer.resblocks."))
            mlp = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
            proj = shapes.get(prefix + "text_projection")
            projection = proj[1] if proj else width
        keep = layers - 1 if f["drop_last_layer"] else layers  # SD-2.x conditions on the penultimate layer
        out.append({"prefix": prefix, "layout": layout, "class": cls, "pad_token": f["pad_token"],
                    "layers_in_file": layers,
                    "config": {"vocab_size": vocab, "hidden_size": width, "intermediate_size": mlp,
                               "num_hidden_layers": keep, "num_attention_heads": _heads(width, 64),
                               "max_position_embeddings": context, "hidden_act": f["hidden_act"],
                               "projection_dim": projection, "layer_norm_eps": 1e-5}})
    return out


def preflight(header: dict, family: str, path: Path, flag: str = "--model") -> None:
    """Every refusal the header alone can give (layout, text vocabulary), before the file is hashed or converted."""
    shapes = _shapes(header)
    size, _ = image_settings(header, family)
    try:
        unet_config(shapes, family, size, path, flag)
        vae_config(shapes, family, size, path, flag)
        texts = text_configs(shapes, family)
    except KeyError as e:
        raise _unknown(path, flag, f"it has no {e.args[0]}") from None
    except (IndexError, TypeError, ValueError):
        raise _unknown(path, flag, "tensors of unexpected shapes") from None
    for t in texts:
        _check_vocabulary(t["config"]["vocab_size"], path, flag)


# --- tokenizers -------------------------------------------------------------------------------------------------


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """CLIP's BPE tokenizer (49,408 tokens) from the shipped merges, built as CLIP builds its vocabulary."""
    import gzip

    from transformers import CLIPTokenizer

    with gzip.open(CONFIGS / "clip-bpe-merges.txt.gz", "rt", encoding="utf-8") as fh:
        merges = [tuple(line.split()) for line in fh.read().split("\n") if line]

    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, pad_token=pad_token,
                         model_max_length=model_max_length)


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(default_model_path() / "tokenizer"))


def tokenizer_for(vocab_size: int, context: int, pad_token: str, path: Path, flag: str):
    """The tokenizer a text encoder with this vocabulary was trained with, when it is one we hold: CLIP's BPE, or
    the tiny world's (the SD-shaped test checkpoints of raystack/models/shapes.py use it)."""
    _check_vocabulary(vocab_size, path, flag)
    if vocab_size == CLIP_VOCAB_SIZE:
        return clip_tokenizer(pad_token, context)
    tiny = _tiny_tokenizer()
    tiny.model_max_length = context
    return tiny


def _check_vocabulary(vocab_size: int, path: Path, flag: str) -> None:
    if vocab_size == CLIP_VOCAB_SIZE or vocab_size == len(_tiny_tokenizer()):
        return
    raise UserError(f"{flag} {shown(str(path))}: its text encoder has a {vocab_size}-token vocabulary, not CLIP's "
                    f"{CLIP_VOCAB_SIZE}, and a single file holds no tokenizer: pass --model a diffusers folder with "
                    "its tokenizer/ instead")


# --- conversion -------------------------------------------------------------------------------------------------


def _convert_into(path: Path, dest: Path, header: dict, family: str, flag: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write_pipeline_folder(path, tmp, header, family, flag, digest=dest.name)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / PROVENANCE_FILE).is_file():  # not another process's finished folder: a broken one
                aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                os.replace(dest, aside / "x")
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(tmp, dest)
    except UserError:
        raise
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(dest, e) from None
        raise UserError(f"{flag} {shown(str(path))}: cannot write its converted folder under {dest.parent} "
                        f"({e.strerror or e}); set IMMUNIZE_CACHE to a writable folder") from None
    except Exception as e:  # noqa: BLE001 - a file whose tensors do not fit the layout its keys promise
        text = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"{flag} {shown(str(path))}: cannot convert this {FAMILY_NAMES[family]} checkpoint "
                        f"({type(e).__name__}: {text})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _sweep_stale(dest: Path, older_than_s: float = 6 * 3600) -> None:
    """Half-written conversions of this file left by a killed process (a 7 GB checkpoint's are worth removing)."""
    for p in dest.parent.glob(f".{dest.name}.*-*"):
        try:
            if time.time() - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def write_pipeline_folder(path: Path, out: Path, header: dict, family: str, flag: str = "--model",
                          digest: str | None = None) -> None:
    """Write the diffusers folder of the checkpoint at `path` (`header`: its safetensors header; `family`: from
    `detect_family`) into the empty folder `out`; `digest`, the file's SHA-256, is recorded with it."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint)
    from safetensors import safe_open
    from transformers import CLIPTextConfig
    import transformers

    shapes = _shapes(header)
    size, prediction = image_settings(header, family)
    ucfg = unet_config(shapes, family, size, path, flag)
    vcfg = vae_config(shapes, family, size, path, flag)
    tcfgs = text_configs(shapes, family)
    tokenizers = [tokenizer_for(t["config"]["vocab_size"], t["config"]["max_position_embeddings"], t["pad_token"],
                                path, flag) for t in tcfgs]
    used = [k for k in shapes if k.startswith((U, V)) or any(k.startswith(t["prefix"]) for t in tcfgs)]
    dtypes = {header[k]["dtype"] for k in used if header[k]["dtype"] in ("F16", "BF16", "F32", "F64")}
    variant = "fp16" if dtypes == {"F16"} else None
    dtype = torch.float16 if variant else torch.float32

    def tensors(prefixes) -> dict:
        with safe_open(str(path), framework="pt") as st:
            return {k: st.get_tensor(k) for k in st.keys() if k.startswith(prefixes)}

    def save(comp: str, state: dict, expected: dict, weights_name: str) -> None:
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            what = (f"misses {len(missing)} weights (e.g. {missing[0]})" if missing
                    else f"has {len(extra)} unknown weights (e.g. {extra[0]})")
            raise UserError(f"{flag} {shown(str(path))}: its {comp} {what} for the layout its shapes describe")
        for k, t in state.items():
            if tuple(t.shape) != expected[k]:
                raise UserError(f"{flag} {shown(str(path))}: {comp} weight {k} has shape {tuple(t.shape)}, the layout "
                                f"its other weights describe needs {expected[k]}")
        from safetensors.torch import save_file

        name = weights_name.replace(".safetensors", f".{variant}.safetensors") if variant else weights_name
        save_file({k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in state.items()},
                  str(out / comp / name), metadata={"format": "pt"})

    def meta_shapes(model) -> dict:
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # UNet and VAE: diffusers' own key conversion, configs from the shapes
    for comp, cls, cfg, convert, prefix in (("unet", UNet2DConditionModel, ucfg, convert_ldm_unet_checkpoint, U),
                                            ("vae", AutoencoderKL, vcfg, convert_ldm_vae_checkpoint, V)):
        with torch.device("meta"):
            model = cls.from_config(cfg)
        (out / comp).mkdir()
        model.save_config(str(out / comp))
        save(comp, convert(tensors(prefix), cfg), meta_shapes(model), "diffusion_pytorch_model.safetensors")
        del model

    # text encoders and their tokenizers
    index_text = {}
    for i, (t, tok) in enumerate(zip(tcfgs, tokenizers)):
        comp, tcomp = ("text_encoder", "tokenizer") if i == 0 else (f"text_encoder_{i + 1}", f"tokenizer_{i + 1}")
        cfg = CLIPTextConfig(**t["config"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        cfg.architectures = [t["class"]]
        cls = getattr(transformers, t["class"])
        with torch.device("meta"):
            model = cls(cfg)
        expected = meta_shapes(model)
        raw = tensors(t["prefix"])
        if t["layout"] == "clip":
            state = {"text_model." + k[len(t["prefix"]):]: v for k, v in raw.items()}
        else:
            state = convert_open_clip_checkpoint(model, raw, prefix=t["prefix"])
            last = t["layers_in_file"] - 1
            if t["config"]["num_hidden_layers"] == last:  # the unused last layer (SD-2.x)
                state = {k: v for k, v in state.items() if f"encoder.layers.{last}." not in k}
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        if not any(k.startswith("text_model.") for k in expected):  # transformers >= 5.6 flattened CLIPTextModel
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        if "text_projection.weight" not in expected:
            state.pop("text_projection.weight", None)
        (out / comp).mkdir()
        cfg.save_pretrained(str(out / comp))
        save(comp, state, expected, "model.safetensors")
        tok.save_pretrained(str(out / tcomp))
        index_text[comp] = ["transformers", t["class"]]
        index_text[tcomp] = ["transformers", "CLIPTokenizer"]
        del model, raw, state

    scfg = dict(_family(family)["scheduler"], prediction_type=prediction)
    sched_cls = getattr(diffusers, scfg.pop("_class_name"))
    sched_cls.from_config(scfg).save_pretrained(str(out / "scheduler"))

    xl = family == "sdxl"
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "_diffusers_version": diffusers.__version__, "feature_extractor": [None, None],
             "image_encoder": [None, None], "scheduler": ["diffusers", sched_cls.__name__],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], **index_text}
    if xl:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(requires_safety_checker=False, safety_checker=[None, None])
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")

    check_pipeline_folder(out, flag)
    check_component_shapes(out, flag)
    (out / PROVENANCE_FILE).write_text(json.dumps({
        "single_file": path.name, "sha256": digest,
        "family": family, "converter_version": CONVERTER_VERSION, "resolution": size, "prediction_type": prediction,
        "precision": variant or "fp32",
        "tokenizer": ["clip-bpe" if t["config"]["vocab_size"] == CLIP_VOCAB_SIZE else "tinyworld" for t in tcfgs],
        "note": "converted from a single-file checkpoint: shapes from its tensors; scheduler, heads, activation, "
                "tokenizer and (without ModelSpec metadata) image size and prediction type from its family",
    }, indent=2) + "\n")
