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
BIAS_SUFFIXES = (".diff_b", ".bias")


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

@dataclass
class CheckResult:
    kind: str
    """'full' (UNet weights compared tensor by tensor) or 'lora' (adapter modules compared with the mask)."""
    checked: int
    violations: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def compliant(self) -> bool:
        return not self.violations


def _st_keys(path: Path, flag: str) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{flag} {shown(str(path))}: not a readable safetensors file "
                        f"({(str(e).splitlines() or [''])[0][:100]})") from None


def _is_adapter(keys: list[str]) -> bool:
    return any(k.startswith(("lora_", "lycoris_")) or ".lora" in k or ".hada_" in k or ".lokr_" in k
               for k in keys)


def _derivative_files(path: Path, flag: str) -> tuple[str, list[Path]]:
    """('full', UNet weight files) or ('lora', [adapter file]) for a pipeline folder, a unet folder, a LoRA
    folder or one safetensors file."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{flag} {shown(str(path))}: weights are read from .safetensors only (nothing is unpickled)")
        return ("lora" if _is_adapter(_st_keys(path, flag)) else "full"), [path]
    if not path.is_dir():
        raise UserError(f"{flag} {shown(str(path))}: no such file or folder")
    for unet_dir in (path / "unet", path):
        files = unet_weight_files(unet_dir) if unet_dir.is_dir() else []
        if files:
            return "full", files
    adapters = sorted(path.glob("*.safetensors"))
    if len(adapters) == 1:
        return _derivative_files(adapters[0], flag)
    if len(adapters) > 1:
        raise UserError(f"{flag} {shown(str(path))}: {len(adapters)} .safetensors files; name the one to check")
    raise UserError(f"{flag} {shown(str(path))}: no UNet weights (unet/diffusion_pytorch_model*.safetensors) and "
                    "no adapter .safetensors file")


def _bitwise_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _check_full(rel: Release, files: list[Path], flag: str) -> CheckResult:
    from safetensors import safe_open

    released = {}
    for f in unet_weight_files(rel.folder / "unet"):
        released.update({k: (f, None) for k in _st_keys(f, "--release")})
    where: dict[str, Path] = {}
    for f in files:
        where.update({k: f for k in _st_keys(f, flag)})
    strip = "unet." if not any(k in where for k in rel.frozen) and any(k.startswith("unet.") for k in where) else ""
    if strip:
        where = {k[len(strip):]: f for k, f in where.items() if k.startswith(strip)}
    if not set(rel.mask) & set(where):
        raise UserError(f"{flag}: none of its tensors is a parameter of the release's UNet (another model, or a "
                        "single-file checkpoint in the original layout: convert it to the diffusers layout first)")
    result = CheckResult("full", len(rel.frozen))
    for name in rel.frozen:
        if name not in where:
            result.violations.append((name, "missing from the derivative"))
            continue
        if name not in released:
            raise UserError(f"--release {shown(str(rel.folder))}: the mask names {shown(name)}, which its weights lack")
        with safe_open(str(released[name][0]), framework="pt") as st:
            a = st.get_tensor(name)
        with safe_open(str(where[name]), framework="pt") as st:
            b = st.get_tensor(strip + name)
        if a.dtype != b.dtype or a.shape != b.shape:
            result.violations.append((name, f"{b.dtype} {tuple(b.shape)} instead of the released "
                                            f"{a.dtype} {tuple(a.shape)}"))
        elif not _bitwise_equal(a, b):
            diff = (a.float() - b.float()).abs().max().item()
            result.violations.append((name, f"changed (max |difference| {diff:.3g})"))
    return result


_ADAPTER_SUFFIX = re.compile(
    r"\.(lora_[AB](\.[^.]+)?\.(weight|bias)|lora_(down|up|mid)\.weight|lora\.(down|up)\.weight|alpha|dora_scale|"
    r"lora_magnitude_vector(\.[^.]+)?|hada_[wt]\d_[ab]|lokr_[wt]\d(_[ab])?|diff|diff_b|w_norm|b_norm|"
    r"oft_[a-z_]+|scale)$")
_TEXT_ENCODER = ("text_encoder", "lora_te", "te1_", "te2_", "lora_te1_", "lora_te2_")


def adapter_module(key: str, kohya: dict[str, str]) -> tuple[str | None, str]:
    """(UNet module the adapter tensor `key` patches, or None; 'unet' | 'text' | 'unknown')."""
    if key.startswith(_TEXT_ENCODER):
        return None, "text"
    m = _ADAPTER_SUFFIX.search(key)
    stem = key[: m.start()] if m else key
    if stem.startswith(KOHYA_PREFIX):
        return kohya.get(stem), "unet" if stem in kohya else "unknown"
    for prefix in ("unet.", "base_model.model.", "model."):
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
    return stem, "unet"


def _check_adapter(rel: Release, path: Path, flag: str) -> CheckResult:
    kohya = {kohya_name(m): m for m in rel.layers}
    keys = _st_keys(path, flag)
    result = CheckResult("lora", 0)
    text, unknown = 0, set()
    adapted: dict[str, set[str]] = {}
    for k in keys:
        module, where = adapter_module(k, kohya)
        if where == "text":
            text += 1
            continue
        if module is None or module not in rel.layers and f"{module}.weight" not in rel.mask:
            unknown.add(module or k)
            continue
        adapted.setdefault(module, set()).add("bias" if k.endswith(BIAS_SUFFIXES) else "weight")
    result.checked = len(adapted)
    for module, parts in sorted(adapted.items()):
        hit = [p for p in sorted(parts) if rel.mask.get(f"{module}.{p}", False)]
        if hit:
            result.violations.append((module, f"an adapter on a frozen {' and '.join(hit)}"))
    for u in sorted(unknown):
        result.violations.append((u, "not a layer of the release's UNet (cannot be checked)"))
    if text:
        result.notes.append(f"{text} adapter tensor(s) on the text encoder(s): the mask covers the UNet only")
    if not adapted and not unknown:
        result.notes.append("no UNet adapter in the file")
    return result


def check_derivative(rel: Release, derivative: Path, flag: str = "--derivative") -> CheckResult:
    """Does a derivative keep the release's frozen tensors? Full weights: every frozen tensor bitwise equal to the
    release's. Adapter (peft/diffusers or kohya naming): no adapter on a module whose weight (or bias) is frozen."""
    kind, files = _derivative_files(derivative, flag)
    if kind == "lora":
        return _check_adapter(rel, files[0], flag)
    return _check_full(rel, files, flag)
