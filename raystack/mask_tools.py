"""The freeze mask outside this tool: export it to what other trainers read, and check a derivative against it.

A FreezeAsGuard release protects only users who train with its mask. The trainers people use read no
per-tensor freeze list; some LoRA trainers filter the modules they adapt (peft `exclude_modules`, OneTrainer's
regex layer filter), kohya sd-scripts' SD LoRA does not (its export lists the names to keep out): a LoRA
complies when it adapts no module whose weight is frozen. A full fine-tune complies when every frozen tensor keeps its released bytes. `check_derivative`
is what a model hub runs on an upload to tell the two apart.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import sha256_file
from .errors import UserError
from .freeze_mask import MASK_FILE, load_freeze_mask
from .outputs import shown

FORMATS = ("names", "regex", "peft", "kohya", "onetrainer")

KOHYA_PREFIX = "lora_unet_"
#: adapter tensors patch a module's weight, except these, which patch its bias
BIAS_SUFFIXES = (".diff_b", ".bias", ".b_norm")


@dataclass
class Release:
    """A release as the mask tools see it: its UNet's parameter names and layers, and the mask."""

    folder: Path
    mask_path: Path
    mask: dict[str, bool]
    layers: dict[str, str]
    """Every Linear / Conv module of the UNet (the modules a LoRA can adapt): name -> 'linear' | 'conv'."""
    unet_sha256: str

    @property
    def frozen(self) -> list[str]:
        return [n for n, f in self.mask.items() if f]

    @property
    def ratio(self) -> float:
        return len(self.frozen) / max(1, len(self.mask))

    def frozen_layers(self) -> list[str]:
        return [m for m in self.layers if self.mask.get(f"{m}.weight", False)]

    def free_layers(self) -> list[str]:
        return [m for m in self.layers if not self.mask.get(f"{m}.weight", False)]


def unet_weight_files(folder: Path) -> list[Path]:
    """The UNet's safetensors weights in a diffusers unet folder (one file, or shards), fp32 before variants."""
    files = sorted(p for p in folder.glob("diffusion_pytorch_model*.safetensors"))
    plain = [p for p in files if p.name == "diffusion_pytorch_model.safetensors"
             or re.fullmatch(r"diffusion_pytorch_model-\d+-of-\d+\.safetensors", p.name)]
    return plain or files


def _meta_unet(unet_dir: Path, flag: str):
    """The release's UNet built from its config on the meta device: module names and types, no weights read."""
    import diffusers
    import torch

    try:
        config = json.loads((unet_dir / "config.json").read_text())
        cls = getattr(diffusers, config["_class_name"])
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        raise UserError(f"{flag} {shown(str(unet_dir.parent))}: no readable unet/config.json of a diffusers UNet") from None
    with torch.device("meta"):
        return cls.from_config(config)


def load_release(folder: Path, mask: Path | None = None, flag: str = "--release") -> Release:
    import torch

    folder = Path(folder)
    unet_dir = folder / "unet"
    if not unet_dir.is_dir():
        raise UserError(f"{flag} {shown(str(folder))}: not a pipeline folder (no unet/)")
    files = unet_weight_files(unet_dir)
    if not files:
        raise UserError(f"{flag} {shown(str(folder))}: no unet/*.safetensors weights")
    mask_path = Path(mask) if mask is not None else folder / MASK_FILE
    if mask is None and not mask_path.is_file():
        raise UserError(f"{flag} {shown(str(folder))}: no {MASK_FILE} (pass --mask FILE)")
    unet = _meta_unet(unet_dir, flag)
    names = [n for n, _ in unet.named_parameters()]
    flags = load_freeze_mask(mask_path, names, flag="--mask" if mask is not None else flag)
    layers = {n: "conv" if isinstance(m, torch.nn.Conv2d) else "linear" for n, m in unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    digest = sha256_file(files[0]) if len(files) == 1 else hashlib.sha256(
        "".join(sha256_file(f) for f in files).encode()).hexdigest()
    return Release(folder, mask_path, flags, layers, digest)


# --- export ------------------------------------------------------------------------------------------------

def _header(rel: Release, fmt: str, rule: str, comment: str = "#") -> str:
    lines = [f"immunize-cli mask export --format {fmt}: FreezeAsGuard freeze mask {rel.mask_path.name}",
             f"release: {rel.folder.name}, UNet weights sha256 {rel.unet_sha256}",
             f"frozen: {len(rel.frozen)} of {len(rel.mask)} UNet tensors (ratio {rel.ratio:.4f}); "
             f"{len(rel.frozen_layers())} of {len(rel.layers)} Linear/Conv layers have a frozen weight",
             rule]
    return "".join(f"{comment} {ln}\n" if comment else f"{ln}\n" for ln in lines)


def kohya_name(module: str) -> str:
    """kohya sd-scripts' LoRA name of a UNet module: `lora_unet_` + the module path with '.' as '_'."""
    return KOHYA_PREFIX + module.replace(".", "_")


def exact_regex(names: list[str]) -> str:
    """One regular expression that full-matches exactly these names."""
    return "(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")" if names else "(?!)"


def export_mask(rel: Release, fmt: str) -> str:
    """The mask as `fmt` reads it (text, with the mask's ratio and the release's hash in a header)."""
    if fmt == "names":
        return _header(rel, fmt, "one frozen UNet tensor per line: keep each at its released value") + \
            "".join(f"{n}\n" for n in rel.frozen)
    if fmt == "regex":
        return _header(rel, fmt, "re.fullmatch(pattern, tensor name) is true exactly for the frozen UNet tensors") + \
            exact_regex(rel.frozen) + "\n"
    frozen_layers, free = rel.frozen_layers(), rel.free_layers()
    if fmt == "peft":
        rule = ("peft LoraConfig(**lora_config): adapts only layers whose weight is not frozen; keep "
                "exclude_modules when you narrow target_modules (e.g. to the attention projections)")
        doc = {"_about": _header(rel, fmt, rule, comment="").strip().splitlines(),
               "lora_config": {"target_modules": free, "exclude_modules": frozen_layers}}
        return json.dumps(doc, indent=2) + "\n"
    if fmt == "kohya":
        rule = ("sd-scripts' networks.lora (SD 1.x/2.x) has no module filter in network_args: a kohya LoRA complies "
                "when no key of it is one of these names followed by '.' (kohya's naming: lora_unet_ + the module path "
                "with '_' for '.'); check the trained file with `immunize-cli mask check`")
        return _header(rel, fmt, rule) + "".join(f"{kohya_name(m)}\n" for m in frozen_layers)
    if fmt == "onetrainer":
        pattern = "^" + exact_regex(free) + "$"
        rule = ("OneTrainer training config keys (LoRA tab, custom layer filter): re.search of the regex selects "
                "exactly the layers whose weight is not frozen")
        doc = {"_about": _header(rel, fmt, rule, comment="").strip().splitlines(),
               "layer_filter": pattern, "layer_filter_regex": True, "layer_filter_preset": "custom"}
        return json.dumps(doc, indent=2) + "\n"
    raise UserError(f"--format {shown(fmt)}: expected one of {', '.join(FORMATS)}")


# --- check a derivative ------------------------------------------------------------------------------------
#
# `mask check` judges what a loader would load from the derivative, and so reads every weight file diffusers or
# peft could take from it: in its UNet folder every `diffusion_pytorch_model*.safetensors` (each variant:
# `from_pretrained(..., variant="fp16")` reads `diffusion_pytorch_model.fp16.safetensors`), every shard that an
# index (`*.index*.json`, its `weight_map`) names (diffusers loads every tensor of every such shard, in place of
# the plain file), every adapter file (`unet.load_lora_adapter`, `load_attn_procs`); at a pipeline's root every
# .safetensors file (`pipe.load_lora_weights(folder)` takes `pytorch_lora_weights.safetensors` or the one
# .safetensors there). A weight file it cannot read or attribute (a pickle: .bin, .ckpt, .pt, ...; a file with no
# tensor of the UNet) is a violation, never a pass.

#: weight files diffusers or torch could load that are not safetensors: never unpickled here, so never checked
UNREADABLE_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".msgpack", ".gguf", ".onnx", ".pb", ".h5",
                      ".flashpack")


@dataclass
class FileResult:
    """One weight file of the derivative, as checked."""

    file: str
    """Its path relative to the derivative folder (its name for a single file)."""
    kind: str
    """'full' (UNet tensors compared with the release's), 'shards' (an index: the tensors of all its shards),
    'shard' (one of them), 'lora' (adapter modules compared with the mask), 'unverifiable'."""
    checked: int = 0
    violations: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def compliant(self) -> bool:
        return not self.violations


@dataclass
class CheckResult:
    kind: str
    """'full' (UNet weights compared tensor by tensor), 'lora' (adapter modules compared with the mask), or
    'mixed' (files of both kinds, or unverifiable ones)."""
    checked: int
    violations: list[tuple[str, str]] = field(default_factory=list)
    """(tensor / module, problem), over every file; the problem names the file when there are several."""
    notes: list[str] = field(default_factory=list)
    files: list[FileResult] = field(default_factory=list)

    @property
    def compliant(self) -> bool:
        return not self.violations


def unet_tensor_names(unet_dir: Path, flag: str = "--release") -> list[str]:
    """The tensor names in a UNet folder's safetensors weights (read from the headers only)."""
    names: list[str] = []
    for f in unet_weight_files(Path(unet_dir)):
        names += _st_keys(f, flag)
    return names


def _st_keys(path: Path, flag: str) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{flag} {shown(str(path))}: not a readable safetensors file "
                        f"({(str(e).splitlines() or [''])[0][:100]})") from None


def _is_adapter(keys: list[str]) -> bool:
    return any(k.startswith(("lora_", "lycoris_")) or ".lora" in k or "_lora." in k or ".hada_" in k
               or ".lokr_" in k for k in keys)


class _Released:
    """The release's UNet tensors, read one at a time from its weight files (kept open while checking)."""

    def __init__(self, rel: Release):
        import contextlib

        from safetensors import safe_open

        self._stack = contextlib.ExitStack()
        self._where = {}
        for f in unet_weight_files(rel.folder / "unet"):
            h = self._stack.enter_context(safe_open(str(f), framework="pt"))
            self._where.update({k: h for k in h.keys()})
        self.rel = rel

    def get(self, name: str):
        if name not in self._where:
            raise UserError(f"--release {shown(str(self.rel.folder))}: the mask names {shown(name)}, which its "
                            "weights lack")
        return self._where[name].get_tensor(name)

    def close(self) -> None:
        self._stack.close()


def _bitwise_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _compare(released: _Released, name: str, b) -> str | None:
    """Why tensor `b` is not the released tensor `name` (None: bitwise equal)."""
    a = released.get(name)
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{b.dtype} {tuple(b.shape)} instead of the released {a.dtype} {tuple(a.shape)}"
    if not _bitwise_equal(a, b):
        diff = (a.float() - b.float()).abs().max().item()
        return f"changed (max |difference| {diff:.3g})"
    return None


def _full_keys(rel: Release, keys: list[str]) -> tuple[str, dict[str, str]]:
    """(prefix stripped, {UNet tensor name: key in the file}) for a file of full UNet weights."""
    strip = "unet." if not any(k in rel.mask for k in keys) and any(k.startswith("unet.") for k in keys) else ""
    return strip, {k[len(strip):]: k for k in keys if k.startswith(strip) and k[len(strip):] in rel.mask}


def _check_tensors(rel: Release, released: _Released, path: Path, res: FileResult, require_all: bool,
                   seen: set[str] | None = None) -> None:
    """Compare every frozen tensor in one safetensors file of full weights with the release's."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as st:
            keys = list(st.keys())
            _, found = _full_keys(rel, keys)
            if not found:
                res.violations.append((res.file, "none of its tensors is a parameter or adapter of the release's "
                                                  "UNet (cannot be checked)"))
                return
            for name in rel.frozen:
                if name not in found:
                    if require_all:
                        res.violations.append((name, "missing from the derivative"))
                    continue
                res.checked += 1
                if seen is not None:
                    seen.add(name)
                why = _compare(released, name, st.get_tensor(found[name]))
                if why:
                    res.violations.append((name, why))
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
        res.violations.append((res.file, f"not a readable safetensors file (cannot be checked: "
                                          f"{(str(e).splitlines() or [''])[0][:80]})"))


_ADAPTER_SUFFIX = re.compile(
    r"\.(lora_[AB](\.[^.]+)?\.(weight|bias)|lora_(down|up|mid)\.weight|lora\.(down|up)\.weight|"
    r"lora_linear_layer\.(down|up)\.weight|alpha|dora_scale|"
    r"lora_magnitude_vector(\.[^.]+)?|hada_[wt]\d_[ab]|lokr_[wt]\d(_[ab])?|diff|diff_b|w_norm|b_norm|"
    r"oft_[a-z_]+|scale)$")
#: diffusers' old attention-processor naming: `<attention>.processor.to_k_lora.down.weight` adapts `<attention>.to_k`
_ATTN_PROCESSOR = re.compile(r"\.(?:processor\.)?([A-Za-z0-9_]+?)_lora\.(?:down|up)\.weight$")
_TEXT_ENCODER = ("text_encoder", "lora_te", "te1_", "te2_", "lora_te1_", "lora_te2_", "text_model.")
_PREFIXES = ("unet.", "base_model.model.", "model.")


def adapter_module(key: str, kohya: dict[str, str]) -> tuple[str | None, str]:
    """(UNet module the adapter tensor `key` patches, or None; 'unet' | 'text' | 'unknown'), in every naming
    diffusers (new, peft-style, and the old attention-processor one), peft (`base_model.model.`) and kohya
    (`lora_unet_`) use."""
    if key.startswith(_TEXT_ENCODER):
        return None, "text"
    if key.startswith(KOHYA_PREFIX):
        m = _ADAPTER_SUFFIX.search(key)
        stem = key[: m.start()] if m else key
        return (kohya[stem], "unet") if stem in kohya else (None, "unknown")
    stem = key
    for prefix in _PREFIXES:
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            break
    if stem.startswith(_TEXT_ENCODER):
        return None, "text"
    old = _ATTN_PROCESSOR.search(stem)
    if old:
        layer = "to_out.0" if old.group(1) == "to_out" else old.group(1)
        return stem[: old.start()].replace(".processor", "") + "." + layer, "unet"
    m = _ADAPTER_SUFFIX.search(stem)
    return (stem[: m.start()] if m else stem), "unet"


def _check_adapter(rel: Release, released: _Released, path: Path, res: FileResult) -> None:
    from safetensors import safe_open

    kohya = {kohya_name(m): m for m in rel.layers}
    text, unknown = 0, set()
    adapted: dict[str, set[str]] = {}
    with safe_open(str(path), framework="pt") as st:
        for k in st.keys():
            module, where = adapter_module(k, kohya)
            if where == "text":
                text += 1
                continue
            if module is not None and module in rel.mask:  # a whole tensor of the UNet inside an adapter file
                res.checked += 1
                why = _compare(released, module, st.get_tensor(k)) if rel.mask[module] else None
                if why:
                    res.violations.append((module, f"a full tensor replacing a frozen one: {why}"))
                continue
            if module is None or module not in rel.layers and f"{module}.weight" not in rel.mask:
                unknown.add(module or k)
                continue
            adapted.setdefault(module, set()).add("bias" if k.endswith(BIAS_SUFFIXES) else "weight")
    res.checked += len(adapted)
    for module, parts in sorted(adapted.items()):
        hit = [p for p in sorted(parts) if rel.mask.get(f"{module}.{p}", False)]
        if hit:
            res.violations.append((module, f"an adapter on a frozen {' and '.join(hit)}"))
    for u in sorted(unknown):
        res.violations.append((u, "not a layer of the release's UNet (cannot be checked)"))
    if text:
        res.notes.append(f"{text} adapter tensor(s) on the text encoder(s): the mask covers the UNet only")
    if not adapted and not unknown and not res.checked:
        res.notes.append("no UNet adapter in the file")


def _check_weight_file(rel: Release, released: _Released, path: Path, label: str, standalone: bool,
                       flag: str) -> FileResult:
    """One .safetensors file: an adapter, or full UNet weights (all frozen tensors required when `standalone`)."""
    res = FileResult(label, "full")
    try:
        keys = _st_keys(path, flag)
    except UserError as e:
        res.kind = "unverifiable"
        res.violations.append((label, str(e).split(": ", 1)[-1] + " (cannot be checked)"))
        return res
    unet_file = re.fullmatch(r"diffusion_pytorch_model.*\.safetensors", path.name) is not None
    if _is_adapter(keys) and not unet_file:
        res.kind = "lora"
        _check_adapter(rel, released, path, res)
        return res
    # a file diffusers loads as the UNet's weights: every frozen tensor must be there and unchanged (one missing
    # is initialised at random, with a warning only), whatever adapter-looking keys it also holds
    _check_tensors(rel, released, path, res, require_all=standalone or unet_file)
    if _is_adapter(keys):
        _check_adapter(rel, released, path, res)
        res.violations = list(dict.fromkeys(res.violations))  # a UNet tensor is compared by both checks
    return res


def _check_index(rel: Release, released: _Released, index: Path, label: str, base: Path) -> list[FileResult]:
    """An index and every shard its weight_map names: diffusers loads every tensor of every such shard."""
    res = FileResult(label, "shards")
    try:
        doc = json.loads(index.read_text())
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        res.kind = "unverifiable"
        res.violations.append((label, "an index with no readable weight_map (cannot be checked)"))
        return [res]
    out = [res]
    seen: set[str] = set()
    for shard in sorted(set(weight_map.values())):
        shard_label = f"{label} -> {shard}"
        if Path(shard).name != shard or shard in ("", ".", ".."):
            res.violations.append((shard_label, "a shard outside the index's folder (cannot be checked)"))
            continue
        f = index.parent / shard
        if not f.is_file():
            res.violations.append((shard_label, "a shard the index names is missing (cannot be checked)"))
            continue
        sub_label = str(f.relative_to(base)) if base in f.parents else shard
        if not shard.endswith(".safetensors"):
            res.violations.append((sub_label, "a shard that is not safetensors (never unpickled: cannot be checked)"))
            continue
        part = FileResult(sub_label, "shard")
        _check_tensors(rel, released, f, part, require_all=False, seen=seen)
        if any(why.startswith("none of its tensors") for _, why in part.violations):
            part.violations = []  # a shard may hold none of the frozen tensors; the index is judged as a whole
        out.append(part)
    res.checked = len(seen)
    res.violations += [(n, "missing from the shards the index names") for n in rel.frozen if n not in seen]
    return out


def _is_index(path: Path) -> bool:
    """A weight index (`diffusion_pytorch_model.safetensors.index[.fp16].json`, or any JSON with a weight_map)."""
    if not path.name.endswith(".json") or path.name in ("config.json", "model_index.json"):
        return False
    if re.search(r"\.index(\.[^.]+)?\.json$", path.name):
        return True
    try:
        return path.stat().st_size < 64 << 20 and "weight_map" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError, UnicodeDecodeError, RecursionError):
        return False


def _is_mask_of(rel: Release, path: Path) -> bool:
    """A freeze mask (strictly read) over exactly the release's UNet tensors: not weights a loader would take."""
    try:
        load_freeze_mask(path, list(rel.mask), flag="mask")
    except UserError:
        return False
    return True


#: the files diffusers' `from_pretrained` reads by name (`variant=V`: diffusion_pytorch_model.V.safetensors)
STANDALONE = re.compile(r"diffusion_pytorch_model(\.[^.]+)?\.safetensors")


def _weight_units(rel: Release, released: _Released, folder: Path, files: list[Path], base: Path, flag: str,
                  unet_folder: bool) -> list[FileResult]:
    """Every weight file among `files` (one folder's): indexes with their shards, standalone UNet files (all
    frozen tensors required), adapters and other safetensors files, and files that cannot be read here."""
    out: list[FileResult] = []
    shards: set[Path] = set()
    for index in (f for f in files if _is_index(f)):
        found = _check_index(rel, released, index, str(index.relative_to(base)), base)
        shards |= {base / r.file for r in found if r.kind == "shard"}
        out += found
    for f in files:
        label = str(f.relative_to(base))
        if f.name == MASK_FILE and not unet_folder and _is_mask_of(rel, f):
            continue  # the release's own kind of file: a mask naming exactly the UNet's tensors, no weights
        if f.suffix == ".safetensors":
            standalone = unet_folder and f.parent == folder and bool(STANDALONE.fullmatch(f.name))
            if f in shards and not standalone:
                continue  # judged with its index
            out.append(_check_weight_file(rel, released, f, label, standalone, flag))
        elif f.name.lower().endswith(UNREADABLE_WEIGHTS):
            out.append(FileResult(label, "unverifiable", violations=[
                (label, f"a {f.suffix} weight file, never unpickled or read here (cannot be checked)")]))
    return out


def _derivative_results(rel: Release, released: _Released, path: Path, flag: str) -> list[FileResult]:
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".json"):
            if _is_index(path):
                return _check_index(rel, released, path, path.name, path.parent)
            raise UserError(f"{flag} {shown(str(path))}: a JSON file that is no weight index")
        if path.suffix != ".safetensors":
            raise UserError(f"{flag} {shown(str(path))}: weights are read from .safetensors only (nothing is unpickled)")
        keys = _st_keys(path, flag)
        if not _is_adapter(keys) and not _full_keys(rel, keys)[1]:
            raise UserError(f"{flag}: none of its tensors is a parameter of the release's UNet (another model, or a "
                            "single-file checkpoint in the original layout: convert it to the diffusers layout first)")
        return [_check_weight_file(rel, released, path, path.name, True, flag)]  # the UNet: all frozen tensors
    if not path.is_dir():
        raise UserError(f"{flag} {shown(str(path))}: no such file or folder")

    def regular(folder: Path, deep: bool) -> list[Path]:
        found = folder.rglob("*") if deep else folder.glob("*")
        return sorted(p for p in found if p.is_file())

    unet_dir = path / "unet" if (path / "unet").is_dir() else path if (
        (path / "config.json").is_file() or any(path.glob("diffusion_pytorch_model*"))) else None
    results: list[FileResult] = []
    if unet_dir is not None:
        results += _weight_units(rel, released, unet_dir, regular(unet_dir, deep=True), path, flag, unet_folder=True)
    if unet_dir != path:
        results += _weight_units(rel, released, path, regular(path, deep=False), path, flag, unet_folder=False)
    if not results:
        raise UserError(f"{flag} {shown(str(path))}: no UNet weights (unet/diffusion_pytorch_model*.safetensors) and "
                        "no adapter .safetensors file")
    return results


def check_derivative(rel: Release, derivative: Path, flag: str = "--derivative") -> CheckResult:
    """Does a derivative keep the release's frozen tensors, in every weight file a loader would read from it?
    Full weights: every frozen tensor bitwise equal to the release's (a standalone UNet file must hold them all;
    an index's shards together). Adapter (diffusers, peft or kohya naming): no adapter on a module whose weight
    (or bias) is frozen. A weight file that cannot be read or attributed is a violation."""
    released = _Released(rel)
    try:
        files = _derivative_results(rel, released, derivative, flag)
    finally:
        released.close()
    kinds = {f.kind for f in files if f.kind != "shard"}
    kind = "full" if kinds <= {"full", "shards"} else "lora" if kinds == {"lora"} else "mixed"
    result = CheckResult(kind, sum(f.checked for f in files if f.kind != "shard"), files=files)
    several = len(files) > 1
    for f in files:
        result.violations += [(n, f"{why} (in {f.file})" if several else why) for n, why in f.violations]
        result.notes += [f"{f.file}: {n}" if several else n for n in f.notes]
    return result
