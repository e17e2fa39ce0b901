"""FreezeAsGuard masks on disk: one entry per UNet parameter *name* (1 = frozen at its released value).

Keyed by name, never by position, so a mask cannot silently land on the wrong tensor of a model
whose parameter order differs; any key mismatch is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .atomic import atomic_write_bytes
from .outputs import shown

MASK_FILE = "freeze_mask.safetensors"


def save_freeze_mask(path: Path, mask: dict[str, bool], extra: dict | None = None) -> float:
    import torch
    from safetensors.torch import save

    ratio = sum(bool(v) for v in mask.values()) / max(1, len(mask))
    tensors = {k: torch.tensor([1 if v else 0], dtype=torch.uint8) for k, v in mask.items()}
    meta = {"frozen_ratio": f"{ratio:.6f}", "n_tensors": str(len(mask)), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))
    return ratio


def read_mask_metadata(path: Path) -> dict:
    """The mask file's metadata (frozen_ratio, n_tensors, method, rho), or {} if it is gone or unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


#: the dtypes a mask entry may have: bool, or an integer holding 0 or 1 (`save_freeze_mask` writes uint8)
MASK_DTYPES = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")


def load_freeze_mask(path: Path, param_names: list[str] | None = None, flag: str = "--freeze-mask") -> dict[str, bool]:
    """The one reader of mask files: {UNet tensor name: frozen}.

    Accepted form (what `save_freeze_mask` writes): a safetensors file (`path`, or `path/freeze_mask.safetensors`
    for a folder) with one entry per UNet tensor, keyed by the tensor's name; each entry is a tensor of dtype bool
    or an integer dtype (uint8 as written; int8...int64, uint16...uint64 read too) holding exactly one element,
    whose value is 0 (trainable) or 1 (frozen). With `param_names`, the keys must be exactly those names. Anything
    else (a float entry, [0, 1, 1], 0.3, NaN, -1, 2, an empty tensor, a file with no entries, a missing or unknown
    key) is a UserError naming the file and the first bad key; nothing is guessed."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MASK_FILE
    where = f"{flag} {shown(str(path))}"
    if not path.is_file():
        raise UserError(f"{where}: no such file")
    if path.suffix != ".safetensors":
        raise UserError(f"{where}: masks are read from .safetensors only (nothing is unpickled)")
    rule = "a mask entry is one bool or integer 0/1"
    mask: dict[str, bool] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = sorted(f.keys())
            for k in keys:  # dtype and size from the header first: nothing large is read
                sl = f.get_slice(k)
                dtype, shape = sl.get_dtype(), sl.get_shape()
                n = 1
                for d in shape:
                    n *= int(d)
                if dtype not in MASK_DTYPES:
                    raise UserError(f"{where}: entry {shown(k)!r} has dtype {dtype.lower()}; {rule}")
                if n != 1:
                    raise UserError(f"{where}: entry {shown(k)!r} holds {n} values (shape {list(shape)}); {rule}")
                v = int(f.get_tensor(k).reshape(-1)[0].item())
                if v not in (0, 1):
                    raise UserError(f"{where}: entry {shown(k)!r} is {v}; {rule}")
                mask[k] = bool(v)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{where}: corrupt safetensors file ({(str(e).splitlines() or [''])[0][:100]})") from None
    if not mask:
        raise UserError(f"{where}: holds no entries (a mask has one per UNet tensor)")
    if param_names is not None:
        names = set(param_names)
        missing, extra = names - mask.keys(), mask.keys() - names
        if missing or extra:
            example = sorted(extra or missing)[0]
            raise UserError(f"{where}: keys do not match the model's UNet parameters "
                            f"({len(missing)} missing, {len(extra)} unknown, e.g. {shown(example)!r})")
    return mask



class FrozenTensorChanged(AssertionError):
    """A tensor the release's freeze mask froze was trained or changed."""


class FrozenTensors:
    """What `apply` returns: the frozen parameters of one UNet and a fingerprint of each, to check they kept
    their released values. Use it as a context manager to check on leaving the block."""

    def __init__(self, unet, names: list[str]):
        import torch

        params = dict(unet.named_parameters())
        self.names = names
        frozen = set(names)
        self.frozen_layers = [m for m, mod in unet.named_modules()
                              if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and f"{m}.weight" in frozen]
        """Linear/Conv modules whose weight is frozen: pass them as peft's `exclude_modules` so that a LoRA adapts
        none of them (a compliant LoRA)."""
        self._params = {n: params[n] for n in names}
        self._digests = {n: _tensor_digest(p) for n, p in self._params.items()}
        self._hook = unet.register_forward_pre_hook(self._no_gradient_on_frozen)

    def _no_gradient_on_frozen(self, module, args):
        """Runs before every forward pass: a trainer that switched a frozen tensor back on (e.g. with
        `unet.requires_grad_(True)`) is stopped before it takes a step."""
        on = [n for n, p in self._params.items() if p.requires_grad]
        if on:
            raise FrozenTensorChanged(f"freeze mask: {len(on)} frozen tensor(s) were made trainable again, e.g. {on[0]}")

    def changed(self) -> list[str]:
        """The frozen tensors whose bytes differ from their released values (empty: all kept)."""
        return [n for n, p in self._params.items() if _tensor_digest(p) != self._digests[n]]

    def check(self) -> None:
        """Raise `FrozenTensorChanged` naming the first changed tensor, if any changed."""
        bad = self.changed()
        if bad:
            raise FrozenTensorChanged(f"freeze mask: {len(bad)} frozen tensor(s) changed, e.g. {bad[0]}")

    def remove(self) -> None:
        """Stop checking in forward passes (the tensors stay frozen)."""
        self._hook.remove()

    def __enter__(self) -> "FrozenTensors":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()
        if exc_type is None:
            self.check()


def _tensor_digest(t) -> str:
    import hashlib

    import torch

    data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
    return f"{t.dtype}|{tuple(t.shape)}|{hashlib.sha256(data).hexdigest()}"


def _is_flag(v) -> bool:
    """True/False, 0/1, or a one-element bool/integer tensor holding 0 or 1 (a {name: frozen} dict's values)."""
    if isinstance(v, (bool, int)):
        return v in (0, 1)
    dtype, numel = getattr(v, "dtype", None), getattr(v, "numel", lambda: 0)()
    return dtype is not None and numel == 1 and not v.is_floating_point() and not v.is_complex() \
        and int(v.reshape(-1)[0]) in (0, 1)


def apply(unet, mask) -> FrozenTensors:
    """Freeze the tensors a release's mask freezes on a diffusers UNet, for any training loop:

        guard = raystack.freeze_mask.apply(pipe.unet, "release/freeze_mask.safetensors")
        ...train as usual...; guard.check()   # or: with apply(unet, mask): train()

    `mask` is a mask file, a release folder holding one, or a {tensor name: frozen} dict; its names must be
    exactly the UNet's parameters. Frozen tensors get no gradient (an optimizer built from all parameters then
    skips them: no gradient, no update, no weight decay); a forward pre-hook refuses to run once one of them is
    made trainable again, and `check()` compares every frozen tensor with its bytes when `apply` was called
    (apply it to the UNet as loaded from the release, before any cast)."""
    names = [n for n, _ in unet.named_parameters()]
    if isinstance(mask, dict):
        unknown, missing = set(mask) - set(names), set(names) - set(mask)
        if unknown or missing:
            raise UserError(f"freeze mask: keys do not match the UNet's parameters ({len(missing)} missing, "
                            f"{len(unknown)} unknown)")
        bad = next((k for k in sorted(mask) if not _is_flag(mask[k])), None)
        if bad is not None:
            from .outputs import shown

            raise UserError(f"freeze mask: entry {shown(bad)!r} is {shown(mask[bad])}, not a bool or 0/1")
        flags = {k: bool(int(v)) for k, v in mask.items()}
    else:
        flags = load_freeze_mask(Path(mask), names, flag="freeze mask")
    frozen = [n for n in names if flags[n]]
    params = dict(unet.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    return FrozenTensors(unet, frozen)
