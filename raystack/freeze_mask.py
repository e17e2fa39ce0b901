"""FreezeAsGuard masks on disk: one entry per UNet parameter *name* (1 = frozen at its released value).

Keyed by name, never by position, so a mask cannot silently land on the wrong tensor of a model
whose parameter order differs; any key mismatch is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

MASK_FILE = "freeze_mask.safetensors"


def save_freeze_mask(path: Path, mask: dict[str, bool], extra: dict | None = None) -> float:
    import torch
    from safetensors.torch import save

    from .atomic import atomic_write_bytes

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


def load_freeze_mask(path: Path, param_names: list[str] | None = None, flag: str = "--freeze-mask") -> dict[str, bool]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / MASK_FILE
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    if path.suffix != ".safetensors":
        raise UserError(f"{flag} {path}: masks are read from .safetensors only (nothing is unpickled)")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: corrupt safetensors file ({str(e).splitlines()[0][:100]})") from None
    mask = {k: bool(v.flatten()[0].item()) for k, v in raw.items()}
    if param_names is not None:
        names = set(param_names)
        missing, extra = names - mask.keys(), mask.keys() - names
        if missing or extra:
            example = sorted(extra or missing)[0]
            raise UserError(f"{flag} {path}: keys do not match the model's UNet parameters "
                            f"({len(missing)} missing, {len(extra)} unknown, e.g. {example!r})")
    return mask

